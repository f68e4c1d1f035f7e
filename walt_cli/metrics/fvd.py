"""Fréchet Video Distance with named protocols (DESIGN.md §5).

FVD numbers are only comparable under the same protocol (PEERS.md §4), so every number this
module produces carries its protocol, N per side, frame count and resolution.

Protocols, as implemented:

``magvit`` (MAGVIT's ``frechet_distance.py``; the protocol W.A.L.T reports under)
    the first 16 frames of each clip; frames as floats in [0, 1] (uint8 / 255, or (x + 1) / 2 for
    the project's [-1, 1] floats) squash-resized to 224x224 with
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, then mapped to
    [-1, 1] as 2x - 1; 400-d time-mean I3D logits; unbiased (N - 1) covariance; N samples per
    side (default: every clip) x repeats, reported as mean ± std.
``stylegan-v`` (universome/stylegan-v ``fvd2048_16f``)
    N = 2048 clips per side of 16 frames; real clips start at a random frame (real videos shorter
    than 16 frames are dropped), generated clips at frame 0; frames quantised to uint8
    (round((x + 1) * 127.5)), rescaled as u8 / 127.5 - 1 and then squash-resized bilinearly to
    224x224 (align_corners=False), the order of that implementation's torchscript detector
    (``rescale=True, resize=True``); its ``FeatureStats.get_mean_cov`` divides the scatter by N,
    so this protocol uses the biased (ddof = 0) covariance.
``raw``
    no protocol clipping: every frame of each clip (or ``num_frames``), [-1, 1] squash-resized to
    224x224; real and generated clips must have the same resolution.

For ``magvit`` and ``stylegan-v`` real clips are first brought to the generator's resolution
(short-side resize and centre crop, antialiased bilinear like the data pipeline) when they differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from walt_cli.metrics.i3d import MIN_FRAMES, NUM_CLASSES, InceptionI3d, load_i3d

DETECTOR_SIZE = 224


@dataclass(frozen=True)
class FVDProtocol:
    """How clips become I3D inputs and how the statistics are formed (see the module docstring)."""

    name: str
    num_frames: int | None  # frames per clip (None: all the clip has)
    num_samples: int | None  # default N per side (None: every clip)
    uint8: bool  # quantise to uint8, then u8 / 127.5 - 1, then resize (stylegan-v's order)
    real_start: str  # where a real clip's window starts: "first" or "random"
    match_resolution: bool  # bring real clips to the generator's resolution
    ddof: int  # covariance normalisation: scatter / (N - ddof)
    summary: str


PROTOCOLS: dict[str, FVDProtocol] = {
    "magvit": FVDProtocol(
        "magvit",
        16,
        None,
        False,
        "first",
        True,
        1,
        "first 16 frames, [0,1] squash-bilinear to 224 then 2x-1, unbiased covariance",
    ),
    "stylegan-v": FVDProtocol(
        "stylegan-v",
        16,
        2048,
        True,
        "random",
        True,
        0,
        "2048 clips x 16 frames, random real offsets, uint8 -> [-1,1] -> squash-bilinear 224, "
        "covariance / N",
    ),
    "raw": FVDProtocol(
        "raw",
        None,
        None,
        False,
        "first",
        False,
        1,
        "all frames, [-1,1] squash-bilinear to 224, same resolution required",
    ),
}


def get_protocol(name: str | FVDProtocol) -> FVDProtocol:
    if isinstance(name, FVDProtocol):
        return name
    if name not in PROTOCOLS:
        raise WaltError(f"unknown FVD protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# From clips to detector inputs


def _check_videos(videos: torch.Tensor) -> torch.Tensor:
    """Validate a (B, C, T, H, W) batch (uint8 or float in [-1, 1]); grey becomes RGB."""
    if not isinstance(videos, torch.Tensor):
        raise WaltError(f"expected a video tensor, got {type(videos).__name__}")
    if videos.ndim != 5:
        raise WaltError(f"expected videos of shape (B, C, T, H, W), got {tuple(videos.shape)}")
    if videos.shape[1] not in (1, 3):
        hint = " (channels-last? permute to (B, C, T, H, W))" if videos.shape[-1] in (1, 3) else ""
        raise WaltError(f"expected 1 or 3 channels in dim 1, got shape {tuple(videos.shape)}{hint}")
    if videos.dtype != torch.uint8 and not videos.is_floating_point():
        raise WaltError(f"videos must be uint8 or float in [-1, 1], got {videos.dtype}")
    if videos.is_floating_point() and videos.numel():
        lo, hi = float(videos.min()), float(videos.max())
        if lo < -1.01 or hi > 1.01:
            raise WaltError(
                f"float videos must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                "(pass uint8 tensors for 0..255 frames)"
            )
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1, -1)
    return videos


def _squash(x: torch.Tensor, size: int = DETECTOR_SIZE) -> torch.Tensor:
    """Bilinear squash of every frame of (B, C, T, H, W) to size x size (no antialiasing)."""
    b, c, t, h, w = x.shape
    if (h, w) == (size, size):
        return x
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(
        frames, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return frames.reshape(b, t, c, size, size).transpose(1, 2)


def prepare_videos(
    videos: torch.Tensor, protocol: str | FVDProtocol = "magvit", num_frames: int | None = None
) -> torch.Tensor:
    """Turn a batch of clips into I3D inputs (B, 3, T, 224, 224) float32 in [-1, 1].

    videos: (B, C, T, H, W), uint8 (0..255) or float in [-1, 1]. `num_frames` overrides the
    protocol's frame count; the first frames are kept (windows are chosen when clips are read).
    """
    proto = get_protocol(protocol)
    videos = _check_videos(videos)
    total = videos.shape[2]
    n = num_frames or proto.num_frames or total
    if n < MIN_FRAMES:
        raise WaltError(f"FVD needs at least {MIN_FRAMES} frames per clip (I3D's limit), got {n}")
    if total < n:
        raise WaltError(f"clips have {total} frames, but protocol {proto.name} uses {n}")
    x = videos[:, :, :n]
    if proto.uint8:
        u8 = x.float() if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        return _squash(u8 / 127.5 - 1.0)
    if proto.name == "magvit":
        x01 = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1) / 2).clamp(0, 1)
        return _squash(x01) * 2.0 - 1.0
    x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
    return _squash(x)


def match_resolution(videos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring (B, C, T, H, W) clips to `size` = (H', W'): cover resize, then a centre crop.

    The resize scales the frame so that it covers (H', W') (the short-side resize for matching
    aspect ratios), with antialiased bilinear interpolation as the data pipeline's `resize_crop`.
    uint8 in, uint8 out (rounded), as a real set stored at that resolution would be.
    """
    b, c, t, h, w = videos.shape
    th, tw = size
    if (h, w) == (th, tw):
        return videos
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    is_u8 = videos.dtype == torch.uint8
    x = videos.float() / 127.5 - 1.0 if is_u8 else videos.float()
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    if (nh, nw) != (h, w):
        frames = F.interpolate(
            frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(-1.0, 1.0)
    top, left = (nh - th) // 2, (nw - tw) // 2
    frames = frames[:, :, top : top + th, left : left + tw]
    out = frames.reshape(b, t, c, th, tw).transpose(1, 2)
    if is_u8:
        return ((out + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.to(videos.dtype)


@torch.no_grad()
def i3d_features(
    videos: torch.Tensor,
    detector: InceptionI3d,
    protocol: str | FVDProtocol = "magvit",
    *,
    num_frames: int | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """The 400-d FVD features (B, 400), float64, of a batch of clips under a protocol."""
    param = next(detector.parameters())
    out = []
    for chunk in videos.split(max(1, batch_size)):
        x = prepare_videos(chunk.to(param.device), protocol, num_frames)
        out.append(detector(x.to(param.dtype)).double())
    return torch.cat(out) if out else torch.zeros(0, NUM_CLASSES, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The torchmetrics metric


class FrechetVideoDistance(Metric):
    """FVD as a torchmetrics ``Metric``: ``update(videos, real=...)`` then ``compute()``.

    videos: (B, C, T, H, W), float in [-1, 1] (the project's convention) or uint8; the first
    `num_frames` (or the protocol's count) are used, so pick random windows (stylegan-v's real
    clips) when reading. Statistics are float64 and merge exactly across DDP ranks. With ``reset_real_features=False``,
    ``reset()`` keeps the real statistics (compute them once, score many generators).

    Args:
        protocol: "magvit", "stylegan-v" or "raw" (module docstring).
        detector: an :class:`InceptionI3d`, a weights path, or None (looked up by `load_i3d`).
        num_frames: frames per clip, overriding the protocol's count.
        resolution: the generator's (H, W). Under a protocol that matches resolutions, real
            batches of another size are resized and centre-cropped to it, and generated batches
            must have it. Without it, both sides must simply agree.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        protocol: str | FVDProtocol = "magvit",
        *,
        detector: InceptionI3d | str | os.PathLike | None = None,
        num_frames: int | None = None,
        resolution: tuple[int, int] | None = None,
        reset_real_features: bool = True,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.protocol = get_protocol(protocol)
        if num_frames is not None and num_frames < MIN_FRAMES:
            raise WaltError(f"FVD needs at least {MIN_FRAMES} frames per clip, got {num_frames}")
        if resolution is not None and not self.protocol.match_resolution:
            raise WaltError(
                f"protocol {self.protocol.name} does not resize clips; drop resolution="
            )
        self.num_frames = num_frames
        self.resolution = tuple(resolution) if resolution is not None else None
        self.reset_real_features = reset_real_features
        self.batch_size = batch_size
        self.detector = detector if isinstance(detector, nn.Module) else load_i3d(detector)
        self.detector.eval().requires_grad_(False)
        dim = NUM_CLASSES
        for side in ("real", "fake"):
            self.add_state(
                f"{side}_stats",
                torch.zeros(packed_size(dim), dtype=torch.float64),
                dist_reduce_fx=merge_packed,
            )
            # smallest and largest (H, W) seen: they differ when a side mixes resolutions
            self.add_state(
                f"{side}_size_min",
                torch.full((2,), 2**31 - 1, dtype=torch.long),
                dist_reduce_fx="min",
            )
            self.add_state(
                f"{side}_size_max", torch.zeros(2, dtype=torch.long), dist_reduce_fx="max"
            )

    def update(self, videos: torch.Tensor, real: bool) -> None:
        """Add a batch of real (`real=True`) or generated clips."""
        videos = _check_videos(videos)
        size = tuple(videos.shape[-2:])
        if self.resolution is not None and size != self.resolution:
            if not real:
                raise WaltError(
                    f"generated clips are {size[0]}x{size[1]}, but resolution="
                    f"{self.resolution[0]}x{self.resolution[1]} was given"
                )
            videos = match_resolution(videos, self.resolution)
            size = self.resolution
        feats = i3d_features(
            videos,
            self.detector,
            self.protocol,
            num_frames=self.num_frames,
            batch_size=self.batch_size,
        )
        side = "real" if real else "fake"
        seen = tuple(int(v) for v in getattr(self, f"{side}_size_max"))
        if seen != (0, 0) and seen != size:
            what = "real" if real else "generated"
            raise WaltError(
                f"{what} clips mix resolutions ({seen[0]}x{seen[1]} and {size[0]}x{size[1]})"
            )
        stats = FeatureStats.from_packed(getattr(self, f"{side}_stats"))
        stats.update(feats.to(stats.vector.device))
        hw = torch.tensor(size, dtype=torch.long, device=self.real_size_min.device)
        setattr(self, f"{side}_size_min", torch.minimum(getattr(self, f"{side}_size_min"), hw))
        setattr(self, f"{side}_size_max", torch.maximum(getattr(self, f"{side}_size_max"), hw))

    def _side_size(self, side: str) -> tuple[int, int] | None:
        lo = tuple(int(v) for v in getattr(self, f"{side}_size_min"))
        hi = tuple(int(v) for v in getattr(self, f"{side}_size_max"))
        if hi == (0, 0):
            return None  # nothing seen (or statistics loaded without a size)
        if lo != hi:
            raise WaltError(f"{side} clips mix resolutions ({lo[0]}x{lo[1]} and {hi[0]}x{hi[1]})")
        return hi

    def compute(self) -> torch.Tensor:
        """The FVD (a float64 scalar tensor)."""
        real, fake = self.real_feature_stats(), self.fake_feature_stats()
        for side, s in (("real", real), ("generated", fake)):
            if s.num < 2:
                raise WaltError(f"FVD needs at least 2 clips per side; got {s.num} {side} clip(s)")
        rs, fs = self._side_size("real"), self._side_size("fake")
        if rs is not None and fs is not None and rs != fs:
            hint = (
                "pass resolution=(H, W) so real clips are resized to the generator's"
                if self.protocol.match_resolution
                else f"protocol {self.protocol.name} does not resize; use magvit or stylegan-v"
            )
            raise WaltError(
                f"real clips are {rs[0]}x{rs[1]} but generated clips are {fs[0]}x{fs[1]}: {hint}"
            )
        fvd = frechet_distance_from_stats(real, fake, ddof=self.protocol.ddof)
        return torch.tensor(fvd, dtype=torch.float64)

    def reset(self) -> None:
        """Clear the statistics; the real ones survive when `reset_real_features=False`."""
        if self.reset_real_features:
            super().reset()
            return
        keep = {
            k: getattr(self, k).clone() for k in ("real_stats", "real_size_min", "real_size_max")
        }
        super().reset()
        for k, v in keep.items():
            setattr(self, k, v)

    def real_feature_stats(self) -> FeatureStats:
        return FeatureStats.from_packed(self.real_stats)

    def fake_feature_stats(self) -> FeatureStats:
        return FeatureStats.from_packed(self.fake_stats)

    def set_real_stats(self, stats: FeatureStats, size: tuple[int, int] | None = None) -> None:
        """Install precomputed real statistics (e.g. from :func:`load_stats`)."""
        if stats.dim != NUM_CLASSES:
            raise WaltError(f"expected {NUM_CLASSES}-d statistics, got {stats.dim}-d")
        self.real_stats = stats.vector.to(self.real_stats.device, torch.float64).clone()
        hw = torch.tensor(
            size if size is not None else (0, 0), dtype=torch.long, device=self.real_stats.device
        )
        self.real_size_min = hw if size is not None else torch.full_like(hw, 2**31 - 1)
        self.real_size_max = hw.clone()


# --------------------------------------------------------------------------------------------
# Cached statistics


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: dict[str, Any]) -> Path:
    """Write statistics (packed float64) with their description to a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    save_file(
        {"stats": stats.vector.detach().cpu().contiguous()},
        str(tmp),
        metadata={"walt.kind": "fvd-stats", "walt.meta": json.dumps(meta, sort_keys=True)},
    )
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict[str, Any]]:
    """Read a file written by :func:`save_stats`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vec = f.get_tensor("stats")
    except Exception as err:
        raise WaltError(f"{path}: not a readable statistics file ({err})") from None
    if meta.get("walt.kind") != "fvd-stats":
        raise WaltError(f"{path}: not an FVD statistics file")
    return FeatureStats.from_packed(vec.to(torch.float64)), json.loads(meta.get("walt.meta", "{}"))


def stats_cache_path(key: dict[str, Any]) -> Path:
    """Where the real statistics for `key` (protocol, data, resolution, N, ...) are cached."""
    from walt_cli.assets import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    res = "x".join(str(v) for v in key.get("resolution") or ("any",))
    name = f"{key['protocol']}-{key['frames']}f-{res}-n{key['num']}-{digest}.safetensors"
    return cache_dir() / "fvd-stats" / name


# --------------------------------------------------------------------------------------------
# FVD between two sets of clips on disk (what `walt eval-fvd` runs)


@dataclass
class FVDResult:
    """One evaluation: mean ± std over repeats, and everything needed to compare it."""

    fvd: float
    fvd_std: float
    runs: list[float]
    protocol: str
    num_real: int
    num_fake: int
    frames: int | None
    resolution: tuple[int, int]
    repeats: int
    seconds: float
    detector: str
    real_stats_cached: bool = False
    dropped_real: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["resolution"] = list(self.resolution)
        return out


ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


def _select(rng: np.random.Generator, count: int, n: int) -> list[int]:
    if n >= count:
        return list(range(count))
    return sorted(int(i) for i in rng.choice(count, size=n, replace=False))


def evaluate_sets(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    *,
    protocol: str = "magvit",
    num_samples: int | None = None,
    repeats: int = 1,
    frames: int | None = None,
    detector: str | os.PathLike | InceptionI3d | None = None,
    batch_size: int = 8,
    seed: int = 0,
    use_cache: bool = True,
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> FVDResult:
    """FVD between the clips of two folders/manifests under a named protocol.

    The generated set fixes the resolution; real clips are matched to it where the protocol
    says so. Each repeat draws N clips per side (all clips when N covers the set) and, under
    stylegan-v, new random real windows; real statistics are cached per repeat under a key of
    protocol, data, resolution, N, frames, seed and detector.
    """
    from walt_cli.metrics.i3d import find_i3d_weights, weights_fingerprint
    from walt_cli.metrics.videoset import open_video_set, probe_clip, read_clip

    t0 = time.perf_counter()
    proto = get_protocol(protocol)
    if repeats < 1:
        raise WaltError(f"--repeats must be at least 1, got {repeats}")
    if num_samples is not None and num_samples < 2:
        raise WaltError(f"FVD needs at least 2 clips per side, got --num-samples {num_samples}")
    n_frames = frames or proto.num_frames
    if n_frames is not None and n_frames < MIN_FRAMES:
        raise WaltError(
            f"FVD needs at least {MIN_FRAMES} frames per clip (I3D's limit), got {n_frames}"
        )
    real_set = open_video_set(real, what="--real")
    fake_set = open_video_set(fake, what="--fake")
    notes: list[str] = []

    def probe_all(items: Sequence, stage: str) -> list:
        infos = []
        for i, item in enumerate(items):
            infos.append(probe_clip(item))
            if progress:
                progress(stage, i + 1, len(items))
        return infos

    fake_info = probe_all(fake_set.items, "probing generated clips")
    real_info = probe_all(real_set.items, "probing real clips")
    sizes = {(i.height, i.width) for i in fake_info}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise WaltError(f"--fake {fake}: generated clips mix resolutions ({listed})")
    resolution = sizes.pop()
    need = n_frames or MIN_FRAMES
    short = [s.name for s, i in zip(fake_set.items, fake_info, strict=True) if i.num_frames < need]
    if short:
        raise WaltError(
            f"--fake {fake}: {len(short)} clip(s) have fewer than {need} frames (e.g. {short[0]})"
        )
    keep = [k for k, i in enumerate(real_info) if i.num_frames >= need]
    dropped = len(real_info) - len(keep)
    if dropped:
        notes.append(f"dropped {dropped} real clip(s) shorter than {need} frames")
    if not proto.match_resolution:
        other = {(real_info[k].height, real_info[k].width) for k in keep} - {resolution}
        if other:
            h, w = sorted(other)[0]
            raise WaltError(
                f"real clips are {h}x{w} but generated clips are {resolution[0]}x{resolution[1]}: "
                f"protocol {proto.name} does not resize (use magvit or stylegan-v)"
            )
    n_default = num_samples or proto.num_samples
    n_real = min(n_default or len(keep), len(keep))
    n_fake = min(n_default or len(fake_info), len(fake_info))
    if num_samples is not None and (n_real < num_samples or n_fake < num_samples):
        notes.append(f"--num-samples {num_samples}: only {n_real} real / {n_fake} generated clips")
    for side, n in (("real", n_real), ("generated", n_fake)):
        if n < 2:
            raise WaltError(f"FVD needs at least 2 clips per side; found {n} usable {side} clip(s)")

    if isinstance(detector, nn.Module):
        net, det_name = detector, getattr(detector, "source", "module")
        det_id = det_name
    else:
        det_path = find_i3d_weights(detector)
        net, det_name = load_i3d(det_path, device=device), str(det_path)
        det_id = weights_fingerprint(det_path) if use_cache else det_name

    memo: dict[tuple[str, int, int], torch.Tensor] = {}

    def extract(side: str, jobs: list[tuple[int, int]], items: list, stage: str) -> torch.Tensor:
        todo = [j for j in dict.fromkeys(jobs) if (side, *j) not in memo]
        done = 0
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            clips = [
                torch.from_numpy(read_clip(items[i], s, n_frames)).permute(3, 0, 1, 2)
                for i, s in batch
            ]
            groups: dict[tuple, list[int]] = {}
            for k, c in enumerate(clips):
                groups.setdefault(tuple(c.shape), []).append(k)
            for ks in groups.values():
                x = torch.stack([clips[k] for k in ks])  # (B, 3, T, H, W) uint8
                if proto.match_resolution:
                    x = match_resolution(x, resolution)
                feats = i3d_features(x, net, proto, num_frames=n_frames, batch_size=batch_size)
                for k, f in zip(ks, feats.cpu(), strict=True):
                    memo[(side, *batch[k])] = f
            done += len(batch)
            if progress:
                progress(stage, done, len(todo))
        return torch.stack([memo[(side, *j)] for j in jobs])

    runs: list[float] = []
    cached_all = use_cache
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        real_pick = [keep[k] for k in _select(rng, len(keep), n_real)]
        if proto.real_start == "random":
            starts = [int(rng.integers(0, real_info[i].num_frames - need + 1)) for i in real_pick]
        else:
            starts = [0] * len(real_pick)
        fake_pick = _select(rng, len(fake_info), n_fake)
        real_varies = proto.real_start == "random" or n_real < len(keep)
        key = {
            "protocol": proto.name,
            "frames": n_frames or "all",
            "resolution": list(resolution),
            "num": n_real,
            "data": real_set.fingerprint() if use_cache else "",
            "detector": det_id,
            "selection": f"seed{seed}-repeat{r}" if real_varies else "all",
        }
        path = stats_cache_path(key) if use_cache else None
        real_stats = None
        if path is not None and path.is_file():
            real_stats, _ = load_stats(path)
        if real_stats is None:
            cached_all = False
            feats = extract(
                "real",
                list(zip(real_pick, starts, strict=True)),
                real_set.items,
                f"real features (repeat {r + 1}/{repeats})",
            )
            real_stats = FeatureStats.from_features(feats)
            if path is not None:
                save_stats(path, real_stats, key)
        feats = extract(
            "fake",
            [(i, 0) for i in fake_pick],
            fake_set.items,
            f"generated features (repeat {r + 1}/{repeats})",
        )
        fake_stats = FeatureStats.from_features(feats)
        runs.append(frechet_distance_from_stats(real_stats, fake_stats, ddof=proto.ddof))

    return FVDResult(
        fvd=float(np.mean(runs)),
        fvd_std=float(np.std(runs)),
        runs=runs,
        protocol=proto.name,
        num_real=n_real,
        num_fake=n_fake,
        frames=n_frames,
        resolution=resolution,
        repeats=repeats,
        seconds=round(time.perf_counter() - t0, 3),
        detector=det_name,
        real_stats_cached=cached_all,
        dropped_real=dropped,
        notes=notes,
    )


def fvd_from_features(real: torch.Tensor, fake: torch.Tensor, *, ddof: int = 1) -> float:
    """FVD from two (N, 400) feature matrices (e.g. from :func:`i3d_features`)."""
    return frechet_distance_from_stats(
        FeatureStats.from_features(real), FeatureStats.from_features(fake), ddof=ddof
    )
