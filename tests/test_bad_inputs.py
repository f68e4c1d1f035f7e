"""Every malformed input is one line on stderr and exit code 2, never a traceback, and leaves
the input files as they were: recipe keys out of range, bogus trainer keys, broken recipes,
damaged run files (checkpoint, shards, statistics, index) and bad command options.

Recipe cases run with `--print-config`, so a value that slipped through validation would exit 0
and fail the test instead of starting a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import TINY

from walt_cli.data.latents import combine_stats, read_shard_info, write_shard
from walt_cli.data.video import write_video

# (override, what the message names): each is refused by `train-base` and `tokenize train`.
RECIPE_KEYS = [
    ("tokenizer.lr=-0.001", "tokenizer.lr"),
    ("tokenizer.lr=0", "tokenizer.lr"),
    ("base.lr=0", "base.lr"),
    ("base.lr=-1", "base.lr"),
    ("base.weight_decay=-1", "base.weight_decay"),
    ("base.grad_clip=-1", "base.grad_clip"),
    ("base.accumulate_grad_batches=0", "base.accumulate_grad_batches"),
    ("tokenizer.grad_clip=-0.5", "tokenizer.grad_clip"),
    ("base.betas=[0.9,1.5]", "base.betas"),
    ("tokenizer.betas=[-0.1,0.9]", "tokenizer.betas"),
    ("base.betas=[0.9]", "base.betas"),
    ("tokenizer.recon_weight=-1", "tokenizer.recon_weight"),
    ("tokenizer.gan_weight=-0.1", "tokenizer.gan_weight"),
    ("tokenizer.r1_weight=-1", "tokenizer.r1_weight"),
    ("tokenizer.lecam_weight=-1", "tokenizer.lecam_weight"),
    ("tokenizer.perceptual_weight=-2", "tokenizer.perceptual_weight"),
    ("tokenizer.disc_lr=0", "tokenizer.disc_lr"),
    ("tokenizer.lecam_decay=1.0", "tokenizer.lecam_decay"),
    ("tokenizer.disc_start=-1", "tokenizer.disc_start"),
    ("tokenizer.disc_multipliers=[0]", "tokenizer.disc_channels"),
    ("tokenizer.ema_decay=1.0", "tokenizer.ema_decay"),
    ("tokenizer.max_steps=0", "tokenizer.max_steps"),
    ("tokenizer.r1_every=0", "tokenizer.r1_every"),
    ("tokenizer.recon_loss=l3", "tokenizer.recon_loss"),
    ("tokenizer.perceptual=vgg", "tokenizer.perceptual"),
    ("tokenizer.preset=huge", "tokenizer.preset"),
    ("base.min_lr_ratio=2", "base.min_lr_ratio"),
    ("tokenizer.min_lr_ratio=-0.1", "tokenizer.min_lr_ratio"),
    ("base.ema_decay=1.0", "base.ema_decay"),
    ("base.p_self_cond=1.5", "base.p_self_cond"),
    ("base.p_frame_pred=-0.1", "base.p_frame_pred"),
    ("base.num_cond_frames=[0]", "base.num_cond_frames"),
    ("base.guidance_scale=-1", "base.guidance_scale"),
    ("base.optimizer=sgd", "base.optimizer"),
    ("base.bias_init=alibi", "base.bias_init"),
    ("base.pos_init=rope", "base.pos_init"),
    ("base.time_shift=0", "base.time_shift"),
    ("base.preset=huge", "base.preset"),
    ("base.max_steps=0", "base.max_steps"),
    ("base.depth=0", "base.depth"),
    ("base.spatial_window=[4]", "base.spatial_window"),
    ("base.num_classes=-1", "base.num_classes"),
    ("trainer.precision=bf16-true", "trainer.precision"),
    ("trainer.precision=16-true", "trainer.precision"),
    ("trainer.precision=banana", "trainer.precision"),
    ("trainer.accelerator=quantum", "trainer.accelerator"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=[-1]", "trainer.devices"),
    ("trainer.devices=many", "trainer.devices"),
    ("trainer.strategy=bogus", "trainer.strategy"),
    ("trainer.strategy=deepspeed", "trainer.strategy"),
    ("trainer.fsdp_checkpoint=folder", "trainer.fsdp_checkpoint"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.num_workers=-1", "trainer.num_workers"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every"),
    ("data.num_frames=8", "data.num_frames"),
    ("data.resolution=[30,32]", "data.resolution"),
    ("data.clips_per_video=0", "data.clips_per_video"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.image_ratio=0.5", "data.image_ratio"),
    ("data.source=web", "data.source"),
    ("data.val_fraction=1", "data.val_fraction"),
    ("base.foo=1", "unknown key 'base.foo'"),
    ("base.lr=abc", "base.lr"),
    ("base.lr", "not of the form key.path=value"),
]


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (what must not change)."""
    out = {}
    for root in paths:
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert message in err, err


