"""Embeddings of W.A.L.T [P §4.2-4.3]: timestep (and noise-level) embedder, class embedder with a
null class, and the learned absolute position embeddings (spatial + temporal)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(...,) float -> (..., dim) sin/cos features (DDPM/DiT timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half
    )
    args = x.float()[..., None] * freqs  # (..., half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (..., width): sinusoidal features of the step index t*999 (1000 training
    steps, DESIGN §3b), then Linear -> SiLU -> Linear (DiT). Also embeds the SR noise level."""

    def __init__(self, width: int, freq_dim: int = 256, num_steps: int = 1000) -> None:
        super().__init__()
        self.freq_dim, self.scale = freq_dim, float(num_steps - 1)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        freqs = sinusoidal_embedding(t * self.scale, self.freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """Class label -> (..., width). Row `num_classes` is the learned null class, used for label
    -1 (classifier-free guidance, condition dropout, or no label given)."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class PositionEmbedding(nn.Module):
    """Learned absolute position embedding [P §2.1]: a spatial table over the token grid (h x w)
    plus a temporal table over latent frames, summed. Image samples take frame 0's temporal
    embedding for every frame (each packed image is a frame-0 image)."""

    def __init__(self, width: int, frames: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.spatial = nn.Parameter(torch.zeros(grid[0], grid[1], width))  # (h, w, D)
        self.temporal = nn.Parameter(torch.zeros(frames, width))  # (T, D)
        nn.init.trunc_normal_(self.spatial, std=0.02)
        nn.init.trunc_normal_(self.temporal, std=0.02)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.spatial.shape[:2])  # type: ignore[return-value]

    @property
    def frames(self) -> int:
        return self.temporal.shape[0]

    def forward(self, frames: int, is_image: Tensor | None) -> Tensor:
        """(B or 1, T, h, w, D) embedding for a clip of `frames` latent frames."""
        temporal = self.temporal[:frames][None]  # (1, T, D)
        if is_image is not None:
            frame0 = self.temporal[:1][None].expand_as(temporal)
            temporal = torch.where(is_image[:, None, None], frame0, temporal)  # (B, T, D)
        return self.spatial[None, None] + temporal[:, :, None, None, :]

    @torch.no_grad()
    def init_sincos(self) -> None:
        """Replace both tables by fixed-frequency sin-cos tables (they stay learned): the first
        half of the channels encodes the row, the second the column, and the temporal table
        the frame over all channels. Each has rms 0.71 where the default start has 0.02."""
        (h, w), width = self.grid, self.spatial.shape[-1]
        half = width // 2
        rows = sincos_table(h, half)[:, None, :].expand(h, w, half)
        cols = sincos_table(w, width - half)[None, :, :].expand(h, w, width - half)
        self.spatial.copy_(torch.cat([rows, cols], dim=-1))
        self.temporal.copy_(sincos_table(self.frames, width))

    @torch.no_grad()
    def resize(self, frames: int, grid: tuple[int, int]) -> None:
        """Interpolate to a new token grid (bicubic) and clip length (linear)."""
        if tuple(grid) != self.grid:
            spatial = rearrange_hw_first(self.spatial.data)
            spatial = F.interpolate(spatial, size=tuple(grid), mode="bicubic", align_corners=False)
            self.spatial = nn.Parameter(spatial[0].permute(1, 2, 0).contiguous())
        if frames != self.frames:
            temporal = self.temporal.data.t()[None]  # (1, D, T)
            temporal = F.interpolate(temporal, size=frames, mode="linear", align_corners=True)
            self.temporal = nn.Parameter(temporal[0].t().contiguous())


def sincos_table(positions: int, dim: int) -> Tensor:
    """(positions, dim) Transformer position encoding [Vaswani et al. 2017]: channel 2i holds
    sin(p / 10000^(2i/dim)) and channel 2i+1 the cosine of the same angle (the frequencies of
    `sinusoidal_embedding`, interleaved; an odd last channel is 0)."""
    half = dim // 2
    emb = sinusoidal_embedding(torch.arange(positions), 2 * half)  # (positions, [cos | sin])
    out = torch.stack([emb[:, half:], emb[:, :half]], dim=-1).flatten(1)
    return F.pad(out, (0, dim - 2 * half))


def rearrange_hw_first(x: Tensor) -> Tensor:
    """(h, w, D) -> (1, D, h, w) for `F.interpolate`."""
    return x.permute(2, 0, 1)[None].float()
