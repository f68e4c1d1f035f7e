"""`data.clips_per_video`: `tokenize encode` writes K random windows (with horizontal flips) of
each training video, the same on every run; the val split keeps one centred clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from walt_cli.data.clips import clips_per_video
from walt_cli.data.datasets import build_dataset
from walt_cli.data.video import write_video
from walt_cli.errors import WaltError


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of two 24-frame 40x48 videos whose pixels encode their frame index."""
    root = tmp_path_factory.mktemp("ucf")
    rng = np.random.default_rng(0)
    for cls in ("A", "B"):
        (root / cls).mkdir()
        for i in range(2):
            base = rng.integers(0, 200, (1, 40, 48, 3))
            frames = np.concatenate([base + 2 * t for t in range(24)]).astype(np.uint8)
            write_video(root / cls / f"v{i}.mp4", frames, fps=8)
    return root


def data_section(folder: Path, k: int):
    from training_helpers import tiny

    return tiny(folder.parent / "r", "data.source=folder", f"data.path={folder}",
                "data.val_fraction=0", f"data.clips_per_video={k}").data  # fmt: skip


def test_k_clips_per_video_are_random_windows_and_deterministic(folder: Path):
    data = data_section(folder, 3)
    base = build_dataset(data, "train", augment=False, drop_unreadable=True)
    clips = clips_per_video(base, 3, seed=0)
    assert len(clips) == 3 * len(base)
    items = [clips[i] for i in range(len(clips))]
    per_video = [items[3 * v : 3 * v + 3] for v in range(len(base))]
    for group in per_video:
        assert len({it["source"] for it in group}) == 1
    starts = {(it["start"], it["flip"]) for it in items}
    assert len(starts) > len(base)  # windows and flips vary within videos
    assert any(it["flip"] for it in items) and not all(it["flip"] for it in items)
    again = clips_per_video(build_dataset(data, "train", augment=False, drop_unreadable=True), 3, 0)
    for i, it in enumerate(items):
        assert torch.equal(it["video"], again[i]["video"])  # the same clips on every run
    assert clips_per_video(base, 1, seed=0) is base


def test_shapes_has_no_windows():
    from training_helpers import TINY

    from walt_cli.config import load_recipe

    data = load_recipe(TINY).data
    with pytest.raises(WaltError, match="data.clips_per_video"):
        clips_per_video(build_dataset(data, "train", augment=False), 2, seed=0)