@pytest.mark.parametrize(("override", "message"), RECIPE_KEYS, ids=[k for k, _ in RECIPE_KEYS])
def test_recipe_values_out_of_range(cli, tmp_path: Path, override: str, message: str):
    recipe = tmp_path / "r.yaml"
    shutil.copy(TINY, recipe)
    before = snapshot(recipe)
    command = ["tokenize", "train"] if override.startswith("tokenizer") else ["train-base"]
    result = cli(*command, recipe, f"run_dir={tmp_path}/run", override, "--print-config")
    assert_one_line_error(result, message)
    assert snapshot(recipe) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "a recipe is a YAML mapping"),
        ("data: [unclosed\n", "not valid YAML"),
        ("colours: 3\n", "unknown key 'colours'"),
        ("data:\n  num_frames: many\n", "data.num_frames"),
        (
            "data:\n  num_frames: 9\nbase:\n  p_frame_pred: 0.5\n  num_cond_frames: [3]\n",
            "leaves nothing to predict",
        ),
    ],
    ids=["empty", "list", "bad-yaml", "unknown-section", "wrong-type", "cond-frames-vs-data"],
)
@pytest.mark.parametrize("command", ["train-base", "tokenize train", "tokenize encode"])
def test_broken_recipes(cli, tmp_path: Path, text: str, message: str, command: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    before = snapshot(recipe)
    result = cli(*command.split(), recipe, "--print-config")
    assert_one_line_error(result, message)
    assert snapshot(recipe) == before


def test_missing_recipe(cli, tmp_path: Path):
    assert_one_line_error(cli("train-base", tmp_path / "nope.yaml"), "recipe not found")


# ---------------------------------------------------------------------------------------------
# Damaged run files


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """A valid latent folder (train split) of 4 tiny clips: (8, 3, 4, 4) latents, 40 classes."""
    folder = tmp_path_factory.mktemp("lat") / "latents" / "train"
    folder.mkdir(parents=True)
    rows = [{"shard": 0, "row": i, "label": i, "caption": "", "source": f"v{i}", "start": 0,
             "frames": 9, "is_image": False} for i in range(4)]  # fmt: skip
    write_shard(folder / "shard-00000.safetensors", torch.randn(4, 8, 3, 4, 4), rows,
                tokenizer="0123456789abcdef")  # fmt: skip
    info = read_shard_info(folder / "shard-00000.safetensors")
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in info.rows))
    (folder / "stats.json").write_text(json.dumps(combine_stats([info])))
    return folder.parent


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "truncated-shard": ("train/shard-00000.safetensors", _truncate, "not a readable latent shard"),
    "missing-shard": ("train/shard-00000.safetensors", Path.unlink, "shard-00000.safetensors"),
    "truncated-stats": ("train/stats.json", _truncate, "not a readable latent statistics file"),
    "stats-not-a-mapping": ("train/stats.json", lambda p: p.write_text("[1, 2]"),
                            "not a readable latent statistics file"),
    "garbage-index": ("train/index.jsonl", lambda p: p.write_text("{not json\n"),
                      "not a readable latent index"),
    "index-without-keys": ("train/index.jsonl", lambda p: p.write_text('{"label": 1}\n'),
                           "not a readable latent index"),
    "empty-index": ("train/index.jsonl", lambda p: p.write_text(""), "index.jsonl: empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latent_files(cli, tmp_path: Path, latents: Path, case: str):
    name, damage, message = DAMAGE[case]
    folder = tmp_path / "latents"
    shutil.copytree(latents, folder)
    damage(folder / name)
    before = snapshot(folder)
    result = cli("train-base", TINY, f"run_dir={tmp_path}/run", f"base.latents={folder}",
                 "base.preview_every=0", "base.max_steps=1", "--no-progress")  # fmt: skip
    assert_one_line_error(result, message)
    assert snapshot(folder) == before


def test_latents_of_another_length_than_the_recipe(cli, tmp_path: Path, latents: Path):
    result = cli("train-base", TINY, f"run_dir={tmp_path}/run", f"base.latents={latents}",
                 "base.preview_every=0", "data.num_frames=17", "--no-progress")  # fmt: skip
    assert_one_line_error(result, "give (5, 4, 4)")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a readable training checkpoint"),  # truncated
        (b"not a checkpoint", "not a readable training checkpoint"),
        ("foreign", "does not fit"),
    ],
    ids=["truncated", "junk", "foreign"],
)
def test_damaged_last_checkpoint(cli, tmp_path: Path, latents: Path, content, message):
    stage = tmp_path / "run" / "base"
    args = ("train-base", TINY, f"run_dir={tmp_path}/run", f"base.latents={latents}",
            "base.preview_every=0", "base.max_steps=1", "--no-progress")  # fmt: skip
    if content is None:
        assert cli(*args).exit_code == 0
        _truncate(stage / "last.ckpt")
    elif content == "foreign":  # a checkpoint of something else
        stage.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "global_step": 0,
                    "pytorch-lightning_version": "2.6.6", "loops": {}}, stage / "last.ckpt")  # fmt: skip
        message = "last.ckpt"
    else:
        stage.mkdir(parents=True)
        (stage / "last.ckpt").write_bytes(content)
    before = snapshot(stage / "last.ckpt")
    result = cli(*args[:-2], "base.max_steps=2", "--no-progress")
    assert_one_line_error(result, message)
    assert snapshot(stage / "last.ckpt") == before


