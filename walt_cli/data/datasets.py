"""Data sets that feed the tokenizer and the latent transformer.

Every item is a dict:

    video     float (3, T, H, W) in [-1, 1]
    label     int (-1 where the data set has no classes); packed images: long (N,)
    caption   str ("" where none); packed images: list of N str
    source    the file (or procedural id) it came from
    start     first source frame of the clip
    is_image  True for an image (T = 1) and for a pack of independent images
    fps       frame rate of the clip (0 for images)

Joint image-video training packs 1 + t independent images into one sample (the paper's §4.1)
so that, once each image is encoded on its own, the sample has the latent shape of a video.

A corrupt, truncated, empty or too-short file is skipped: it is logged once by name, counted in
`dataset.skipped`, and the next readable item is returned in its place. A data set in which
nothing is readable stops with a :class:`WaltError`.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from walt_cli.data.video import (
    ClipTooShortError,
    VideoDecodeError,
    is_image,
    is_video,
    load_clip,
)
from walt_cli.errors import WaltError

log = logging.getLogger("walt.data")

SPLITS = ("train", "val")
HELDOUT = "heldout"  # shapes with data.shapes.holdout only: the held-out combinations alone


@dataclass(frozen=True)
class Entry:
    path: Path
    label: int = -1
    caption: str = ""


@dataclass(frozen=True)
class ClipSpec:
    """How a clip is cut out of a file."""

    num_frames: int = 17
    height: int = 128
    width: int = 128
    resize: int | None = None  # short side before cropping; None: the smallest that covers the crop
    frame_stride: int = 1
    fps: float | None = None
    random: bool = False  # random start and crop (training) instead of centred (validation)
    short: str = "skip"  # skip | loop | pad


def _held_out(path: str, fraction: float) -> bool:
    """A stable train/val assignment from the file name (the same on every machine)."""
    return (zlib.crc32(path.encode()) % 10_000) < fraction * 10_000


def _split(entries: list[Entry], split: str, val_fraction: float, root: Path) -> list[Entry]:
    if split not in SPLITS:
        raise WaltError(f"split must be one of {SPLITS}, got {split!r}")
    want_val = split == "val"
    return [
        e for e in entries if _held_out(str(e.path.relative_to(root)), val_fraction) == want_val
    ]


class ClipDataset(Dataset):
    """Clips cut from a list of files (videos or images), with corrupt files skipped and counted."""

    def __init__(
        self,
        entries: Sequence[Entry],
        spec: ClipSpec,
        *,
        class_names: Sequence[str] = (),
        name: str = "data",
        drop_unreadable: bool = False,
    ):
        self.entries = list(entries)
        # False: an unreadable file is replaced by the next readable one (training);
        # True: its item is None, for callers that must not duplicate clips (`tokenize encode`).
        self.drop_unreadable = drop_unreadable
        self.spec = spec
        self.class_names = list(class_names)
        self.name = name
        self.skipped: dict[str, str] = {}  # path -> reason, filled as files turn out unreadable
        if not self.entries:
            raise WaltError(f"{name}: no videos or images found")

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, entry: Entry, generator: torch.Generator | None = None) -> dict:
        s = self.spec
        image = is_image(entry.path)
        clip = load_clip(
            entry.path,
            num_frames=1 if image else s.num_frames,
            stride=s.frame_stride,
            fps=s.fps,
            start="random" if s.random else "center",
            size=s.resize if s.resize is not None else "cover",
            crop=(s.height, s.width),
            random_crop=s.random,
            short="error" if s.short == "skip" else s.short,
            generator=generator,
        )
        return {
            "video": clip.video,
            "label": entry.label,
            "caption": entry.caption,
            "source": str(entry.path),
            "start": clip.start,
            "is_image": image,
            "fps": clip.fps,
        }

    def __getitem__(self, index: int) -> dict | None:
        n = len(self.entries)
        if self.drop_unreadable:
            entry = self.entries[index]
            if str(entry.path) in self.skipped:
                return None
            try:
                return self.load(entry)
            except (VideoDecodeError, ClipTooShortError) as err:
                self.skipped[str(entry.path)] = str(err)
                log.warning("skipping %s", err)
                return None
        for k in range(n):
            entry = self.entries[(index + k) % n]
            key = str(entry.path)
            if key in self.skipped:
                continue
            try:
                return self.load(entry)
            except (VideoDecodeError, ClipTooShortError) as err:
                reason = str(err)
                self.skipped[key] = reason
                log.warning("skipping %s", reason)
        raise WaltError(
            f"{self.name}: none of its {n} files is readable (e.g. {next(iter(self.skipped.values()))})"
        )


# ---------------------------------------------------------------------------------------------
# Sources


def _find_split_dir(root: Path, split_dir: str | None) -> Path | None:
    if split_dir is not None:
        return Path(split_dir)
    for cand in (root, root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist"):
        if (cand / "classInd.txt").is_file():
            return cand
    return None


def folder_entries(
    root: str | Path,
    *,
    split: str = "train",
    fold: int = 1,
    split_dir: str | None = None,
    val_fraction: float = 0.05,
) -> tuple[list[Entry], list[str]]:
    """Files of a folder data set, and its class names.

    UCF-101 layout: `root/<Class>/<video>`, with `classInd.txt` and `trainlist0N.txt` /
    `testlist0N.txt` (found in `split_dir`, `root`, `root/ucfTrainTestlist` or beside `root`)
    deciding the classes and the split ("val" reads the test list). Without split files the
    classes are the sub-folder names (sorted) and a stable `val_fraction` of files is held out.
    Files directly in `root` (no class folders) are unlabelled.
    """
    root = Path(root)
    lists = _find_split_dir(root, split_dir)
    if lists is not None:
        classes = []
        for line in (lists / "classInd.txt").read_text().split("\n"):
            parts = line.split()
            if len(parts) >= 2:
                classes.append(parts[1])
        index = {c: i for i, c in enumerate(classes)}
        list_file = lists / f"{'trainlist' if split == 'train' else 'testlist'}{fold:02d}.txt"
        if not list_file.is_file():
            raise WaltError(f"{lists}: classInd.txt is there but {list_file.name} is not")
        entries = []
        for line in list_file.read_text().split("\n"):
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.replace("\\", "/").split("/")[0]
            if cls not in index:
                raise WaltError(f"{list_file}: class {cls!r} is not in classInd.txt")
            entries.append(Entry(root / rel, index[cls]))
        return entries, classes

    def media(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and (is_video(p) or is_image(p)))

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and media(p))
    entries = [Entry(p, -1) for p in media(root)]
    for i, c in enumerate(classes):
        entries += [Entry(p, i) for p in media(root / c)]
    return _split(entries, split, val_fraction, root), classes


def manifest_entries(
    path: str | Path, *, split: str = "train", val_fraction: float = 0.05
) -> tuple[list[Entry], list[str]]:
    """Rows of a CSV (with a header) or JSONL manifest: `path`, optional `caption`, optional `label`.

    Paths are relative to the manifest's folder. Labels may be integers or class names (mapped to
    indices in sorted order). An optional `split` column (train/val) overrides the held-out share.
    """
    path = Path(path)
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise WaltError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise WaltError(f"{path}: a manifest is .csv, .tsv or .jsonl")
    if rows and "path" not in rows[0]:
        raise WaltError(f"{path}: manifest has no 'path' column")
    raw_labels = [r.get("label") for r in rows]
    named = sorted(
        {str(x) for x in raw_labels if x not in (None, "") and not str(x).lstrip("-").isdigit()}
    )
    name_index = {c: i for i, c in enumerate(named)}
    base = path.parent
    entries, explicit = [], False
    for r in rows:
        lab = r.get("label")
        if lab in (None, ""):
            label = -1
        elif str(lab).lstrip("-").isdigit():
            label = int(lab)
        else:
            label = name_index[str(lab)]
        e = Entry(base / str(r["path"]), label, str(r.get("caption") or ""))
        if r.get("split"):
            explicit = True
            if r["split"] == split:
                entries.append(e)
        else:
            entries.append(e)
    if not explicit:
        entries = _split(entries, split, val_fraction, base)
    return entries, named


# ---------------------------------------------------------------------------------------------
# Joint image-video training


class PackedImages(Dataset):
    """Packs of `n` independent images, one sample each: video (3, n, H, W), per-image labels.

    Pack i holds images i*n ... i*n + n - 1 (wrapping), so an epoch sees every image once.
    """

    def __init__(self, images: ClipDataset, n: int):
        self.images, self.n = images, n
        self.skipped = images.skipped

    def __len__(self) -> int:
        return max(1, len(self.images) // self.n)

    def __getitem__(self, index: int) -> dict:
        items = [self.images[(index * self.n + k) % len(self.images)] for k in range(self.n)]
        return {
            "video": torch.cat([it["video"] for it in items], dim=1),
            "label": torch.tensor([it["label"] for it in items]),
            "caption": [it["caption"] for it in items],
            "source": ";".join(it["source"] for it in items),
            "start": 0,
            "is_image": True,
            "fps": 0.0,
        }


class JointDataset(Dataset):
    """Videos mixed with packed images: a stable `image_ratio` share of indices are image packs."""

    def __init__(self, videos: Dataset, packs: PackedImages, image_ratio: float):
        self.videos, self.packs, self.image_ratio = videos, packs, image_ratio
        self.skipped = {**getattr(videos, "skipped", {})}
        self._len = len(videos)

    def __len__(self) -> int:
        return self._len

    def is_pack(self, index: int) -> bool:
        return (zlib.crc32(index.to_bytes(8, "little")) % 10_000) < self.image_ratio * 10_000

    def __getitem__(self, index: int) -> dict:
        if self.is_pack(index):
            return self.packs[index % len(self.packs)]
        return self.videos[index]


def collate(items: list[dict]) -> dict:
    """Batch items; labels become (B,) or, where any sample is a pack of images, (B, N).

    A pack of N images is shorter than a video of T = 1 + 4k frames (N is the video's latent
    frame count): it is zero-padded in time to T, and `frames` (B,) holds each item's real frame
    count (`pack_frames` takes the padding off again)."""
    frames = [it["video"].shape[1] for it in items]
    longest = max(frames)
    video = torch.stack(
        [
            torch.nn.functional.pad(it["video"], (0, 0, 0, 0, 0, longest - f))
            for it, f in zip(items, frames, strict=True)
        ]
    )
    per_frame = any(isinstance(it["label"], torch.Tensor) for it in items)
    if per_frame:
        n = (
            video.shape[2]
            if all(it["is_image"] for it in items)
            else max(len(it["label"]) for it in items if isinstance(it["label"], torch.Tensor))
        )
        labels = torch.stack(
            [
                it["label"]
                if isinstance(it["label"], torch.Tensor)
                else torch.full((n,), it["label"])
                for it in items
            ]
        )
    else:
        labels = torch.tensor([it["label"] for it in items])
    return {
        "video": video,
        "label": labels,
        "caption": [it["caption"] for it in items],
        "source": [it["source"] for it in items],
        "start": torch.tensor([it["start"] for it in items]),
        "is_image": torch.tensor([bool(it["is_image"]) for it in items]),
        "frames": torch.tensor(frames),
        **(
            {"flip": torch.tensor([bool(it.get("flip")) for it in items])}
            if any("flip" in it for it in items)
            else {}
        ),
    }


def pack_frames(is_image: torch.Tensor, frames: torch.Tensor | None, total: int) -> int:
    """How many frames the packs of images in a batch really hold (the rest is padding)."""
    if frames is None or not bool(is_image.any()):
        return total
    counts = set(frames.cpu()[is_image.cpu()].tolist())
    if len(counts) != 1:
        raise WaltError(f"packs of {sorted(counts)} images in one batch; use one pack size")
    return int(counts.pop())


# ---------------------------------------------------------------------------------------------


def build_dataset(
    data, split: str = "train", *, augment: bool = True, drop_unreadable: bool = False
) -> Dataset:
    """The data set a recipe's `data` section describes (see walt_cli.config.DataConfig).

    `augment=False` turns off random crops and starts even for the training split (what
    `tokenize encode` needs: the same clip every time). `drop_unreadable=True` makes an
    unreadable video's item None instead of the next readable clip (no duplicates).
    `split="heldout"` (shapes with `data.shapes.holdout`): one-object scenes of the held-out
    (colour, shape, direction) triples, whole frames, for the text-adherence probe and FVD.
    """
    from walt_cli.config import check_data_paths
    from walt_cli.data.shapes import ShapesDataset

    check_data_paths(data)
    h, w = data.resolution
    if split == HELDOUT:
        if data.source != "shapes" or not data.shapes.holdout:
            raise WaltError(
                "split 'heldout' needs data.source=shapes and data.shapes.holdout=true "
                "(else training sees its combinations too)"
            )
    elif split not in SPLITS:
        raise WaltError(f"split must be one of {SPLITS}, got {split!r}")
    if data.source == "shapes":
        sh = data.shapes
        n_val = max(1, int(round(sh.num_items * data.val_fraction))) if data.val_fraction > 0 else 0
        # Validation draws its scenes from another seed, so it holds scenes training never sees;
        # "heldout" has as many items as training, one object each, HELD_OUT[i % 40] on item i.
        seed = sh.seed + {"train": 0, "val": 1_000_003, HELDOUT: 2_000_003}[split]
        combinations = HELDOUT if split == HELDOUT else "seen" if sh.holdout else "all"
        videos: Dataset = ShapesDataset(
            combinations=combinations,
            num_items=sh.num_items if split != "val" else max(n_val, 1),
            num_frames=data.num_frames,
            height=h,
            width=w,
            seed=seed,
            max_objects=sh.max_objects,
            fps=sh.fps,
            # Held-out scenes are evaluated whole, never as crops of larger renders.
            render_sizes=None if split == HELDOUT else sh.render_sizes,
            random_crop=bool(augment and data.random_crop and split == "train"),
        )
    else:
        if data.source == "folder":
            entries, classes = folder_entries(
                data.path,
                split=split,
                fold=data.fold,
                split_dir=data.split_dir,
                val_fraction=data.val_fraction,
            )
        else:
            entries, classes = manifest_entries(
                data.path, split=split, val_fraction=data.val_fraction
            )
        videos = ClipDataset(
            entries,
            _clip_spec(data, split, augment),
            class_names=classes,
            name=f"{data.path} ({split})",
            drop_unreadable=drop_unreadable,
        )
    if data.images is None or data.image_ratio == 0 or split == HELDOUT:
        return videos
    img_path = Path(data.images)
    if img_path.is_dir():
        entries, classes = folder_entries(img_path, split=split, val_fraction=data.val_fraction)
    else:
        entries, classes = manifest_entries(img_path, split=split, val_fraction=data.val_fraction)
    spec = _clip_spec(data, split, augment)
    images = ClipDataset(
        [e for e in entries if is_image(e.path)],
        spec,
        class_names=classes,
        name=f"{data.images} ({split})",
    )
    n = data.images_per_sample or 1 + (data.num_frames - 1) // 4
    packs = PackedImages(images, n)
    if data.image_ratio >= 1.0:
        return packs
    return JointDataset(videos, packs, data.image_ratio)


def _clip_spec(data, split: str, augment: bool = True) -> ClipSpec:
    h, w = data.resolution
    return ClipSpec(
        num_frames=data.num_frames,
        height=h,
        width=w,
        resize=data.resize,
        frame_stride=data.frame_stride,
        fps=data.fps,
        random=bool(augment and data.random_crop and split == "train"),
        short=data.short_clips,
    )
