"""`walt train-base`: latent batches, joint image-video sampling, exact resume, conditioning
paths (class, text, frame prediction, online encoding), previews and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_helpers import TINY, read_metrics, resume_snapshot, series, tiny

from walt_cli.data.latents import LatentShards, file_hash, read_shard_info, write_shard
from walt_cli.data.video import write_image
from walt_cli.errors import WaltError
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.models.transformer import WALT
from walt_cli.systems.base import collate_latents, joint_sampler, train_base
from walt_cli.systems.encode import encode_dataset


def save_tokenizer(run: Path) -> Path:
    """An untrained tiny tokenizer where `tokenize train` would have put the trained one."""
    torch.manual_seed(0)
    path = run / "tokenizer" / "tokenizer.safetensors"
    CausalVideoTokenizer.from_preset("tiny").save(path)
    return path


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Six labelled 32x32 PNGs in two class folders (the images of joint training)."""
    g = torch.Generator().manual_seed(1)
    for cls in ("red", "blue"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
            write_image(tmp_path / "images" / cls / f"{i}.png", pixels.numpy())
    return tmp_path / "images"


def encoded(tmp_path: Path, *overrides: str):
    """A tiny recipe whose train and val splits are encoded into latent shards."""
    recipe = tiny(tmp_path, *overrides)
    save_tokenizer(Path(recipe.run_dir))
    encode_dataset(recipe, split="train", progress=False)
    encode_dataset(recipe, split="val", progress=False)
    return recipe


# ---------------------------------------------------------------------------------------------
# Batches and sampling


def test_collate_latents_gives_packs_per_frame_labels_and_text():
    z = torch.randn(8, 3, 4, 4)
    items = [
        {"latent": z, "label": 5, "is_image": False, "caption": "video",
         "text": torch.randn(6, 32), "text_mask": torch.ones(6, dtype=torch.bool)},
        {"latent": z + 1, "label": [1, 2, 3], "is_image": True, "caption": "pack",
         "text": torch.randn(3, 6, 32), "text_mask": torch.zeros(3, 6, dtype=torch.bool)},
    ]  # fmt: skip
    batch = collate_latents(items)
    assert batch["latent"].shape == (2, 8, 3, 4, 4)
    assert batch["label"].tolist() == [[5, 5, 5], [1, 2, 3]]
    assert batch["is_image"].tolist() == [False, True]
    assert batch["text"].shape == (2, 3, 6, 32)  # the video's caption repeated per frame
    torch.testing.assert_close(batch["text"][0, 2], items[0]["text"])
    assert batch["text_mask"][0].all() and not batch["text_mask"][1].any()
    with pytest.raises(WaltError, match="some latent shards hold text"):
        collate_latents([items[0], {k: v for k, v in items[1].items() if "text" not in k}])


def test_joint_sampler_draws_packs_at_the_configured_ratio():
    is_image = [False] * 90 + [True] * 10  # 10% packs in the shards
    sampler = joint_sampler(is_image, 0.5, num_samples=4000, seed=0)
    share = sum(is_image[i] for i in sampler) / 4000
    assert abs(share - 0.5) < 0.03
    only_videos = list(joint_sampler(is_image, 0.0, num_samples=500, seed=0))
    assert not any(is_image[i] for i in only_videos)
    assert joint_sampler([False] * 5, 0.0, num_samples=5, seed=0) is None  # plain shuffle
    with pytest.raises(WaltError, match="hold no packed images"):
        joint_sampler([False] * 5, 0.3, num_samples=5, seed=0)
    with pytest.raises(WaltError, match="only packed images"):
        joint_sampler([True] * 5, 0.3, num_samples=5, seed=0)


# ---------------------------------------------------------------------------------------------
# Training


def test_trains_on_a_joint_image_video_batch(tmp_path: Path, image_folder: Path):
    """Videos and packs of 3 independent images in one batch: per-frame labels, finite loss,
    exported weights with the latent statistics, and a class-conditional preview."""
    import lightning as L

    recipe = encoded(
        tmp_path,
        f"data.images={image_folder}",
        "data.image_ratio=0.5",
        "data.batch_size=4",
        "base.max_steps=3",
        "base.preview_every=3",
    )
    shards = LatentShards(Path(recipe.run_dir) / "latents" / "train")
    assert any(r["is_image"] for r in shards.rows) and not all(r["is_image"] for r in shards.rows)
    seen: list[dict] = []

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append({k: batch[k].clone() for k in ("is_image", "label")})

    summary = train_base(recipe, progress=False, callbacks=[Capture()])
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
    mixed = [b for b in seen if b["is_image"].any() and not b["is_image"].all()]
    assert mixed, "no batch mixed videos and image packs"
    assert mixed[0]["label"].shape == (4, 3)  # per-frame labels: one per image of a pack
    rows = read_metrics(Path(summary["metrics"]))
    assert all(math.isfinite(v) for _, v in series(rows, "train/loss"))
    assert sum(v for _, v in series(rows, "train/image_packs")) > 0

    net = WALT.from_checkpoint(summary["weights"])
    stats = json.loads((Path(recipe.run_dir) / "latents" / "train" / "stats.json").read_text())
    assert net.checkpoint_extra["latent_stats"]["mean"] == pytest.approx(stats["mean"])
    assert net.checkpoint_extra["step"] == 3 and net.checkpoint_extra["ema"] is True
    assert net.num_classes == 40 and net.config["latent_size"] == [3, 4, 4]
    preview = Path(summary["previews"]) / "step-0000003.mp4"
    assert preview.is_file() and preview.stat().st_size > 0
    about = json.loads(preview.with_suffix(".json").read_text())
    assert about["mode"] == "class" and about["ddim_steps"] == 2
    assert [t["label"] for t in about["tiles"]] == [0, 39]  # evenly spaced classes
    assert about["tiles"][0]["class"] == "circle moving left"  # shapes' class names


def test_rerun_resumes_with_the_same_weights_optimizer_and_ema(tmp_path: Path, resume_probe):
    """Stop at step 3, rerun to 5: the rerun starts from the stopped run's weights, AdamW
    moments, EMA, scheduler and step, and its metrics continue the same file."""
    probe = resume_probe(resume_snapshot)
    seen, first_steps = probe.seen, probe.first_steps

    common = ["trainer.checkpoint_every=1000", "base.preview_every=0"]
    recipe = encoded(tmp_path, "base.max_steps=3", *common)
    first = train_base(recipe, progress=False, callbacks=[probe.callback("end")])
    assert first["step"] == 3 and not first["resumed"]
    first_steps.clear()
    second = train_base(
        tiny(tmp_path, "base.max_steps=5", *common),
        progress=False,
        callbacks=[probe.callback("start")],
    )
    assert second["resumed"] and second["step"] == 5
    assert first_steps[:2] == [3, 4]

    end, start = seen["end"], seen["start"]
    assert start["step"] == end["step"] == 3 and start["sched"] == end["sched"]
    for part in ("net", "ema"):
        assert start[part].keys() == end[part].keys()
        for k in end[part]:
            torch.testing.assert_close(start[part][k], end[part][k], rtol=0, atol=0)
    assert start["opt"].keys() == end["opt"].keys() and len(end["opt"]) > 0
    for i in end["opt"]:
        assert {"exp_avg", "exp_avg_sq"} <= end["opt"][i].keys()
        for k in end["opt"][i]:
            torch.testing.assert_close(start["opt"][i][k], end["opt"][i][k], rtol=0, atol=0)
    torch.testing.assert_close(start["stats"], end["stats"], rtol=0, atol=0)
    # EMA and raw weights differ (the EMA really averages), and the EMA is what is exported.
    assert any(not torch.equal(end["net"][k], end["ema"][f"module.{k}"]) for k in end["net"])
    ckpt = torch.load(Path(second["checkpoint"]), weights_only=True, map_location="cpu")
    assert int(ckpt["state_dict"]["step"]) == 5
    rows = read_metrics(Path(second["metrics"]))
    assert [s for s, _ in series(rows, "train/loss")] == [1, 2, 3, 4, 5]


def test_resume_refuses_latents_of_another_tokenizer(tmp_path: Path):
    recipe = encoded(tmp_path, "base.max_steps=1", "base.preview_every=0")
    train_base(recipe, progress=False)
    stats_path = Path(recipe.run_dir) / "latents" / "train" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats["tokenizer"] = "0123456789abcdef"  # as if re-encoded with another tokenizer
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(WaltError, match="trained on latents of tokenizer"):
        train_base(tiny(tmp_path, "base.max_steps=2", "base.preview_every=0"), progress=False)


def test_frame_prediction_preview_continues_real_clips(tmp_path: Path):
    recipe = encoded(
        tmp_path,
        "base.num_classes=0",
        "base.p_frame_pred=1.0",
        "base.num_cond_frames=[2]",
        "base.max_steps=2",
        "base.preview_every=2",
        "base.ema=false",
    )
    summary = train_base(recipe, progress=False)
    rows = read_metrics(Path(summary["metrics"]))
    # Every sample conditions on its first frames except those whose condition was dropped.
    for (_, fp), (_, dropped) in zip(
        series(rows, "train/frame_pred"), series(rows, "train/cond_dropped"), strict=True
    ):
        assert fp + dropped == 2
    about = json.loads((Path(summary["previews"]) / "step-0000002.json").read_text())
    assert about["mode"] == "frames" and about["cond_latent_frames"] == 2
    assert about["weights"] == "raw" and about["layout"].startswith("pairs")
    assert all(t["caption"] for t in about["tiles"])
    assert WALT.from_checkpoint(summary["weights"]).checkpoint_extra["ema"] is False


def test_text_embeddings_from_the_shards_condition_the_model(tmp_path: Path):
    """Shards holding (L, D) caption states train a cross-attention model (text previews)."""
    recipe = tiny(
        tmp_path,
        "base.num_classes=0",
        "base.text_dim=32",
        "base.max_steps=2",
        "base.preview_every=2",
        "base.optimizer=adafactor",
    )
    digest = file_hash(save_tokenizer(Path(recipe.run_dir)))
    folder = Path(recipe.run_dir) / "latents" / "train"
    folder.mkdir(parents=True)
    n = 4
    rows = [
        {"shard": 0, "row": i, "label": -1, "caption": f"caption {i}", "source": f"v{i}",
         "start": 0, "frames": 9, "is_image": False}
        for i in range(n)
    ]  # fmt: skip
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[:, 3:] = False  # padded tokens
    write_shard(
        folder / "shard-00000.safetensors",
        torch.randn(n, 8, 3, 4, 4),
        rows,
        tokenizer=digest,
        text=torch.randn(n, 5, 32),
        text_mask=mask,
    )
    from walt_cli.data.latents import combine_stats

    info = read_shard_info(folder / "shard-00000.safetensors")
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in info.rows))
    (folder / "stats.json").write_text(json.dumps(combine_stats([info])))
    summary = train_base(recipe, progress=False)
    assert summary["step"] == 2
    net = WALT.from_checkpoint(summary["weights"])
    assert net.text_dim == 32 and net.num_classes == 0
    about = json.loads((Path(summary["previews"]) / "step-0000002.json").read_text())
    assert about["mode"] == "text"
    assert [t["caption"] for t in about["tiles"]] == ["caption 0", "caption 1"]

    with pytest.raises(WaltError, match="no text embeddings"):
        train_base(
            encoded(tmp_path / "b", "base.num_classes=0", "base.text_dim=32"), progress=False
        )


