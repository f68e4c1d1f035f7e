"""Reconstruction and perceptual losses for tokenizer training (SPEC_WALT.md §1, Table 8 recipe).

- `reconstruction_loss`: mean L1 or L2 over every pixel (MAGVIT's code uses L2, weight 5).
- `I3DPerceptual`: squared distance between channel-normalised intermediate I3D features of the
  input and its reconstruction (the network the FVD uses, frozen). The early endpoints are
  convolutions with "same" padding, so they also take 1-frame images and small frames.
- `LPIPSPerceptual`: a TorchScript module the user supplies by path (`torch.jit.save` of any
  LPIPS implementation), called per frame as `f(x, y) -> (N,)` or `(N, 1, 1, 1)` with x, y
  (N, 3, H, W) in [-1, 1]. walt ships no ImageNet backbone (no torchvision), so nothing is
  downloaded.

Perceptual networks are frozen and kept out of the training system's state dict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from walt_cli.errors import WaltError

I3D_LAYERS = ("Conv3d_2c_3x3", "Mixed_3c")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 or L2 distance between (B, 3, T, H, W) clips."""
    if kind == "l1":
        return (recon.float() - target.float()).abs().mean()
    if kind == "l2":
        return (recon.float() - target.float()).pow(2).mean()
    raise WaltError(f"reconstruction loss must be l1 or l2, got {kind!r}")


def _normalise(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Unit-length feature vectors along channels (LPIPS-style), f (B, C, ...)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class I3DPerceptual(nn.Module):
    """Perceptual distance from intermediate I3D endpoints; mean over layers of the mean squared
    distance between channel-normalised features of x and y, both (B, 3, T, H, W) in [-1, 1]."""

    def __init__(self, net: nn.Module, layers: Sequence[str] = I3D_LAYERS) -> None:
        super().__init__()
        from walt_cli.metrics.i3d import ENDPOINTS

        unknown = set(layers) - set(ENDPOINTS)
        if unknown:
            raise WaltError(f"unknown I3D endpoints {sorted(unknown)}; choose from {ENDPOINTS}")
        self.net = net.eval().requires_grad_(False)
        self.layers = tuple(layers)
        self.depth = max(ENDPOINTS.index(name) for name in self.layers) + 1
        self._endpoints = ENDPOINTS[: self.depth]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for name in self._endpoints:
            x = getattr(self.net, name)(x)
            if name in self.layers:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.features(x)
        fy = self.features(y)
        terms = [
            (_normalise(a) - _normalise(b)).pow(2).sum(1).mean()
            for a, b in zip(fx, fy, strict=True)
        ]
        return torch.stack(terms).mean()


class LPIPSPerceptual(nn.Module):
    """A user-supplied TorchScript LPIPS, averaged over frames: x, y (B, 3, T, H, W) -> scalar."""

    def __init__(self, fn: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.fn = fn.eval()
        for p in self.fn.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = rearrange(x, "b c t h w -> (b t) c h w")
        b = rearrange(y, "b c t h w -> (b t) c h w")
        return self.fn(a, b).float().mean()


def load_lpips(path: str | os.PathLike) -> LPIPSPerceptual:
    p = Path(path)
    if not p.is_file():
        raise WaltError(f"tokenizer.perceptual_path: LPIPS TorchScript file not found: {p}")
    try:
        fn = torch.jit.load(str(p), map_location="cpu")
    except Exception as err:  # not a TorchScript archive
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WaltError(f"{p}: not a TorchScript LPIPS module ({msg})") from None
    return LPIPSPerceptual(fn)


def build_perceptual(kind: str, path: str | None) -> nn.Module | None:
    """The frozen perceptual loss a recipe names: none -> None, i3d or lpips -> module(x, y)."""
    if kind == "none":
        return None
    if kind == "i3d":
        from walt_cli.metrics.i3d import load_i3d

        return I3DPerceptual(load_i3d(path))
    if kind == "lpips":
        if path is None:
            raise WaltError("tokenizer.perceptual=lpips needs tokenizer.perceptual_path")
        return load_lpips(path)
    raise WaltError(f"tokenizer.perceptual must be none, i3d or lpips, got {kind!r}")


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per clip of (B, 3, T, H, W) in [-1, 1], measured on [0, 1]: (B,)."""
    mse = ((recon.float().clamp(-1, 1) - target.float()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


__all__ = [
    "I3DPerceptual",
    "LPIPSPerceptual",
    "build_perceptual",
    "psnr",
    "reconstruction_loss",
]
