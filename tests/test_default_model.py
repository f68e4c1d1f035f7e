"""The default model shipped inside the package (walt_cli/default_model, issue 15): it samples
right after install, deterministically by seed; its files are checked against the bundle index;
`walt sample` knows (and says) what words it understands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from walt_cli.data.shapes_vocab import COLOURS, unknown_words, vocabulary
from walt_cli.pipelines import Pipeline, read_bundle
from walt_cli.pipelines.bundle import INDEX_FILE, default_model_dir

PROMPT = "a red circle moving left slowly on a black background"


@pytest.fixture(scope="module")
def default_pipe() -> Pipeline:
    # The bundle is package data: a checkout without it is a broken install, not a skip.
    assert (default_model_dir() / INDEX_FILE).is_file(), "walt_cli/default_model is not installed"
    return Pipeline.from_bundle("default", device="cpu")


def test_bundle_is_small_and_names_its_files(default_pipe):
    index = read_bundle("default")
    files = [index.tokenizer] + [s.file for s in index.stages]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20  # issue 15: <= 40 MB together
    assert [s.name for s in index.stages][:2] == ["base", "sr1"]
    assert index.text_encoder and index.text_encoder["name"] == "minilm"
    assert index.vocabulary == vocabulary()


def test_samples_one_short_clip_deterministically(default_pipe):
    kw = dict(prompts=[PROMPT], steps=[2, 1], output="uint8")
    a = default_pipe.generate(seeds=[3], **kw)
    # 17 frames at the last stage's 128x128, uint8 (B, T, H, W, 3)
    assert a.shape == (1, 17, 128, 128, 3) and a.dtype == torch.uint8
    assert torch.equal(a, default_pipe.generate(seeds=[3], **kw))
    assert not torch.equal(a, default_pipe.generate(seeds=[4], **kw))


def test_corrupt_bundled_file_is_one_line_and_exit_2(cli, tmp_path, monkeypatch):
    copy = tmp_path / "default_model"
    shutil.copytree(default_model_dir(), copy)
    data = bytearray((copy / "base.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "base.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr("walt_cli.pipelines.bundle.default_model_dir", lambda: copy)
    out = tmp_path / "v.mp4"
    r = cli("sample", PROMPT, "--out", out, "--no-progress")
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "sha256" in r.output
    assert not out.exists()


def test_unknown_words_warn_and_still_make_a_video(cli, tmp_path):
    out = tmp_path / "panda.mp4"
    r = cli("sample", "A panda taking a selfie!", "--steps", "1,1", "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "outside the model's vocabulary: panda, taking, selfie" in r.output
    assert out.stat().st_size > 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["request"]["prompts"] == ["A panda taking a selfie!"]
    r = cli("sample", PROMPT, "--steps", "1,1", "--out", tmp_path / "ok.mp4", "--no-progress")
    assert r.exit_code == 0 and "vocabulary" not in r.output


def test_unknown_words_reads_caption_words():
    vocab = vocabulary()
    assert (
        unknown_words("A small cyan diamond moving up-left quickly on a navy background", vocab)
        == []
    )
    assert unknown_words("a red circle, moving sideways; a red dog", vocab) == ["sideways", "dog"]
    assert unknown_words("a red circle moving up-sideways", {"w": ["a", "red"]}) == [
        "circle",
        "moving",
        "up-sideways",
    ]


def test_sample_help_lists_what_the_default_model_knows(cli):
    r = cli("sample", "--help")
    text = " ".join(r.output.split())
    for word in [*COLOURS, "circle", "cross", "down-right", "slowly", "quickly", "beige", "large"]:
        assert word in text, word


def test_package_data_ships_the_bundle():
    # pyproject's package-data must cover every file the index names (a wheel without them
    # would install a walt whose default model is missing).
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["walt_cli"]
    index = json.loads((default_model_dir() / INDEX_FILE).read_text())
    names = [INDEX_FILE, index["tokenizer"]["file"], *(s["file"] for s in index["stages"])]
    pkg = repo / "walt_cli"
    for name in names:
        rel = (default_model_dir() / name).relative_to(pkg)
        assert any(rel.match(g) for g in globs), name


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("bf16", ["0", "1"])
def test_make_default_model_runs_valid_recipes(tmp_path, bf16):
    # Every override `make default-model` passes is a key of the recipe with a valid value, and
    # the tokenizer's two steps and the base get the schedule of their precision (NATIVE_BF16).
    import shlex
    import subprocess

    from walt_cli.config import load_recipe

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["make", "-s", "-n", "default-model", f"DEFAULT_RUN={tmp_path}", f"NATIVE_BF16={bf16}"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("walt ")]
    assert [c[1] for c in commands[:2]] == ["tokenize", "tokenize"] and "--decoder" in commands[1]
    assert commands[-1][:2] == ["walt", "export"]
    recipes, stage = [], {}
    for c in commands:
        if c[2] != "recipes/shapes.yaml" and c[3] != "recipes/shapes.yaml":
            continue  # walt export takes a run directory
        overrides = [t for t in c if "=" in t and not t.startswith("-")]
        recipes.append(load_recipe(repo / "recipes/shapes.yaml", overrides))
        stage[c[1]] = recipes[-1]
        assert recipes[-1].run_dir == str(tmp_path)
    tokenizer, decoder = recipes[:2]
    precision = "bf16-mixed" if bf16 == "1" else "32-true"
    assert [tokenizer.trainer.precision, decoder.trainer.precision] == [precision] * 2
    steps = (8000, 1500) if bf16 == "1" else (2000, 300)
    assert (tokenizer.tokenizer.max_steps, decoder.tokenizer.max_steps) == steps
    assert list(tokenizer.data.resolution) == [32, 32] and list(decoder.data.resolution) == [64, 64]
    base = stage["train-base"]
    assert (base.trainer.precision, base.base.max_steps) == (
        (precision, 10000) if bf16 == "1" else ("32-true", 4000)
    )
    assert stage["train-sr"].trainer.precision == "32-true"  # SR1: the recipe's, either way
