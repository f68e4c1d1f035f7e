"""What `walt data preview` shows: samples exactly as the model gets them, and a summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from walt_cli.data.datasets import build_dataset
from walt_cli.data.video import contact_sheet, tile_videos, write_image, write_video


@dataclass
class PreviewSummary:
    recipe: str
    source: str
    split: str
    items: int
    shown: int
    resolution: tuple[int, int]
    frames: int
    fps: float
    images: int  # samples that are images or packs of images
    class_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    scanned: bool = False


def preview_dataset(
    cfg, out: Path, *, split: str = "train", num: int = 8, scan: bool = False
) -> PreviewSummary:
    """Draw `num` samples of the recipe's data set into `out` (.gif/.mp4 grid or .png sheet)."""
    ds = build_dataset(cfg.data, split)
    n = min(num, len(ds))
    # Evenly spaced items: a folder data set sorted by class shows several classes, not one.
    picks = torch.linspace(0, len(ds) - 1, n).round().long().tolist() if n > 1 else [0]
    items = [ds[i] for i in picks]
    if scan:
        from walt_cli.console import progress

        with progress() as bar:
            for i in bar.track(range(len(ds)), description="decoding every item"):
                ds[i]
    videos = [it["video"] for it in items]
    fps = next((it["fps"] for it in items if it["fps"] > 0), 8.0)
    out = Path(out)
    if out.suffix.lower() == ".png":
        write_image(out, contact_sheet(videos))
    else:
        write_video(out, tile_videos(torch.stack(videos)), fps=fps)
    captions = []
    for it in items:
        cap = it["caption"]
        captions.append(" | ".join(cap) if isinstance(cap, list) else cap)
    labels = [
        int(it["label"].flatten()[0]) if isinstance(it["label"], torch.Tensor) else int(it["label"])
        for it in items
    ]
    return PreviewSummary(
        recipe=cfg.name,
        source=cfg.data.source
        if cfg.data.source == "shapes"
        else f"{cfg.data.source}: {cfg.data.path}",
        split=split,
        items=len(ds),
        shown=n,
        resolution=tuple(videos[0].shape[-2:]),
        frames=videos[0].shape[1],
        fps=fps,
        images=sum(bool(it["is_image"]) for it in items),
        class_names=list(getattr(ds, "class_names", [])),
        captions=[c for c in captions if c],
        labels=labels,
        skipped=dict(getattr(ds, "skipped", {})),
        scanned=scan,
    )


def summary_table(s: PreviewSummary):
    from rich.table import Table

    t = Table(title=f"data: {s.recipe} ({s.split})", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", s.source)
    t.add_row("items", f"{s.items} ({s.shown} shown, {s.images} of them images)")
    t.add_row("clip", f"{s.frames} frames x {s.resolution[0]}x{s.resolution[1]} at {s.fps:g} fps")
    if s.class_names:
        named = ", ".join(s.class_names[:6]) + (", ..." if len(s.class_names) > 6 else "")
        t.add_row("classes", f"{len(s.class_names)}: {named}")
        shown = [s.class_names[i] if 0 <= i < len(s.class_names) else "-" for i in s.labels]
        t.add_row("shown labels", ", ".join(shown))
    for i, cap in enumerate(s.captions[:4]):
        t.add_row("captions" if i == 0 else "", cap)
    where = "of all items" if s.scanned else "among those read (--scan reads all)"
    t.add_row("skipped", f"{len(s.skipped)} unreadable {where}")
    for path, reason in list(s.skipped.items())[:5]:
        t.add_row("", reason if reason.startswith(path) else f"{path}: {reason}")
    return t
