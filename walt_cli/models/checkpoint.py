"""Self-describing weight files: safetensors tensors plus the architecture config in its metadata.

A file alone rebuilds its model: `save_weights` stores the constructor keywords as JSON under the
metadata key `walt.config` and the model family under `walt.kind`; `load_weights` checks both and
returns them with the state dict. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from walt_cli.errors import WaltError

FORMAT_VERSION = "1"


def save_weights(
    path: str | os.PathLike,
    module: torch.nn.Module,
    *,
    kind: str,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `module`'s state dict (or `state`) with its config (JSON-serialisable constructor
    keywords)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {
        "walt.format": FORMAT_VERSION,
        "walt.kind": kind,
        "walt.config": json.dumps(config, sort_keys=True),
    }
    if extra:
        meta["walt.extra"] = json.dumps(extra, sort_keys=True)
    from walt_cli.runio import atomic_path

    with atomic_path(path) as tmp:  # never leave a half-written checkpoint behind
        save_file(state, str(tmp), metadata=meta)
    return path


def _read(
    path: str | os.PathLike, kind: str, *, tensors: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WaltError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except Exception as err:  # safetensors raises SafetensorError / OSError on bad headers
        raise WaltError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    found = meta.get("walt.kind")
    if found is None or "walt.config" not in meta:
        raise WaltError(f"{path}: not a walt checkpoint (no architecture config in its metadata)")
    if found != kind:
        raise WaltError(f"{path}: holds a {found!r} model, expected a {kind!r} model")
    return json.loads(meta["walt.config"]), state, json.loads(meta.get("walt.extra", "{}"))


def load_weights(
    path: str | os.PathLike, *, kind: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_weights`: (config, state dict, extra). Clear errors otherwise."""
    return _read(path, kind, tensors=True)


def read_metadata(path: str | os.PathLike, *, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, extra) of a file written by `save_weights`, from its header alone: no tensor is
    read. The same checks and errors as `load_weights`."""
    config, _, extra = _read(path, kind, tensors=False)
    return config, extra


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise WaltError(f"{path}: weights do not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
