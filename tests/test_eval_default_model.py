"""bench/eval_default_model.py on a tiny text bundle (MiniLM, frame prediction, one SR stage,
17-frame clips): every section runs and the JSON holds every figure; the untrained pipeline is
the bundle's architecture with fresh weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import make_run

REPO = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "eval_default_model", REPO / "bench" / "eval_default_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_default_model"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from walt_cli.models.text import TextEncoder, TextEncoderSpec

    enc = TextEncoder.from_spec(TextEncoderSpec(name="minilm", max_length=8))
    root = tmp_path_factory.mktemp("evalbench") / "tiny"
    return make_run(
        root, text=True, latent_frames=5, text_encoder=enc.describe(), sample="steps: [2, 1]"
    )


def _small(run: Path, out: Path) -> list[str]:
    return [
        "--model", str(run), "--out", str(out), "--json", str(out / "result.json"),
        "--num", "3", "--tok-num", "2", "--tok-sizes", "32", "--tok-frames", "9",
        "--animate-num", "2", "--timing-runs", "1", "--steps", "1", "--batch", "2",
    ]  # fmt: skip


def test_sections_run_and_write_every_figure(bench, text_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert bench.main([*_small(text_run, out), "--skip-fvd", "--skip-timing"]) == 0
    data = json.loads((out / "result.json").read_text())
    assert {"machine", "model", "settings", "tokenizer", "adherence", "animate"} <= set(data)
    assert "fvd" not in data and "timing" not in data
    assert data["model"]["frames"] == 17 and data["model"]["resolution"] == [64, 64]
    assert data["model"]["steps_override"] == "1"
    tok = data["tokenizer"]["results"]
    assert [(r["split"], r["size"]) for r in tok] == [("heldout", 32), ("val", 32)]
    for r in tok:
        assert len(r["per_frame"]) == 9 and r["num"] == 2
        assert r["frame0"] == pytest.approx(r["per_frame"][0], abs=1e-3)
        assert r["others"] == pytest.approx(sum(r["per_frame"][1:]) / 8, abs=1e-2)
    adherence = data["adherence"]
    assert adherence["generated_here"] and adherence["num"] == 3
    # the probe reads the real clips of the captions it was built for
    assert adherence["accuracy"]["real"]["colour"] == 1.0
    assert set(adherence["accuracy"]) == {"model", "real"}
    assert set(adherence["targets"]) == {"colour", "direction", "shape"}
    for v in adherence["targets"].values():
        assert v["pass"] == (v["model"] >= v["target"])
    # the samples eval-fvd --model would write: 3 frame folders of 17 frames
    samples = Path(adherence["samples"])
    assert (samples / "samples-3.txt").read_text().split() == [f"sample-{i:06d}" for i in range(3)]
    assert len(list((samples / "sample-000002").glob("*.png"))) == 17
    animate = data["animate"]
    assert animate["num"] == 2 and len(animate["first_frame_psnr_all"]) == 2
    assert animate["direction_real"] == 1.0
    assert len(list((out / "animate" / "inputs").glob("*.png"))) == 2
    text = capsys.readouterr().out
    assert "## Tokenizer" in text and "## Animate" in text and "torch " in text
    assert "python bench/eval_default_model.py --model" in text  # each section's command

    # resumed: the tokenizer figures and the animations are kept, not recomputed
    assert bench.main([*_small(text_run, out), "--skip-fvd", "--skip-timing"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["tokenizer"]["results"] == tok and again["animate"]["made"] == 0
    assert not again["adherence"]["generated_here"]


def test_untrained_bundle_is_the_architecture_with_fresh_weights(bench, text_run, tmp_path):
    from safetensors.torch import load_file

    from walt_cli.pipelines import Pipeline
    from walt_cli.pipelines.bundle import read_bundle

    out = bench.build_untrained(str(text_run), tmp_path / "untrained", seed=0)
    src, new = read_bundle(text_run), read_bundle(out)
    assert [s.name for s in new.stages] == [s.name for s in src.stages] == ["base", "sr1"]
    pairs = [(src.tokenizer, new.tokenizer)] + [
        (a.file, b.file) for a, b in zip(src.stages, new.stages, strict=True)
    ]
    for a, b in pairs:
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
        assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(new.stages[0].file)
    assert not any(base[k].any() for k in base if k.startswith("final.linear"))  # adaLN-Zero
    for s in new.stages:
        assert s.meta["latent_stats"]["tokenizer"] == new.tokenizer_sha256[:16]
        assert set(s.meta["latent_stats"]["std"]) == {1.0}
    assert new.sample == src.sample and new.text_encoder == src.text_encoder
    pipe = Pipeline.from_bundle(out, device="cpu")
    assert pipe.resolution == (64, 64) and pipe.clip_frames == 17
    # rebuilt only when the source or the seed changes
    stamp = (out / "base.safetensors").stat().st_mtime_ns
    assert bench.build_untrained(str(text_run), out, seed=0) == out
    assert (out / "base.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_trial_scores_another_file(bench, text_run, tmp_path, capsys):
    from walt_cli.data.latents import file_hash
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.pipelines.bundle import read_bundle

    config = CausalVideoTokenizer.from_checkpoint(read_bundle(text_run).tokenizer).config
    torch.manual_seed(1)
    trial = CausalVideoTokenizer(**config).save(tmp_path / "trial.safetensors")
    out = tmp_path / "eval"
    skips = ["--skip-fvd", "--skip-adherence", "--skip-animate", "--skip-timing"]
    assert bench.main([*_small(text_run, out), *skips]) == 0
    own = json.loads((out / "result.json").read_text())["tokenizer"]["results"]
    assert bench.main([*_small(text_run, out), *skips, "--tokenizer", str(trial)]) == 0
    data = json.loads((out / "result.json").read_text())
    assert data["model"]["tokenizer_file"] == str(trial)
    got = data["tokenizer"]["results"]
    assert [r["tokenizer"] for r in got] == [file_hash(trial)] * 2  # its own cache entries
    assert [r["overall"] for r in got] != [r["overall"] for r in own]
    assert f"--tokenizer {trial}" in capsys.readouterr().out  # the section's command
    with pytest.raises(SystemExit) as err:  # the other sections would read the bundle's
        bench.parse_args(["--tokenizer", str(trial), "--skip-fvd"])
    assert err.value.code == 2
    assert "--tokenizer scores a tokenizer alone" in capsys.readouterr().err
    assert bench.main([*_small(text_run, out), *skips, "--tokenizer", str(out)]) == 2


def test_bad_model_is_one_line(bench, tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_fvd_and_timing_through_the_command_line(bench, text_run, tmp_path):
    from walt_cli.errors import WaltError
    from walt_cli.metrics.i3d import find_i3d_weights

    try:
        find_i3d_weights(None)
        skip = []
    except WaltError:  # no detector weights on this machine
        skip = ["--skip-fvd"]
    out = tmp_path / "eval"
    args = [*_small(text_run, out), "--skip-tokenizer", "--skip-animate", *skip]
    assert bench.main(args) == 0
    data = json.loads((out / "result.json").read_text())
    timing = data["timing"]
    assert len(timing["runs"]) == 1 and timing["median_wall_s"] > 0
    assert timing["command"].startswith("walt sample 'a red circle moving left' --out x.mp4")
    if not skip:
        fvd = data["fvd"]
        assert {"model", "floor", "untrained"} <= set(fvd)
        for name in ("model", "floor", "untrained"):
            assert fvd[name]["result"]["protocol"] == "magvit"
            assert fvd[name]["result"]["num_fake"] == 3
            assert fvd[name]["command"].startswith("walt eval-fvd ")
        # adherence read the samples eval-fvd --model wrote
        assert not data["adherence"]["generated_here"]
        assert data["adherence"]["samples"] == fvd["model"]["samples"]
