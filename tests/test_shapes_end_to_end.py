"""The shapes recipe end to end on CPU, through the command line: `walt tokenize train`, then
`tokenize encode` (with MiniLM caption states), `train-base`, `tokenize encode --sr 1` and
`train-sr --stage 1`. Slow (several minutes on 2 cores): `make test-all`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "recipes" / "shapes.yaml"


@pytest.mark.slow
def test_shapes_recipe_tokenize_encode_train_base_and_sr(cli, tmp_path: Path):
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
        ("tokenize", "encode", SHAPES, *common, "--sr", "1", "--no-progress"),
        ("tokenize", "encode", SHAPES, *common, "--sr", "1", "--split", "val", "--no-progress"),
        ("train-sr", SHAPES, *common, "--stage", "1", "sr.0.batch_size=4", "sr.0.max_steps=20",
         "sr.0.warmup_steps=5", "sr.0.preview_every=20", "sr.0.preview_steps=5",
         "sr.0.preview_samples=2", "--no-progress"),
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
        # frame prediction is on: real clips beside their continuations, with their captions
        assert about["mode"] == "frames" and len(about["tiles"]) == 4
        assert all(t["caption"] for t in about["tiles"])
    from walt_cli.data.video import read_frames

    frames, _ = read_frames(base / "previews" / "step-0000200.mp4")
    # 5 latent frames decode to 17; 4 rows of (real | continuation) 64x64 tiles, 2-pixel gaps
    assert frames.shape[0] == 17 and frames.shape[1] >= 4 * 66 - 2 and frames.shape[2] >= 2 * 66 - 2

    from walt_cli.models.transformer import WALT

    sr = tmp_path / "shapes" / "sr1"
    net = WALT.from_checkpoint(sr / "sr1.safetensors")
    assert net.checkpoint_extra["resolution"] == [128, 128] and net.text_dim == 384
    with open(sr / "metrics.csv", newline="") as f:
        sr_losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(sr_losses) == 5 and all(0 < v < 10 for v in sr_losses)  # steps 1, 5, ..., 20
    frames, _ = read_frames(sr / "previews" / "step-0000020.mp4")
    # 2 rows of low-res (upsampled) | SR | truth at 128x128
    assert (
        frames.shape[0] == 17 and frames.shape[1] >= 2 * 130 - 2 and frames.shape[2] >= 3 * 130 - 2
    )