def test_online_encoding_measures_statistics_first(tmp_path: Path):
    recipe = tiny(tmp_path, "base.latents=online", "base.stats_batches=2", "base.max_steps=2")
    save_tokenizer(Path(recipe.run_dir))
    summary = train_base(recipe, progress=False)
    assert summary["step"] == 2
    stats = json.loads((Path(recipe.run_dir) / "base" / "latent_stats.json").read_text())
    assert stats["clips"] == 4 and len(stats["mean"]) == 8  # 2 batches of 2
    net = WALT.from_checkpoint(summary["weights"])
    assert net.checkpoint_extra["latent_stats"]["std"] == pytest.approx(stats["std"])


def test_labels_beyond_num_classes_are_a_clear_error(tmp_path: Path):
    recipe = encoded(tmp_path, "base.num_classes=3")
    with pytest.raises(WaltError, match=r"class label \d+ but base.num_classes is 3"):
        train_base(recipe, progress=False)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_train_base_then_rerun_resumes(cli, tmp_path: Path):
    encoded(tmp_path)
    args = ("train-base", TINY, f"run_dir={tmp_path}/run", "base.max_steps=2", "--no-progress")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    for text in (
        "parameters",
        "tokens per sample",
        "SW 1x4x4, STW 3x2x2",
        "bias random, positions random",
        "uniform on [0, 1]",  # the diffusion times' draw
        "SDPA",
        "base.safetensors",
        "memory plan",  # walt plan's prediction for this run
        "(ddp x1, predicted)",
    ):
        assert text in result.output, text
    result = cli(*args[:-2], "base.max_steps=3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "step 3:" in result.output
    assert "resumed weights replace both" in result.output


def test_cli_without_latents_says_what_to_run(cli, tmp_path: Path):
    save_tokenizer(tmp_path / "run")
    result = cli("train-base", TINY, f"run_dir={tmp_path}/run")
    assert result.exit_code == 2
    assert "walt tokenize encode" in result.output and "Traceback" not in result.output


def test_cli_without_tokenizer_explains_previews(cli, tmp_path: Path):
    result = cli("train-base", TINY, f"run_dir={tmp_path}/run")
    assert result.exit_code == 2
    assert "walt tokenize train" in result.output and "base.preview_every=0" in result.output


def test_cli_bad_base_key_is_one_line(cli, tmp_path: Path):
    result = cli("train-base", TINY, f"run_dir={tmp_path}", "base.optimizer=sgd")
    assert result.exit_code == 2
    assert "base.optimizer" in result.output and "adamw or adafactor" in result.output


def test_ddp_on_two_cpu_processes(tmp_path: Path):
    """`trainer.strategy=ddp` with 2 CPU processes (gloo): both ranks agree on every step, rank
    zero alone prints the table, writes previews and metrics, and the checkpoint holds step 4."""
    import subprocess
    import sys

    encoded(tmp_path)
    cmd = [sys.executable, "-m", "walt_cli.cli", "train-base", str(TINY), f"run_dir={tmp_path}/run",
           "trainer.devices=2", "trainer.strategy=ddp", "base.max_steps=4", "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count("walt train-base: tiny") == 1 and out.count("step 4: weights") == 1
    assert "2 per device x 2 = 4" in out
    base = tmp_path / "run" / "base"
    rows = read_metrics(base / "metrics.csv")
    assert [s for s, _ in series(rows, "train/loss")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (base / "previews").glob("*.mp4")) == [
        "step-0000003.mp4",
        "step-0000004.mp4",
    ]
    ckpt = torch.load(base / "last.ckpt", weights_only=True, map_location="cpu")
    assert int(ckpt["state_dict"]["step"]) == 4


def test_non_finite_loss_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import walt_cli.diffusion.losses as losses  # every stage's loss goes through it

    original = losses.diffusion_loss
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's loss is NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(losses, "diffusion_loss", faulty)
    recipe = encoded(tmp_path, "base.max_steps=3", "base.preview_every=0")
    summary = train_base(recipe, progress=False)
    assert summary["step"] == 3 and summary["skipped_steps"] == 1 and calls["n"] == 4
    rows = read_metrics(Path(summary["metrics"]))
    assert max(v for _, v in series(rows, "train/skipped")) == 1.0
    assert all(math.isfinite(v) for _, v in series(rows, "train/loss"))
    net = WALT.from_checkpoint(summary["weights"])
    assert all(torch.isfinite(p).all() for p in net.parameters())

    def always_inf(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss + float("inf")
        return out

    monkeypatch.setattr(losses, "diffusion_loss", always_inf)
    with pytest.raises(WaltError, match="3 non-finite losses in a row at step 3"):
        train_base(tiny(tmp_path, "base.max_steps=10", "base.nan_patience=3",
                        "base.preview_every=0"), progress=False)  # fmt: skip


def test_grad_clip_with_a_fused_optimizer_under_mixed_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Fused AdamW (walt's optimizer on CUDA) with `grad_clip` under bf16-mixed: Lightning's own
    clipping refused it, which stopped every CUDA run at its first step (seen on an H200). The
    CPU has the fused kernel too, so the same path runs here."""
    import walt_cli.systems.common as common

    fused = []

    def fused_adamw(params, **kwargs):
        fused.append(True)
        return torch.optim.AdamW(params, fused=True, **kwargs)

    monkeypatch.setattr(common, "adamw", fused_adamw)
    recipe = encoded(tmp_path, "base.max_steps=2", "base.preview_every=0", "base.grad_clip=0.01",
                     "trainer.precision=bf16-mixed")  # fmt: skip
    summary = train_base(recipe, progress=False)
    assert fused and summary["step"] == 2


def test_clip_grad_norm_scales_the_threshold_with_the_loss_scale():
    """Under a 16-mixed loss scaler the gradients are still scaled when they are clipped: the
    unscaled gradient ends at max_norm, as without a scaler."""
    from types import SimpleNamespace

    from walt_cli.systems.common import clip_grad_norm

    def clipped(scale: float | None) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]) * (scale or 1.0)  # norm 5 before scaling
        scaler = None if scale is None else SimpleNamespace(get_scale=lambda: scale)
        module = SimpleNamespace(trainer=SimpleNamespace(precision_plugin=SimpleNamespace(
            scaler=scaler)))  # fmt: skip
        clip_grad_norm(module, torch.optim.SGD([p], lr=1.0), 1.0)
        return p.grad / (scale or 1.0)

    torch.testing.assert_close(clipped(None), torch.tensor([0.6, 0.8, 0.0, 0.0]))
    torch.testing.assert_close(clipped(1024.0), torch.tensor([0.6, 0.8, 0.0, 0.0]))
