"""Data sets: UCF-101 layout with and without split files, manifests, images and packing,
and corrupt files skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from walt_cli.config import load_recipe
from walt_cli.data.datasets import (
    ClipDataset,
    ClipSpec,
    Entry,
    PackedImages,
    build_dataset,
    collate,
    folder_entries,
    manifest_entries,
)
from walt_cli.data.shapes import ShapesDataset
from walt_cli.data.video import tensor_to_frames, write_image, write_video
from walt_cli.errors import WaltError

REPO = Path(__file__).resolve().parent.parent
SPEC = ClipSpec(num_frames=5, height=16, width=16)


def _clip(seed: int, frames: int = 9) -> torch.Tensor:
    return ShapesDataset(num_items=1, num_frames=frames, height=24, width=32, seed=seed)[0]["video"]


@pytest.fixture()
def ucf(tmp_path: Path) -> Path:
    """A miniature UCF-101: two classes, split files in ucfTrainTestlist/ beside the videos."""
    root = tmp_path / "UCF-101"
    for c, cls in enumerate(["Archery", "Bowling"]):
        for g in range(3):
            write_video(root / cls / f"v_{cls}_g0{g}_c01.mp4", _clip(10 * c + g), fps=8)
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\n2 Bowling\n")
    (lists / "trainlist01.txt").write_text(
        "Archery/v_Archery_g00_c01.mp4 1\nArchery/v_Archery_g01_c01.mp4 1\nBowling/v_Bowling_g00_c01.mp4 2\n"
    )
    (lists / "testlist01.txt").write_text("Bowling/v_Bowling_g02_c01.mp4\n")
    return root


def test_ucf_layout_uses_split_files(ucf: Path):
    train, classes = folder_entries(ucf, split="train")
    val, _ = folder_entries(ucf, split="val")
    assert classes == ["Archery", "Bowling"]
    assert [e.label for e in train] == [0, 0, 1]
    assert [e.path.name for e in val] == ["v_Bowling_g02_c01.mp4"] and val[0].label == 1


def test_folder_without_split_files_uses_folder_names(ucf: Path):
    (ucf.parent / "ucfTrainTestlist" / "classInd.txt").unlink()
    train, classes = folder_entries(ucf, split="train", val_fraction=0.3)
    val, _ = folder_entries(ucf, split="val", val_fraction=0.3)
    assert classes == ["Archery", "Bowling"]
    assert len(train) + len(val) == 6 and not {e.path for e in train} & {e.path for e in val}
    assert {e.label for e in train + val} == {0, 1}


def test_recipe_builds_a_folder_dataset(ucf: Path, tmp_path: Path):
    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml",
        [
            "data.source=folder",
            f"data.path={ucf}",
            "data.num_frames=5",
            "data.resolution=[16,16]",
            f"run_dir={tmp_path}",
        ],
    )
    ds = build_dataset(recipe.data, "train")
    item = ds[2]
    assert item["video"].shape == (3, 5, 16, 16) and item["label"] == 1
    batch = collate([ds[0], ds[2]])
    assert batch["video"].shape == (2, 3, 5, 16, 16) and batch["label"].tolist() == [0, 1]


def test_manifest_csv_and_jsonl(tmp_path: Path):
    write_video(tmp_path / "a.mp4", _clip(1), fps=8)
    write_video(tmp_path / "b.mp4", _clip(2), fps=8)
    write_image(tmp_path / "c.png", tensor_to_frames(_clip(3, 1))[0])
    (tmp_path / "m.csv").write_text(
        "path,caption,label,split\na.mp4,a dog,dog,train\nb.mp4,a cat,cat,train\nc.png,a bird,bird,val\n"
    )
    train, names = manifest_entries(tmp_path / "m.csv", split="train")
    assert names == ["bird", "cat", "dog"]
    assert [(e.path.name, e.caption, e.label) for e in train] == [
        ("a.mp4", "a dog", 2),
        ("b.mp4", "a cat", 1),
    ]
    rows = [
        {"path": "a.mp4", "caption": "first"},
        {"path": "c.png", "caption": "still", "label": 4},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries, _ = manifest_entries(tmp_path / "m.jsonl", val_fraction=0.0)
    ds = ClipDataset(entries, SPEC)
    image = ds[1]
    assert image["is_image"] and image["video"].shape == (3, 1, 16, 16) and image["label"] == 4
    assert ds[0]["video"].shape == (3, 5, 16, 16) and ds[0]["caption"] == "first"
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n{oops\n')
    with pytest.raises(WaltError, match="bad.jsonl:2: not valid JSON"):
        manifest_entries(tmp_path / "bad.jsonl")


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path, caplog):
    write_video(tmp_path / "good.mp4", _clip(1), fps=8)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.avi").write_bytes(b"\x00garbage" * 300)
    good = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 4])
    write_video(tmp_path / "short.mp4", _clip(2, frames=3), fps=8)
    entries = [
        Entry(tmp_path / n)
        for n in ("empty.mp4", "noise.avi", "truncated.mp4", "short.mp4", "good.mp4")
    ]
    ds = ClipDataset(entries, SPEC, name="mixed")
    items = [ds[i] for i in range(len(ds))]
    assert all(it["source"].endswith("good.mp4") for it in items)
    assert set(ds.skipped) == {
        str(tmp_path / n) for n in ("empty.mp4", "noise.avi", "truncated.mp4", "short.mp4")
    }
    assert (
        sum("skipping" in r.message and "empty.mp4" in r.getMessage() for r in caplog.records) == 1
    )


def test_nothing_readable_is_a_clear_error(tmp_path: Path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.mp4").write_bytes(b"junk" * 10)
    ds = ClipDataset([Entry(tmp_path / "a.mp4"), Entry(tmp_path / "b.mp4")], SPEC, name="broken")
    with pytest.raises(WaltError, match="broken: none of its 2 files is readable"):
        ds[0]


def test_packed_images_and_joint_batches(tmp_path: Path):
    for i in range(6):
        write_image(tmp_path / f"img{i}.png", tensor_to_frames(_clip(i, 1))[0])
    images = ClipDataset(
        [Entry(tmp_path / f"img{i}.png", label=i, caption=f"image {i}") for i in range(6)], SPEC
    )
    packs = PackedImages(images, 3)
    assert len(packs) == 2
    pack = packs[1]
    assert pack["video"].shape == (3, 3, 16, 16) and pack["is_image"]
    assert pack["label"].tolist() == [3, 4, 5] and pack["caption"] == [
        "image 3",
        "image 4",
        "image 5",
    ]
    assert torch.equal(pack["video"][:, 1:2], images[4]["video"])  # each frame is its own image
    video = {
        "video": torch.zeros(3, 3, 16, 16),
        "label": 7,
        "caption": "v",
        "source": "v",
        "start": 0,
        "is_image": False,
    }
    batch = collate([video, pack])
    assert batch["label"].tolist() == [[7, 7, 7], [3, 4, 5]]
    assert batch["is_image"].tolist() == [False, True]


def test_shapes_splits_are_disjoint():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    train, val = build_dataset(recipe.data, "train"), build_dataset(recipe.data, "val")
    assert len(train) == recipe.data.shapes.num_items and len(val) >= 1
    assert val[0]["caption"] not in {train[i]["caption"] for i in range(len(train))}
    with pytest.raises(WaltError, match="split must be one of"):
        build_dataset(recipe.data, "test")


def test_collate_pads_packs_of_images_to_the_video_length():
    """A pack of N images sits in a batch with T-frame videos: zero-padded in time, its real
    length in `frames`, and `pack_frames` takes the padding off again."""
    from walt_cli.data.datasets import collate, pack_frames

    video = {
        "video": torch.rand(3, 9, 8, 8),
        "label": 4,
        "caption": "v",
        "source": "a",
        "start": 0,
        "is_image": False,
    }
    pack = {"video": torch.rand(3, 3, 8, 8), "label": torch.tensor([1, 2, 3]), "caption": ["x"] * 3,
            "source": "b", "start": 0, "is_image": True}  # fmt: skip
    batch = collate([video, pack])
    assert batch["video"].shape == (2, 3, 9, 8, 8)
    assert batch["frames"].tolist() == [9, 3]
    assert batch["label"].tolist() == [[4, 4, 4], [1, 2, 3]]
    torch.testing.assert_close(batch["video"][1, :, :3], pack["video"])
    assert not batch["video"][1, :, 3:].any()
    assert pack_frames(batch["is_image"], batch["frames"], 9) == 3
    assert pack_frames(torch.tensor([False, False]), batch["frames"], 9) == 9
