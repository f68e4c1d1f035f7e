"""`walt train-sr` and the cascade's training data: SR inputs, noise-level conditioning, text
states in the shards, overfitting one pair, exact resume, the t2v presets and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, TINY, read_metrics, resume_snapshot, series, tiny

from walt_cli.config import load_recipe
from walt_cli.data.latents import LatentShards
from walt_cli.diffusion.inputs import build_model_input
from walt_cli.errors import WaltError
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.systems.encode import encode_dataset
from walt_cli.systems.sr import SRSystem, train_sr


def save_tokenizer(run: Path) -> Path:
    torch.manual_seed(0)
    path = run / "tokenizer" / "tokenizer.safetensors"
    CausalVideoTokenizer.from_preset("tiny").save(path)
    return path


def sr_encoded(tmp_path: Path, *overrides: str):
    """The tiny recipe with SR stage 1's pairs (64x64 clips + 32x32 versions) encoded."""
    recipe = tiny(tmp_path, *overrides)
    save_tokenizer(Path(recipe.run_dir))
    encode_dataset(recipe, split="train", progress=False, sr=1)
    encode_dataset(recipe, split="val", progress=False, sr=1)
    return recipe


def sr_net(**overrides) -> WALT:
    kw = dict(num_classes=0, text_dim=None, depth=2, latent_size=(3, 8, 8), lowres_factor=2,
              noise_level_cond=True)  # fmt: skip
    return WALT.from_preset("tiny", **{**kw, **overrides})


# ---------------------------------------------------------------------------------------------
# The network's SR inputs


