"""The shapes recipe end to end on CPU, through the command line: `walt tokenize train`, then
`tokenize encode`, then `train-base`. Slow (a few minutes on 2 cores): `make test-all`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "recipes" / "shapes.yaml"


@pytest.mark.slow
def test_shapes_recipe_tokenize_encode_train_base(cli, tmp_path: Path):
    common = [
        f"run_dir={tmp_path}/shapes",
        "data.shapes.num_items=64",
        "data.batch_size=4",
        "trainer.num_workers=0",
        "trainer.log_every=5",
    ]
    steps = [
        ("tokenize", "train", SHAPES, *common, "tokenizer.max_steps=10", "tokenizer.warmup_steps=5",
         "tokenizer.val_every=20", "tokenizer.val_batches=1", "--no-progress"),
        ("tokenize", "encode", SHAPES, *common, "--no-progress"),
        ("tokenize", "encode", SHAPES, *common, "--split", "val", "--no-progress"),
        # The recipe's model at half depth and 2/3 width, so that 200 steps take minutes.
        ("train-base", SHAPES, *common, "data.batch_size=8", "base.depth=4", "base.width=128",
         "base.heads=4", "base.lr=0.002", "base.max_steps=200", "base.warmup_steps=20",
         "base.preview_every=100", "base.preview_steps=10", "base.preview_samples=4",
         "--no-progress"),
    ]  # fmt: skip
    for args in steps:
        result = cli(*args)
        assert result.exit_code == 0, f"{args[:2]}: {result.output}"

    base = tmp_path / "shapes" / "base"
    with open(base / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 41  # step 1, then every 5 steps to 200
    # v-prediction MSE starts at 1 (v is independent of z_t for unstructured data) and falls as
    # far as the latents have structure: early training takes off about a tenth.
    first, last = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert last < 0.95 * first, f"the base loss did not fall: {first:.3f} -> {last:.3f}"
    for step in (100, 200):
        video = base / "previews" / f"step-{step:07d}.mp4"
        assert video.is_file() and video.stat().st_size > 1000
        about = json.loads(video.with_suffix(".json").read_text())
        assert about["mode"] == "class" and len(about["tiles"]) == 4
    from walt_cli.data.video import read_frames

    frames, _ = read_frames(base / "previews" / "step-0000200.mp4")
    # 5 latent frames decode to 17; four 64x64 tiles in a row, 2-pixel gaps (mp4 pads, never scales)
    assert frames.shape[0] == 17 and frames.shape[1] >= 64 and frames.shape[2] >= 4 * 66 - 2
