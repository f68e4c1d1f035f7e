"""Fréchet Inception Distance for images (and per-frame FID for videos).

The detector is the TF ``inception-2015-12-05`` network as the NVlabs StyleGAN2-ADA/StyleGAN3
metrics ship it (TorchScript, assets/MANIFEST.md §1b): ``forward(x) -> (N, 2048)`` pool3
features. Its in-model resize and normalisation were removed, so this module does them the way
the NVlabs pipeline does: uint8 pixel values, bilinear resize to 299x299 (align_corners=False),
then ``(x - 128) / 128``. Float images in the project's [-1, 1] convention are first quantised to
uint8 (rounding), as saving them would.

:class:`FrechetInceptionDistance` follows torchmetrics' ``FrechetInceptionDistance`` interface:
``update(imgs, real=...)``, ``compute()``, ``reset_real_features``; the covariance is the unbiased
(N - 1) one, as in torchmetrics and pytorch-fid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from walt_cli.errors import WaltError
from walt_cli.metrics.frechet import (
    FeatureStats,
    frechet_distance_from_stats,
    merge_packed,
    packed_size,
)

INCEPTION_DIM = 2048
INCEPTION_SIZE = 299
INCEPTION_FILE = "default_1.pt"


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights: `path`, then $WALT_INCEPTION, then the cache, then $WALT_ASSETS."""
    from walt_cli.assets import assets_dir
    from walt_cli.metrics.weights import cached_path

    if path is not None:
        if not Path(path).is_file():
            raise WaltError(f"{path}: Inception weights not found")
        return Path(path)
    env = os.environ.get("WALT_INCEPTION")
    if env:
        if not Path(env).is_file():
            raise WaltError(f"WALT_INCEPTION={env}: no such file")
        return Path(env)
    if cached_path("inception").is_file():
        return cached_path("inception")
    root = assets_dir()
    if root is not None and (root / "fid_inception" / INCEPTION_FILE).is_file():
        return root / "fid_inception" / INCEPTION_FILE
    raise WaltError(
        "Inception weights not found: run `walt eval-fvd --fetch-detector` (or `make assets`), "
        "or set WALT_INCEPTION"
    )


def load_inception(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> torch.jit.ScriptModule:
    """The TorchScript Inception feature extractor, in eval mode."""
    path = find_inception(path)
    try:
        net = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # RuntimeError for anything that is not a TorchScript archive
        raise WaltError(
            f"{path}: not a TorchScript Inception archive ({type(err).__name__})"
        ) from None
    return net.eval()


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 or float in [-1, 1] -> (B, 3, 299, 299) float32 Inception inputs.

    Video batches (B, C, T, H, W) are split into frames.
    """
    if not isinstance(images, torch.Tensor):
        raise WaltError(f"expected an image tensor, got {type(images).__name__}")
    if images.ndim == 5:
        images = images.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise WaltError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float()
    elif images.is_floating_point():
        if images.numel() and (float(images.min()) < -1.01 or float(images.max()) > 1.01):
            raise WaltError(
                "float images must be in [-1, 1] (pass uint8 tensors for 0..255 pixels)"
            )
        x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()
    else:
        raise WaltError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(
            x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
        )
    return (x - 128.0) / 128.0


@torch.no_grad()
def inception_features(
    images: torch.Tensor,
    net: nn.Module,
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, 2048) float64 pool3 features of a batch of images (or video frames).

    The TorchScript graph runs without the profiling executor's optimisation passes: on CPU they
    re-specialise for every new batch shape and made calls 3-5x slower, not faster.
    """
    out = []
    for chunk in images.split(max(1, batch_size)):
        x = prepare_images(chunk)
        if device is not None:
            x = x.to(device)
        with torch.jit.optimized_execution(False):
            out.append(net(x).double())
    return torch.cat(out) if out else torch.zeros(0, INCEPTION_DIM, dtype=torch.float64)


class FrechetInceptionDistance(Metric):
    """FID as a torchmetrics ``Metric`` over uint8 or [-1, 1] float images (or video frames).

    ``reset_real_features=False`` keeps the real statistics across ``reset()``. Statistics are
    float64 and merge exactly across DDP ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        *,
        inception: nn.Module | str | os.PathLike | None = None,
        reset_real_features: bool = True,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.inception = (
            inception if isinstance(inception, nn.Module) else load_inception(inception)
        )
        self.reset_real_features = reset_real_features
        self.batch_size = batch_size
        for side in ("real", "fake"):
            self.add_state(
                f"{side}_stats",
                torch.zeros(packed_size(INCEPTION_DIM), dtype=torch.float64),
                dist_reduce_fx=merge_packed,
            )

    def update(self, imgs: torch.Tensor, real: bool) -> None:
        """Add a batch of real (`real=True`) or generated images."""
        feats = inception_features(
            imgs, self.inception, batch_size=self.batch_size, device=self.real_stats.device
        )
        stats = FeatureStats.from_packed(self.real_stats if real else self.fake_stats)
        stats.update(feats)

    def compute(self) -> torch.Tensor:
        """The FID (a float64 scalar tensor)."""
        real = FeatureStats.from_packed(self.real_stats)
        fake = FeatureStats.from_packed(self.fake_stats)
        for side, s in (("real", real), ("generated", fake)):
            if s.num < 2:
                raise WaltError(
                    f"FID needs at least 2 images per side; got {s.num} {side} image(s)"
                )
        return torch.tensor(frechet_distance_from_stats(real, fake), dtype=torch.float64)

    def reset(self) -> None:
        """Clear the statistics; the real ones survive when `reset_real_features=False`."""
        keep = None if self.reset_real_features else self.real_stats.clone()
        super().reset()
        if keep is not None:
            self.real_stats = keep
