"""Training on several processes (gloo on CPU, Lightning's `ddp` launcher): the tokenizer before and after its
discriminator starts, the base model on batches of image packs only, per-rank random streams,
and a resumed run that continues the random stream of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_base_training import encoded, image_folder  # noqa: F401 (fixture)
from training_helpers import read_metrics, series, tiny

from walt_cli.systems.base import train_base
from walt_cli.systems.rng import ResumableSampler, rank_seed

DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
DRIVER = Path(__file__).resolve().parent / "ddp_driver.py"


def run_ddp(stage: str, tmp_path: Path, *overrides: str) -> None:
    """`stage` trained by 2 gloo processes (Lightning's `ddp` launcher re-runs the driver)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(DRIVER), stage, str(tmp_path), f"run_dir={tmp_path}/run",
           *DDP, *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_rank_seeds_differ_and_are_stable():
    seeds = {rank_seed(0, r) for r in range(8)}
    assert len(seeds) == 8 and rank_seed(0, 3) == rank_seed(0, 3)
    assert rank_seed(1, 0) != rank_seed(0, 0)


def test_sampler_shards_ranks_and_resumes_mid_epoch(monkeypatch: pytest.MonkeyPatch):
    import walt_cli.systems.rng as rng

    s = ResumableSampler(10, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert sorted(full) == list(range(10)) and full != list(range(10))
    s.resume_at = (1, 4)  # 4 samples of epoch 1 already trained on
    assert list(s) == full[4:]
    assert list(s) == full  # the skip applies once
    s.set_epoch(2)
    assert list(s) != full
    parts = []
    for rank in range(3):  # 3 ranks: disjoint slices of one order, padded by wrapping
        monkeypatch.setattr(rng, "world", lambda rank=rank: (rank, 3))
        parts.append(list(s))
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(parts[0]) | set(parts[1]) | set(parts[2]) == set(range(10))


@pytest.mark.slow
def test_tokenizer_ddp_before_and_after_disc_start(tmp_path: Path):
    """Step 1 trains the generator alone, steps 2-3 the discriminator too: both structures run
    under DDP without searching for unused parameters; the checkpoint holds both ranks' RNG."""
    run_ddp("tokenizer", tmp_path, "tokenizer.max_steps=3", "tokenizer.disc_start=1",
            "tokenizer.val_every=100")  # fmt: skip
    stage = tmp_path / "run" / "tokenizer"
    rows = read_metrics(stage / "metrics.csv")
    assert [s for s, _ in series(rows, "train/d_loss")] == [2, 3]
    ckpt = torch.load(stage / "last.ckpt", weights_only=True, map_location="cpu")
    assert int(ckpt["state_dict"]["step"]) == 3
    ranks = ckpt["callbacks"]["walt_random_state"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


@pytest.mark.slow
def test_base_ddp_on_image_packs_only_with_per_rank_timesteps(tmp_path: Path, image_folder):  # noqa: F811
    overrides = [f"data.images={image_folder}", "data.image_ratio=1.0", "base.max_steps=3",
                 "base.preview_every=0"]  # fmt: skip
    encoded(tmp_path, *overrides)
    run_ddp("base", tmp_path, *overrides)
    rows = read_metrics(tmp_path / "run" / "base" / "metrics.csv")
    assert [s for s, _ in series(rows, "train/loss")] == [1, 2, 3]
    assert all(v == 0 for _, v in series(rows, "train/video_clips"))
    t0, t1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert t0 and t1 and t0[0] != t1[0]  # each rank draws its own timesteps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, accumulate: int):
    """8 steps straight vs 4 steps, stop, rerun to 8 (3 batches an epoch: the stop falls inside
    the second epoch): the same weights, EMA and AdamW moments, bit for bit on CPU, and
    metrics.csv holds each step once. With gradient accumulation a step is `accumulate`
    micro-batches (its metrics count all of their clips)."""
    import lightning as L

    common = ["base.max_steps=8", "base.preview_every=0", "trainer.checkpoint_every=3",
              f"base.accumulate_grad_batches={accumulate}"]  # fmt: skip
    a = encoded(tmp_path / "a", *common)
    latents = f"base.latents={Path(a.run_dir) / 'latents'}"
    finals: dict[str, dict] = {}

    class Final(L.Callback):
        def __init__(self, key):
            self.key = key

        def on_train_end(self, trainer, module):
            opt = trainer.optimizers[0].state_dict()["state"]
            finals[self.key] = {
                **{f"net.{k}": v.clone() for k, v in module.net.state_dict().items()},
                **{f"ema.{k}": v.clone() for k, v in module.ema.state_dict().items()},
                **{f"opt.{i}.{k}": v.clone() for i, s in opt.items() for k, v in s.items()},
            }

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if int(module.step) == 4:
                trainer.should_stop = True

    train_base(a, progress=False, callbacks=[Final("straight")])
    b = tiny(tmp_path / "b", *common, latents)
    first = train_base(b, progress=False, callbacks=[StopAt()])
    assert first["step"] == 4
    second = train_base(tiny(tmp_path / "b", *common, latents), progress=False,
                        callbacks=[Final("resumed")])  # fmt: skip
    assert second["resumed"] and second["step"] == 8
    straight, resumed = finals["straight"], finals["resumed"]
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    rows = read_metrics(Path(second["metrics"]))
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 9)]
    batch = a.base.batch_size or a.data.batch_size
    clips = {float(r["train/video_clips"]) + float(r["train/image_packs"]) for r in rows}
    assert clips == {float(batch * accumulate)}
