"""Where the real-data assets live (detector weights, label lists, sample clips).

Looked up in order: the `WALT_ASSETS` environment variable, then `../shared/assets` beside the
working directory or beside the repository checkout. Nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def assets_dir() -> Path | None:
    """The assets folder, or None where there is none."""
    env = os.environ.get("WALT_ASSETS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for base in (Path.cwd(), _REPO):
        cand = base.parent / "shared" / "assets"
        if cand.is_dir():
            return cand
    return None


def cache_dir() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/walt`: downloaded detector weights and cached statistics."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "walt"
