"""The causal 3D video tokenizer: W.A.L.T's first stage (SPEC_WALT.md §0-§1, MAGVIT-v2 lineage).

One causal 3D CNN autoencoder, with no quantizer, maps images and videos into one latent space:

    x (B, 3, 1 + T, H, W) in [-1, 1]  --encode-->  z (B, c, 1 + T / f_t, H / f_s, W / f_s)

with f_s = 8, f_t = 4, c = 8 (17x128x128 -> 5x16x16x8). Frame 0 is encoded on its own, so an
image is a 1-frame video and its latent equals the first latent frame of any video that starts
with it. Causality is exact (DESIGN §5): causal convolutions, per-frame norms, and a decoder whose
adaptive GroupNorm takes, for each output frame, the latent frame that covers it.

Latent frame i (i >= 1) covers input frames 4i-3 .. 4i and depends on input frames <= 4i;
decoded frame j depends on latent frames <= ceil(j / 4).

Architecture ([M1c] `enc_dec_3dcnn.py` with the MAGVIT-v2 changes, SPEC §1):

    encoder: conv3 -> per level i: N x ResBlock(C_i) [-> strided conv down, x2 space, x2 time in
             the last steps] -> N x ResBlock -> GN -> SiLU -> conv1 to c
    decoder: conv3 -> N x ResBlock -> per level i (deepest first): AdaGN(z) -> N x ResBlock(C_i)
             [-> conv3 + depth-to-space up] -> GN -> SiLU -> conv3 to RGB

Chunked processing (`encode(x, chunk_frames=...)`, `decode(z, chunk_latents=...)`) feeds the
clip through in pieces, each causal convolution carrying the frames it still needs from the
previous piece; the result equals the unchunked one to float tolerance and the activation
memory is that of one chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from walt_cli.errors import WaltError
from walt_cli.models.layers import (
    AdaptiveGroupNorm,
    CausalConv3d,
    DepthToSpaceUpsample3d,
    Downsample3d,
    FrameGroupNorm,
    ResBlock3d,
    StreamState,
)

CHECKPOINT_KIND = "tokenizer"

PRESETS: dict[str, dict[str, Any]] = {
    # The test model: the structure of `paper` (f_s 8, f_t 4, c 8, every layer type including
    # channel changes both ways) at 1.9M parameters. Wider late levels would not fit: the
    # temporal depth-to-space convolutions hold 27 * C * 8C weights each. GroupNorm(8), not 32:
    # 32 groups over 32 channels normalise each channel alone per frame, which erases every
    # channel's mean colour of a frame; measured on shapes (DESIGN §6) that left frame 0 flat
    # and training slow (17.6 vs 10.6 dB held-out PSNR after 5 minutes).
    "tiny": dict(
        base_channels=32,
        channel_multipliers=(1, 2, 1, 1),
        num_res_blocks=1,
        temporal_downsample=(False, True, True),
        num_groups=8,
    ),
    # The embedded default model's tokenizer (recipes/shapes.yaml): narrow at full resolution,
    # where a CPU spends its convolution time, wider where the grid is small. 16/32/64/64
    # channels, 4 per group at the narrowest level; 3.5M parameters. A training step (batch 8,
    # 17x32x32, fwd + bwd + Adam) took 0.66x the time of `tiny`'s, measured side by side
    # (median of 4 interleaved steps, 2-core CPU under load: 5.6 s vs 8.5 s).
    "shapes": dict(
        base_channels=16,
        channel_multipliers=(1, 2, 4, 4),
        num_res_blocks=1,
        temporal_downsample=(False, True, True),
        num_groups=4,
    ),
    # UCF-101 / K600 / T2V first stage [P Table 8]: 128 channels, multipliers 1,2,2,4; 4 residual
    # blocks per level [M2]; temporal downsampling in the last two steps [M2, OS].
    "paper": dict(
        base_channels=128,
        channel_multipliers=(1, 2, 2, 4),
        num_res_blocks=4,
        temporal_downsample=(False, True, True),
    ),
    # ImageNet first stage [P Table 8]: multipliers 1,1,2,4. It keeps the temporal steps, so it
    # still takes any 1 + 4k frames (images are the 1-frame case).
    "paper-image": dict(
        base_channels=128,
        channel_multipliers=(1, 1, 2, 4),
        num_res_blocks=4,
        temporal_downsample=(False, True, True),
    ),
}


def latent_index(num_latents: int, factor: int, *, first: bool, device=None) -> torch.Tensor:
    """For each frame produced from `num_latents` latent frames at temporal factor `factor`, the
    (chunk-local) index of the latent frame that covers it.

    Latent frame 0 covers one frame, every later one covers `factor` frames; `first` says the
    chunk starts with latent frame 0.
    """
    idx = [i for i in range(num_latents) for _ in range(1 if first and i == 0 else factor)]
    return torch.tensor(idx, dtype=torch.long, device=device)


class CausalEncoder(nn.Module):
    """(B, 3, 1 + T, H, W) -> (B, c, 1 + T / f_t, H / f_s, W / f_s)."""

    def __init__(
        self,
        *,
        in_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        temporal_downsample: Sequence[bool],
        num_groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        norm = dict(num_groups=num_groups, eps=eps)
        self.conv_in = CausalConv3d(in_channels, base_channels, 3, bias=False)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = base_channels
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, width, **norm))
                prev = width
            self.levels.append(nn.ModuleList(blocks))
            if i < len(widths) - 1:
                self.downsamples.append(Downsample3d(width, temporal=temporal_downsample[i]))
        self.mid = nn.ModuleList(ResBlock3d(prev, prev, **norm) for _ in range(num_res_blocks))
        self.norm_out = FrameGroupNorm(num_groups, prev, eps=eps)
        self.conv_out = CausalConv3d(prev, latent_channels, 1)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        h = self.conv_in(x, state)  # (B, C_0, T, H, W)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, state)  # (B, C_i, T_i, H_i, W_i)
            if i < len(self.downsamples):
                h = self.downsamples[i](h, state)  # (B, C_i, T_{i+1}, H_i / 2, W_i / 2)
        for block in self.mid:
            h = block(h, state)
        return self.conv_out(nn.functional.silu(self.norm_out(h)), state)  # (B, c, t, h, w)


class CausalDecoder(nn.Module):
    """(B, c, 1 + t, h, w) -> (B, 3, 1 + f_t * t, f_s * h, f_s * w)."""

    def __init__(
        self,
        *,
        out_channels: int,
        latent_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        temporal_downsample: Sequence[bool],
        num_groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        norm = dict(num_groups=num_groups, eps=eps)
        prev = widths[-1]
        self.conv_in = CausalConv3d(latent_channels, prev, 3)
        self.mid = nn.ModuleList(ResBlock3d(prev, prev, **norm) for _ in range(num_res_blocks))
        # Built deepest level first, in the order the decoder runs them.
        self.adanorms = nn.ModuleList()
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        self.frames_per_latent: list[int] = []  # at the input of each level
        for i in reversed(range(len(widths))):
            self.adanorms.append(AdaptiveGroupNorm(prev, latent_channels, **norm))
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, widths[i], **norm))
                prev = widths[i]
            self.levels.append(nn.ModuleList(blocks))
            self.frames_per_latent.append(2 ** sum(bool(s) for s in temporal_downsample[i:]))
            if i > 0:
                self.upsamples.append(
                    DepthToSpaceUpsample3d(prev, temporal=temporal_downsample[i - 1])
                )
        self.norm_out = FrameGroupNorm(num_groups, prev, eps=eps)
        self.conv_out = CausalConv3d(prev, out_channels, 3)

    def forward(
        self, z: torch.Tensor, state: StreamState | None = None, *, first: bool = True
    ) -> torch.Tensor:
        # z: (B, c, t, h, w); `first`: z starts at the clip's latent frame 0
        h = self.conv_in(z, state)  # (B, C_top, t, h, w)
        for block in self.mid:
            h = block(h, state)
        for k, blocks in enumerate(self.levels):
            # The control signal of each frame is the latent frame that covers it (DESIGN §5).
            idx = latent_index(z.shape[2], self.frames_per_latent[k], first=first, device=z.device)
            h = self.adanorms[k](h, z.index_select(2, idx))  # (B, C, T_k, H_k, W_k)
            for block in blocks:
                h = block(h, state)
            if k < len(self.upsamples):
                h = self.upsamples[k](h, state, first=first)  # (B, C, T_{k+1}, 2 H_k, 2 W_k)
        return self.conv_out(nn.functional.silu(self.norm_out(h)), state)  # (B, 3, T, H, W)


class CausalVideoTokenizer(nn.Module):
    """The W.A.L.T causal 3D autoencoder (continuous latents, no quantizer).

    Args:
        in_channels: pixel channels (3, RGB in [-1, 1]).
        latent_channels: c, channels of the latent (8 in the paper).
        base_channels: channels of the first level (128 in the paper).
        channel_multipliers: per-level width multipliers; `len - 1` downsampling steps, each x2
            in space, so 4 levels give f_s = 8.
        num_res_blocks: residual blocks per level (and in the middle).
        temporal_downsample: per downsampling step, whether it also halves time (1 + 2m ->
            1 + m); f_t = 2 ** (number of True). MAGVIT-v2 puts them in the last steps.
        num_groups, eps: GroupNorm groups and epsilon (32, 1e-6).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        latent_channels: int = 8,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 4,
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(int(m) for m in channel_multipliers)
        temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        _check_config(
            in_channels,
            latent_channels,
            base_channels,
            channel_multipliers,
            num_res_blocks,
            temporal_downsample,
            num_groups,
        )
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.base_channels = base_channels
        self.channel_multipliers = channel_multipliers
        self.num_res_blocks = num_res_blocks
        self.temporal_downsample = temporal_downsample
        self.num_groups = num_groups
        self.eps = eps
        common = dict(
            latent_channels=latent_channels,
            base_channels=base_channels,
            channel_multipliers=channel_multipliers,
            num_res_blocks=num_res_blocks,
            temporal_downsample=temporal_downsample,
            num_groups=num_groups,
            eps=eps,
        )
        self.encoder = CausalEncoder(in_channels=in_channels, **common)
        self.decoder = CausalDecoder(out_channels=in_channels, **common)

    # ---------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CausalVideoTokenizer:
        """A named architecture (`tiny`, `shapes`, `paper`, `paper-image`), keywords overriding."""
        if name not in PRESETS:
            raise WaltError(f"unknown tokenizer preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def config(self) -> dict[str, Any]:
        """The constructor keywords (JSON-serialisable): what a checkpoint stores to rebuild this."""
        return dict(
            in_channels=self.in_channels,
            latent_channels=self.latent_channels,
            base_channels=self.base_channels,
            channel_multipliers=list(self.channel_multipliers),
            num_res_blocks=self.num_res_blocks,
            temporal_downsample=list(self.temporal_downsample),
            num_groups=self.num_groups,
            eps=self.eps,
        )

    def save(self, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
        """Write safetensors weights with the architecture config in the metadata."""
        from walt_cli.models.checkpoint import save_weights

        return save_weights(path, self, kind=CHECKPOINT_KIND, config=self.config, extra=extra)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
    ) -> CausalVideoTokenizer:
        """Rebuild the model from a file written by :meth:`save` (in eval mode).

        A missing, corrupt or foreign file, a config this class cannot build, or weights that do
        not fit the config raise a one-line :class:`WaltError` naming the file and the problem.
        """
        from walt_cli.models.checkpoint import load_state_strict, load_weights

        config, state, _ = load_weights(path, kind=CHECKPOINT_KIND)
        try:
            model = cls(**config)
        except TypeError as err:  # unknown or missing keyword in the stored config
            raise WaltError(f"{path}: tokenizer config does not fit this version ({err})") from None
        except WaltError as err:
            raise WaltError(f"{path}: invalid tokenizer config ({err})") from None
        load_state_strict(model, state, path)
        return model.to(map_location).eval()

    # ---------------------------------------------------------------------------------------
    # Geometry

    @property
    def spatial_factor(self) -> int:
        """f_s: pixels per latent pixel along H and W."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def temporal_factor(self) -> int:
        """f_t: frames per latent frame after the first."""
        return 2 ** sum(self.temporal_downsample)

    def num_latent_frames(self, num_frames: int) -> int:
        """1 + T frames -> 1 + T / f_t latent frames."""
        return 1 + (num_frames - 1) // self.temporal_factor

    def num_frames(self, num_latent_frames: int) -> int:
        """1 + t latent frames -> 1 + f_t * t frames."""
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------------------------------
    # Encode / decode

    def encode(
        self,
        x: torch.Tensor,
        *,
        chunk_frames: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Pixels (B, 3, 1 + T, H, W) in [-1, 1] -> raw latents (B, c, 1 + T / f_t, H / f_s, W / f_s).

        `chunk_frames` (a multiple of f_t) processes frame 0 plus the first `chunk_frames` frames,
        then `chunk_frames` frames at a time, carrying the causal convolution state; the result
        equals the unchunked one. `callback(done, total)` is called after each chunk.
        """
        self._check_video(x)
        chunks = _chunks(x.shape[2], chunk_frames, self.temporal_factor, "chunk_frames")
        if len(chunks) == 1:
            z = self.encoder(x)
            if callback is not None:
                callback(1, 1)
            return z
        state: StreamState = {}
        out = []
        for n, (start, stop) in enumerate(chunks):
            out.append(self.encoder(x[:, :, start:stop], state))  # (B, c, t_chunk, h, w)
            if callback is not None:
                callback(n + 1, len(chunks))
        return torch.cat(out, dim=2)

    def decode(
        self,
        z: torch.Tensor,
        *,
        chunk_latents: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Raw latents (B, c, 1 + t, h, w) -> pixels (B, 3, 1 + f_t * t, f_s * h, f_s * w).

        `chunk_latents` decodes latent frame 0 plus the next `chunk_latents` latent frames, then
        `chunk_latents` at a time, carrying the causal convolution state; the result equals the
        unchunked one. `callback(done, total)` is called after each chunk.
        """
        self._check_latent(z)
        chunks = _chunks(z.shape[2], chunk_latents, 1, "chunk_latents")
        if len(chunks) == 1:
            x = self.decoder(z)
            if callback is not None:
                callback(1, 1)
            return x
        state: StreamState = {}
        out = []
        for n, (start, stop) in enumerate(chunks):
            out.append(self.decoder(z[:, :, start:stop], state, first=start == 0))
            if callback is not None:
                callback(n + 1, len(chunks))
        return torch.cat(out, dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(x))."""
        return self.decode(self.encode(x))

    # ---------------------------------------------------------------------------------------
    # Input checks (one-line errors that name the problem)

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise WaltError(
                f"tokenizer input must be a video batch (B, {self.in_channels}, T, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        _, c, t, h, w = x.shape
        if c != self.in_channels:
            raise WaltError(
                f"tokenizer input has {c} channels, expected {self.in_channels} (RGB) "
                f"in shape (B, {self.in_channels}, T, H, W); got {tuple(x.shape)}"
            )
        f_t, f_s = self.temporal_factor, self.spatial_factor
        if t < 1:
            raise WaltError(
                f"tokenizer input has too few frames: 0 (need 1 + {f_t}k frames, "
                f"e.g. 1, {1 + f_t}, {1 + 4 * f_t})"
            )
        if (t - 1) % f_t:
            lo = 1 + (t - 1) // f_t * f_t
            raise WaltError(
                f"tokenizer input has {t} frames, which is not 1 + {f_t}k "
                f"(use {lo} or {lo + f_t} frames)"
            )
        if h % f_s or w % f_s:
            raise WaltError(
                f"tokenizer input frames are {h}x{w}, but height and width must be multiples "
                f"of {f_s}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 5:
            raise WaltError(
                f"tokenizer latent must be (B, {self.latent_channels}, t, h, w), "
                f"got shape {tuple(z.shape)}"
            )
        if z.shape[1] != self.latent_channels:
            raise WaltError(
                f"tokenizer latent has {z.shape[1]} channels, expected {self.latent_channels}; "
                f"got shape {tuple(z.shape)}"
            )
        if z.shape[2] < 1:
            raise WaltError("tokenizer latent has too few frames: 0 (need at least 1)")


def _chunks(total: int, chunk: int | None, multiple: int, name: str) -> list[tuple[int, int]]:
    """[start, stop) ranges: frame 0 plus `chunk` frames, then `chunk` frames at a time."""
    if chunk is None:
        return [(0, total)]
    if chunk < 1 or chunk % multiple:
        what = "integer" if multiple == 1 else f"multiple of {multiple}"
        raise WaltError(f"{name} must be a positive {what}, got {chunk}")
    bounds = [0, *range(1 + chunk, total, chunk), total]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _check_config(
    in_channels: int,
    latent_channels: int,
    base_channels: int,
    channel_multipliers: tuple[int, ...],
    num_res_blocks: int,
    temporal_downsample: tuple[bool, ...],
    num_groups: int,
) -> None:
    if min(in_channels, latent_channels, base_channels, num_res_blocks, num_groups) < 1:
        raise WaltError("tokenizer channel, block and group counts must be positive")
    if not channel_multipliers or min(channel_multipliers) < 1:
        raise WaltError(f"channel_multipliers must be positive integers, got {channel_multipliers}")
    if len(temporal_downsample) != len(channel_multipliers) - 1:
        raise WaltError(
            f"temporal_downsample needs one entry per downsampling step "
            f"({len(channel_multipliers) - 1} for {len(channel_multipliers)} levels), "
            f"got {len(temporal_downsample)}"
        )
    for width in {base_channels, *(base_channels * m for m in channel_multipliers)}:
        if width % num_groups:
            raise WaltError(f"channel width {width} is not divisible by num_groups={num_groups}")