def test_lowres_latent_reaches_the_expected_positions():
    """A known (1, 8, 3, 4, 4) low-res latent lands in the last 8 input channels repeated 2x2,
    and the network's depth-to-space conv (initialised to nearest) upsamples it the same way."""
    net = sr_net()
    low = torch.arange(8 * 3 * 4 * 4, dtype=torch.float32).reshape(1, 8, 3, 4, 4)
    z_t = torch.zeros(1, 8, 3, 8, 8)
    x_in = build_model_input(z_t, lowres=low)
    assert x_in.shape == (1, 33, 3, 8, 8)
    up = x_in[:, 25:]
    for i in range(8):
        for j in range(8):
            torch.testing.assert_close(up[..., i, j], low[..., i // 2, j // 2], rtol=0, atol=0)
    assert up[0, 3, 1, 5, 2].item() == low[0, 3, 1, 2, 1].item()  # channel 3, frame 1, cell (2, 1)
    assert x_in[:, :25].abs().max() == 0  # nothing else moved
    learned = net._upsample_lowres(x_in)[:, 25:]
    torch.testing.assert_close(learned, up, rtol=0, atol=1e-6)


def test_noise_level_changes_the_output_once_adaln_is_live():
    torch.manual_seed(0)
    net = sr_net().eval()
    x, t = torch.randn(2, 33, 3, 8, 8), torch.full((2,), 0.4)

    def out(level: float) -> torch.Tensor:
        return net(x, t, Conditioning(noise_level=torch.full((2,), level)))

    torch.testing.assert_close(out(0.0), out(0.9))  # adaLN-Zero: the blocks start as identity
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert not torch.allclose(out(0.0), out(0.9), atol=1e-4)
    torch.testing.assert_close(out(0.3), out(0.3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Training


def test_a_tiny_sr_stage_overfits_one_pair():
    """One (z, z_lr) pair, one fixed draw of t, noise and t_sr: the SR loss falls below 1% of
    its start (the classic single-batch check of the whole loss path)."""
    torch.manual_seed(0)
    net = sr_net(width=64, depth=2)
    system = SRSystem(
        net, stage=1, factor=2, resolution=[64, 64], lowres_mean=[0.0] * 8, lowres_std=[1.0] * 8,
        t_max=0.3, stage_dir="unused", latent_mean=[0.0] * 8, latent_std=[1.0] * 8,
        tokenizer_hash="x", max_steps=1, p_self_cond=0.0, ema=False,
    )  # fmt: skip
    z = torch.randn(1, 8, 3, 8, 8)
    batch = {
        "latent": z.expand(4, -1, -1, -1, -1),
        "lowres": torch.nn.functional.avg_pool3d(z, (1, 2, 2)).expand(4, -1, -1, -1, -1),
        "is_image": torch.zeros(4, dtype=torch.bool),
        "label": torch.zeros(4, dtype=torch.long),
    }
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        out, metrics = system.compute_loss(batch, generator=torch.Generator().manual_seed(3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert 0 < metrics["train/noise_level"] <= 0.3
    assert min(losses[-10:]) < 0.01 * losses[0], (losses[0], losses[-10:])


def test_the_recipe_time_shift_reaches_the_stage_loss():
    """`sr.N.time_shift` (and `base.time_shift`, the same DenoiserConfig key) reaches the
    system's loss: the same seed draws the same times, shifted toward noise."""
    from walt_cli.diffusion.losses import shift_time
    from walt_cli.systems.common import DiffusionSystem, section_kwargs

    recipe = load_recipe(TINY, ["sr.0.time_shift=3"])
    assert section_kwargs(recipe.sr[0], DiffusionSystem)["time_shift"] == 3
    base = load_recipe(TINY, ["base.time_shift=2"]).base
    assert section_kwargs(base, DiffusionSystem)["time_shift"] == 2
    z = torch.randn(6, 8, 3, 8, 8)
    batch = {
        "latent": z,
        "lowres": torch.nn.functional.avg_pool3d(z, (1, 2, 2)),
        "is_image": torch.zeros(6, dtype=torch.bool),
        "label": torch.zeros(6, dtype=torch.long),
    }
    times = []
    for shift in (1.0, 3.0):
        system = SRSystem(
            sr_net(width=32, depth=1), stage=1, factor=2, resolution=[64, 64],
            lowres_mean=[0.0] * 8, lowres_std=[1.0] * 8, t_max=0.3, stage_dir="unused",
            latent_mean=[0.0] * 8, latent_std=[1.0] * 8, tokenizer_hash="x", max_steps=1,
            p_self_cond=0.0, ema=False, time_shift=shift,
        )  # fmt: skip
        out, _ = system.compute_loss(batch, generator=torch.Generator().manual_seed(3))
        times.append(out.t)
    torch.testing.assert_close(times[1], shift_time(times[0], 3.0))


def test_encode_writes_pairs_and_text_states_then_train_sr_exports(tmp_path: Path):
    recipe = sr_encoded(
        tmp_path, "text_encoder.name=minilm", "sr.0.text_dim=384", "sr.0.max_steps=2"
    )
    folder = Path(recipe.run_dir) / "latents" / "sr1" / "train"
    shards = LatentShards(folder)
    item = shards[0]
    assert item["latent"].shape == (8, 3, 8, 8) and item["lowres"].shape == (8, 3, 4, 4)
    assert item["text"].shape == (8, 384) and item["text_mask"].any()
    stats = json.loads((folder / "stats.json").read_text())
    assert len(stats["lowres"]["std"]) == 8 and stats["text_encoder"]
    summary = train_sr(recipe, 1, progress=False)
    assert summary["step"] == 2 and summary["weights"].endswith("sr1/sr1.safetensors")
    net = WALT.from_checkpoint(summary["weights"])
    extra = net.checkpoint_extra
    assert net.lowres_factor == 2 and net.text_dim == 384 and net.noise_embed is not None
    assert extra["stage"] == 1 and extra["factor"] == 2 and extra["resolution"] == [64, 64]
    assert extra["lowres_resolution"] == [32, 32] and extra["t_max"] == pytest.approx(0.3)
    assert extra["noise_level"] == pytest.approx(0.1)
    assert extra["lowres_latent_stats"]["mean"] == pytest.approx(stats["lowres"]["mean"])
    assert extra["latent_stats"]["std"] == pytest.approx(stats["std"])
    assert extra["text_encoder"]["name"] == "minilm"
    assert extra["text_encoder"]["hash"] == stats["text_encoder"]
    preview = Path(summary["previews"]) / "step-0000002.mp4"
    assert preview.is_file()
    about = json.loads(preview.with_suffix(".json").read_text())
    assert about["layout"].startswith("rows: low-res input") and len(about["tiles"]) == 2
    rows = read_metrics(Path(summary["metrics"]))
    assert [s for s, _ in series(rows, "train/loss")] == [1, 2]
    assert all(0 <= v <= 0.3 for _, v in series(rows, "train/noise_level"))


def test_rerun_resumes_sr_exactly(tmp_path: Path, resume_probe):
    probe = resume_probe(resume_snapshot)
    common = ["trainer.checkpoint_every=1000", "sr.0.preview_every=0"]
    recipe = sr_encoded(tmp_path, "sr.0.max_steps=2", *common)
    first = train_sr(recipe, 1, progress=False, callbacks=[probe.callback("end")])
    assert first["step"] == 2 and not first["resumed"]
    probe.first_steps.clear()
    second = train_sr(
        tiny(tmp_path, "sr.0.max_steps=4", *common), 1, progress=False,
        callbacks=[probe.callback("start")],
    )  # fmt: skip
    assert second["resumed"] and second["step"] == 4 and probe.first_steps[:2] == [2, 3]
    end, start = probe.seen["end"], probe.seen["start"]
    assert start["step"] == end["step"] == 2 and start["sched"] == end["sched"]
    for part in ("net", "ema"):
        for k in end[part]:
            torch.testing.assert_close(start[part][k], end[part][k], rtol=0, atol=0)
    assert len(end["opt"]) > 0
    for i in end["opt"]:
        for k in end["opt"][i]:
            torch.testing.assert_close(start["opt"][i][k], end["opt"][i][k], rtol=0, atol=0)
    assert set(end["stats"]) == {"latent_std", "lowres_std"}
    torch.testing.assert_close(start["stats"], end["stats"], rtol=0, atol=0)


def test_train_base_refuses_text_states_of_another_encoder(tmp_path: Path):
    from walt_cli.systems.base import train_base

    overrides = ("text_encoder.name=minilm", "base.num_classes=0", "base.text_dim=384",
                 "base.max_steps=1", "base.preview_every=0")  # fmt: skip
    recipe = tiny(tmp_path, *overrides)
    save_tokenizer(Path(recipe.run_dir))
    encode_dataset(recipe, split="train", progress=False)
    assert train_base(recipe, progress=False)["step"] == 1
    stats_path = Path(recipe.run_dir) / "latents" / "train" / "stats.json"
    stats = json.loads(stats_path.read_text())
    ours = stats["text_encoder"]
    stats["text_encoder"] = "0123456789abcdef"  # as if written by another encoder
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(WaltError, match=f"encoder 0123456789abcdef.*is {ours}"):
        train_base(tiny(tmp_path, *overrides), progress=False)


# ---------------------------------------------------------------------------------------------
# Presets and bad input


def test_t2v_sr_presets_count_the_papers_parameters():
    """SR1 1.3B and SR2 419M [P Table 8], within 2%."""
    from walt_cli.systems.common import build_network

    recipe = load_recipe(REPO / "recipes" / "t2v.yaml")
    counts = []
    for section, latent in zip(recipe.sr, [(5, 32, 56), (5, 64, 112)], strict=True):
        with torch.device("meta"):
            net = build_network(section, latent, 8, lowres_factor=2, noise_level_cond=True)
        counts.append(net.num_parameters)
    assert counts[0] == pytest.approx(1.3e9, rel=0.02), counts
    assert counts[1] == pytest.approx(419e6, rel=0.02), counts


def test_bad_sr_input_is_one_line(cli, tmp_path: Path):
    run = f"run_dir={tmp_path}/run"
    result = cli("train-sr", TINY, run, "--stage", "3")
    assert result.exit_code == 2 and "--stage 3: the recipe has stages 1..1" in result.output
    result = cli("tokenize", "encode", TINY, run, "--sr", "2")
    assert result.exit_code == 2 and "--sr 2" in result.output
    result = cli("train-sr", TINY, run, "sr.0.resolution=[96,96]", "--stage", "1")
    assert (
        result.exit_code == 2 and "is not the previous stage's [32, 32] x factor 2" in result.output
    )
    result = cli("train-sr", TINY, run, "--stage", "1", "sr.0.preview_every=0")
    assert result.exit_code == 2 and "walt tokenize encode RECIPE --sr 1" in result.output
    # base latents (no low-res pairs) named as the stage's latents
    recipe = tiny(tmp_path)
    save_tokenizer(Path(recipe.run_dir))
    encode_dataset(recipe, split="train", progress=False)
    latents = Path(recipe.run_dir) / "latents"
    result = cli("train-sr", TINY, run, f"sr.0.latents={latents}", "--stage", "1")
    assert result.exit_code == 2 and "holds no low-res pairs" in result.output
    assert not (tmp_path / "run" / "sr1").exists()
    result = cli("train-sr", TINY, run, "text_encoder.name=clip", "--stage", "1")
    assert result.exit_code == 2 and "unknown encoder 'clip'" in result.output
    assert "Traceback" not in result.output


class _FakeEncoder:
    """Same shape as a TextEncoder: states encode each prompt's length, mask marks its words."""

    dim, max_length, hash = 4, 3, "fake"

    def encode(self, prompts):
        n = len(prompts)
        mask = torch.tensor([[i < len(p.split()) for i in range(3)] for p in prompts])
        states = torch.tensor([float(len(p)) for p in prompts]).view(n, 1, 1).expand(n, 3, 4)
        return states * mask[..., None], mask


def test_pack_captions_get_one_state_per_image_and_shards_mix_them():
    from walt_cli.data.latents import per_frame_text
    from walt_cli.systems.encode import caption_states

    enc = _FakeEncoder()
    videos, vmask = caption_states(enc, ["a b", "c"], torch.tensor([False, False]), 3)
    assert videos.shape == (2, 3, 4) and vmask.sum(1).tolist() == [2, 1]
    packs, pmask = caption_states(enc, ["a b", ["x", "y z", "w"]], torch.tensor([False, True]), 3)
    assert packs.shape == (2, 3, 3, 4)  # (B, T, L, D): one caption per image
    assert pmask[1].sum(1).tolist() == [1, 2, 1] and pmask[0].sum(1).tolist() == [2, 2, 2]
    assert packs[1, 1, 0, 0] == len("y z") and packs[0, 2, 0, 0] == len("a b")
    texts, masks = per_frame_text([videos, packs], [vmask, pmask], 3)
    assert texts[0].shape == (2, 3, 3, 4) and torch.equal(texts[0][:, 1], videos)
    assert masks[0].shape == (2, 3, 3)


def test_init_from_resizes_trained_weights_to_the_new_grid(tmp_path: Path):
    """base.init_from (the 9:16 fine-tune): weights of a 3x4x4 model start a 3x4x6 one."""
    from walt_cli.systems.base import BaseSystem, init_weights

    torch.manual_seed(0)
    kw = dict(num_classes=0, text_dim=None, depth=2, spatial_window=(4, 4), st_window=(2, 2))
    source = WALT.from_preset("tiny", latent_size=(3, 4, 4), **kw)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.02)
    source.save(tmp_path / "square.safetensors")
    target = WALT.from_preset("tiny", latent_size=(3, 4, 6), **{**kw, "spatial_window": (4, 6)})
    init_weights(target, tmp_path / "square.safetensors")
    own, src = target.state_dict(), source.state_dict()
    mlp = [k for k in src if k.startswith("blocks.0.mlp")]
    assert mlp and all(torch.equal(own[k], src[k]) for k in mlp)  # untouched by the resize
    resized = [k for k in src if own[k].shape != src[k].shape]
    assert resized  # position tables moved to the wider grid
    with pytest.raises(WaltError, match="another architecture"):
        init_weights(WALT.from_preset("tiny", latent_size=(3, 4, 6), **{**kw, "depth": 3}),
                     tmp_path / "square.safetensors")  # fmt: skip
    with pytest.raises(WaltError, match="base.init_from: file not found"):
        init_weights(target, tmp_path / "missing.safetensors")
    # The inits are not architecture: weights started from the priors start a plain network.
    prior = WALT.from_preset(
        "tiny", latent_size=(3, 4, 4), bias_init="locality", pos_init="sincos", **kw
    )
    prior.save(tmp_path / "prior.safetensors")
    plain = WALT.from_preset("tiny", latent_size=(3, 4, 4), **kw)
    init_weights(plain, tmp_path / "prior.safetensors")
    assert torch.equal(plain.pos_embed.temporal, prior.pos_embed.temporal)

    system = BaseSystem(
        target, stage_dir=str(tmp_path), latent_mean=[0.0] * 8, latent_std=[1.0] * 8,
        tokenizer_hash="x", max_steps=100, warmup_steps=10, lr_schedule="constant",
    )  # fmt: skip
    [opt], [sched] = system.configure_optimizers()
    factors = [sched.lr_lambdas[0](s) for s in (0, 9, 10, 50, 99)]
    assert factors == [pytest.approx(0.1), 1.0, 1.0, 1.0, 1.0]
