"""Sets of clips for evaluation: a folder of videos and/or frame folders, or a manifest file.

* a folder: every video file in it (sorted by name) and every sub-folder of frame images (one
  folder per clip, frames in natural name order: ``2.png`` before ``10.png``);
* a manifest: ``.txt`` with one path per line (``#`` comments), or ``.jsonl`` whose objects carry
  ``path`` (or ``source``); relative paths are relative to the manifest's folder.

Frames are read as uint8 (T, H, W, 3) RGB, the way they are stored: what a protocol does with
them (quantising, resizing) is the metric's business, not the reader's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from walt_cli.errors import WaltError

MANIFEST_EXTS = (".txt", ".jsonl")


@dataclass(frozen=True)
class ClipSource:
    """One clip on disk: a video file or a folder of frame images."""

    path: Path
    frames: tuple[Path, ...] | None = None  # frame files, for a frame folder

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ClipInfo:
    num_frames: int
    height: int
    width: int


def _natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", path.name)]


def _frame_folder(folder: Path) -> ClipSource | None:
    from walt_cli.data.video import is_image

    frames = sorted((p for p in folder.iterdir() if p.is_file() and is_image(p)), key=_natural_key)
    return ClipSource(folder, tuple(frames)) if frames else None


def _source(path: Path, origin: str) -> ClipSource:
    from walt_cli.data.video import is_video

    if path.is_dir():
        src = _frame_folder(path)
        if src is None:
            raise WaltError(f"{origin}: {path} holds no frame images")
        return src
    if not path.is_file():
        raise WaltError(f"{origin}: {path} does not exist")
    if not is_video(path):
        raise WaltError(f"{origin}: {path} is neither a video file nor a folder of frames")
    return ClipSource(path)


def _read_manifest(path: Path) -> list[ClipSource]:
    base = path.parent
    entries: list[str] = []
    for num, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise WaltError(f"{path}:{num}: not JSON ({err.msg})") from None
            value = obj.get("path", obj.get("source")) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise WaltError(
                    f"{path}:{num}: expected an object with a 'path' (or 'source') string"
                )
            entries.append(value)
        else:
            entries.append(line)
    return [_source(p if (p := Path(e)).is_absolute() else base / p, f"{path}") for e in entries]


@dataclass
class VideoSet:
    """An ordered list of clips, with where it came from."""

    spec: str
    items: list[ClipSource]

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """sha256 over (path, size, mtime) of every file: keys cached statistics to the data."""
        digest = hashlib.sha256()
        for item in self.items:
            for f in item.frames or (item.path,):
                st = f.stat()
                digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def open_video_set(spec: str | os.PathLike, *, what: str = "videos") -> VideoSet:
    """List the clips of a folder or a manifest (see the module docstring)."""
    from walt_cli.data.video import is_image, is_video

    path = Path(spec)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTS:
        items = _read_manifest(path)
    elif path.is_dir():
        entries = sorted(path.iterdir(), key=_natural_key)
        items = []
        for p in entries:
            if p.is_file() and is_video(p):
                items.append(ClipSource(p))
            elif p.is_dir() and (src := _frame_folder(p)) is not None:
                items.append(src)
        if not items and any(p.is_file() and is_image(p) for p in entries):
            raise WaltError(
                f"{what} {path}: holds images but no clips; put each clip's frames in its own folder"
            )
    elif path.exists():
        raise WaltError(
            f"{what} {path}: expected a folder of clips or a manifest ({', '.join(MANIFEST_EXTS)})"
        )
    else:
        raise WaltError(f"{what} {path}: no such folder or manifest")
    if not items:
        raise WaltError(f"{what} {path}: no videos or frame folders found")
    return VideoSet(str(spec), items)


def probe_clip(src: ClipSource) -> ClipInfo:
    """Frame count and size of a clip."""
    from walt_cli.data.video import probe, read_image

    if src.frames is not None:
        first = read_image(src.frames[0])
        return ClipInfo(len(src.frames), first.shape[0], first.shape[1])
    info = probe(src.path)
    return ClipInfo(info.num_frames, info.height, info.width)


def read_clip(src: ClipSource, start: int = 0, num_frames: int | None = None) -> np.ndarray:
    """Frames [start, start + num_frames) of a clip as uint8 (T, H, W, 3); None: to the end."""
    from walt_cli.data.video import read_frames, read_images

    if src.frames is not None:
        out = read_images(src.frames[start : None if num_frames is None else start + num_frames])
    elif num_frames is None:
        out, _ = read_frames(src.path)
        out = out[start:]
    else:
        out, _ = read_frames(src.path, list(range(start, start + num_frames)))
    if num_frames is not None and len(out) < num_frames:
        raise WaltError(f"{src.path}: has {start + len(out)} frames, needed {start + num_frames}")
    return out