def test_run_dir_that_is_a_file(cli, tmp_path: Path):
    (tmp_path / "run").write_text("a file")
    result = cli("train-base", TINY, f"run_dir={tmp_path}/run", "--no-progress")
    assert_one_line_error(result, "is a file")
    assert (tmp_path / "run").read_text() == "a file"


# ---------------------------------------------------------------------------------------------
# Command options and output paths


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    frames = (np.random.default_rng(0).random((9, 32, 32, 3)) * 255).astype(np.uint8)
    return write_video(tmp_path_factory.mktemp("clip") / "c.mp4", frames, fps=8)


def _read_only(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o555)
    return folder


@pytest.mark.parametrize(
    "case",
    ["out-is-input", "json-is-input", "negative-fps", "read-only-out", "json-under-a-file",
     "out-is-a-folder", "missing-video"],
)  # fmt: skip
def test_reconstruct_options(cli, tmp_path: Path, clip: Path, case: str):
    if os.geteuid() == 0 and case.startswith("read-only"):
        pytest.skip("root writes into read-only folders")
    base = ["tokenize", "reconstruct", "--preset", "tiny", "--frames", "9", "--size", "32"]
    args, message = {
        "out-is-input": (["--out", str(clip)], "is the input"),
        "json-is-input": (["--json", str(clip)], "is the input"),
        "negative-fps": (["--fps", "-5"], "--fps -5: must be positive"),
        "read-only-out": (["--out", str(_read_only(tmp_path) / "o.mp4")], "is not writable"),
        "json-under-a-file": (["--json", str(clip.parent / "c.mp4" / "m.json")],
                              "is a file, not a folder"),
        "out-is-a-folder": (["--out", str(tmp_path)], "unsupported format"),
        "missing-video": (["--out", str(tmp_path / "o.mp4"), str(tmp_path / "none.mp4")],
                          "none.mp4: no such file"),
    }[case]  # fmt: skip
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "o.mp4")]
    before = snapshot(clip)
    result = cli(*base, *args, clip)
    assert_one_line_error(result, message)
    assert snapshot(clip) == before and not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--repeats", "0"], "--repeats 0: must be >= 1"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "toaster"], "not a torch device"),
        (["--classify", "CLIP"], "--classify takes one video"),
        (["--json", "DIR"], "is the input"),
    ],
    ids=["batch-size-0", "repeats-0", "cuda-absent", "bad-device", "classify-with-sets",
         "json-is-input"],
)  # fmt: skip
def test_eval_fvd_options(cli, tmp_path: Path, clip: Path, args, message):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [{"CLIP": str(clip), "DIR": str(clip.parent)}.get(a, a) for a in args]
    before = snapshot(clip)
    result = cli("eval-fvd", "--real", clip.parent, "--fake", clip.parent, *args)
    assert_one_line_error(result, message)
    assert snapshot(clip) == before


def test_encode_split_and_device(cli, tmp_path: Path):
    r = cli("tokenize", "encode", TINY, f"run_dir={tmp_path}/run", "--split", "test")
    assert_one_line_error(r, "--split 'test'")
