"""The base model and an SR stage under `trainer.strategy=fsdp` on 2 gloo processes (CPU),
started as torchrun starts them (ranks from the environment): training with activation
checkpointing per block, previews that every rank takes part in, checkpoints (full and sharded)
that resume, an EMA that follows the shards, and exported weights that load into a full
model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from test_base_training import encoded
from test_sr_training import sr_encoded
from training_helpers import read_metrics, run_ranks, tiny

from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT
from walt_cli.runio import torch_load
from walt_cli.systems.base import train_base
from walt_cli.systems.sr import train_sr
from walt_cli.systems.tokenizer import train_tokenizer

RANKS = ["trainer.devices=2", "trainer.accelerator=cpu"]
FSDP = [*RANKS, "trainer.strategy=fsdp"]
# Every parameter takes part in every step (no image packs).
COMMON = ["base.preview_every=0", "trainer.checkpoint_every=1", "data.image_ratio=0"]


def train(tmp_path: Path, *overrides: str) -> None:
    """The tiny base trained by 2 ranks under `overrides`."""
    run_ranks(partial(train_base, progress=False), tiny(tmp_path, *overrides))


def test_tokenizer_refuses_fsdp(tmp_path: Path):
    with pytest.raises(WaltError, match="the tokenizer trains with ddp"):
        train_tokenizer(tiny(tmp_path, *FSDP), progress=False)
    assert not (tmp_path / "run").exists()


def _weights(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_base_fsdp_trains_previews_checkpoints_resumes_and_exports(tmp_path: Path):
    steps = [*FSDP, *COMMON, "base.preview_every=2", "base.gradient_checkpointing=true"]
    encoded(tmp_path, *COMMON)
    train(tmp_path, *steps, "base.max_steps=2")
    stage = tmp_path / "run" / "base"
    first = torch_load(stage / "last.ckpt")
    assert int(first["state_dict"]["step"]) == 2
    previews = sorted(p.name for p in (stage / "previews").iterdir())
    assert previews == ["step-0000002.json", "step-0000002.mp4"]  # written once, by rank zero

    train(tmp_path, *steps, "base.max_steps=4")  # resumes at step 2
    ckpt = torch_load(stage / "last.ckpt")
    assert int(ckpt["state_dict"]["step"]) == 4
    rows = read_metrics(stage / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]  # each step once

    # The checkpoint holds full (gathered) tensors of the net and of its EMA.
    net = _weights(ckpt["state_dict"], "net.")
    ema = _weights(ckpt["state_dict"], "ema.module.")
    model = WALT.from_checkpoint(stage / "base.safetensors")  # a full, unsharded model
    exported = model.state_dict()
    assert exported.keys() == net.keys() == ema.keys()
    for k, v in exported.items():
        assert v.shape == net[k].shape
        assert torch.equal(v, ema[k]), k  # the export is the EMA
    trained = [k for k in net if net[k].is_floating_point() and not torch.equal(net[k], ema[k])]
    assert len(trained) > len(net) // 2  # the EMA trails the raw weights
    # The EMA moved from step 2 to step 4 (it is updated on the shards, not frozen).
    before = _weights(first["state_dict"], "ema.module.")
    assert any(not torch.equal(before[k], ema[k]) for k in trained)


def test_fsdp_equals_ddp_and_sharded_checkpoints_resume(tmp_path: Path):
    """3 steps of 2 accumulated micro-batches under DDP (gradients all-reduced on the second
    only) and under FSDP (reduce-scattered after each) from the same seeds: the same EMA
    weights up to the
    order of floating-point sums in the gradient reduction (all-reduce vs reduce-scatter),
    which AdamW's first steps (update ~ lr * sign(grad)) can amplify to ~lr on elements whose
    gradient is near zero: a mean absolute difference far below the lr (1e-3) and a maximum
    within a few lr. The FSDP run checkpoints sharded (a last.ckpt/ folder) and resumes."""
    encoded(tmp_path, *COMMON)
    source = [f"base.latents={tmp_path / 'run' / 'latents'}", "base.accumulate_grad_batches=2"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    train(ddp, *RANKS, "trainer.strategy=ddp", *COMMON, *source, "base.max_steps=3")
    sharded = [*FSDP, *COMMON, *source, "trainer.fsdp_checkpoint=sharded"]
    train(fsdp, *sharded, "base.max_steps=2")
    folder = fsdp / "run" / "base" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    train(fsdp, *sharded, "base.max_steps=3")
    assert not (folder.parent / "last.ckpt.partial").exists()
    assert not (folder.parent / "last.ckpt.old").exists()
    rows = read_metrics(folder.parent / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]

    reference = torch_load(ddp / "run" / "base" / "last.ckpt")["state_dict"]
    ddp_ema = _weights(reference, "ema.module.")
    fsdp_ema = WALT.from_checkpoint(fsdp / "run" / "base" / "base.safetensors").state_dict()
    assert fsdp_ema.keys() == ddp_ema.keys()
    diff = torch.cat([(fsdp_ema[k] - ddp_ema[k]).abs().flatten() for k in ddp_ema])
    assert float(diff.mean()) < 1e-5, float(diff.mean())
    assert float(diff.max()) < 3e-3, float(diff.max())


def test_sr_fsdp_trains_previews_resumes_and_exports(tmp_path: Path):
    """SR stage 1 (low-res latents and noise-level conditioning beside the base's inputs)
    under FSDP: previews by rank zero, a resume that continues the step count, and an export
    that is the gathered EMA and loads with its SR metadata."""
    sr = [*FSDP, "data.image_ratio=0", "trainer.checkpoint_every=1"]
    sr += ["sr.0.preview_every=2", "sr.0.gradient_checkpointing=true"]
    sr_encoded(tmp_path)
    run_ranks(partial(train_sr, stage=1, progress=False), tiny(tmp_path, *sr, "sr.0.max_steps=2"))
    run_ranks(partial(train_sr, stage=1, progress=False), tiny(tmp_path, *sr, "sr.0.max_steps=3"))
    stage = tmp_path / "run" / "sr1"
    rows = read_metrics(stage / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]  # each step once, across the resume
    # every preview_every steps and at the last step, each once (by rank zero)
    previews = sorted(p.name for p in (stage / "previews").iterdir())
    assert previews == [f"step-000000{i}.{ext}" for i in (2, 3) for ext in ("json", "mp4")]
    ckpt = torch_load(stage / "last.ckpt")
    assert int(ckpt["state_dict"]["step"]) == 3
    model = WALT.from_checkpoint(stage / "sr1.safetensors")
    assert model.lowres_factor == 2 and model.noise_embed is not None
    assert model.checkpoint_extra["stage"] == 1
    ema = _weights(ckpt["state_dict"], "ema.module.")
    exported = model.state_dict()
    assert exported.keys() == ema.keys()
    for k, v in exported.items():
        assert torch.equal(v, ema[k]), k  # the export is the full, gathered EMA
