"""Recipes: every shipped recipe validates; bad recipes fail with one line naming file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from walt_cli.config import load_recipe, save_recipe, to_yaml
from walt_cli.errors import WaltError

REPO = Path(__file__).resolve().parent.parent

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path: Path, tmp_path: Path):
    recipe = load_recipe(path, [f"run_dir={tmp_path}/run"])
    assert recipe.name == path.stem
    assert recipe.run_dir == f"{tmp_path}/run"


def test_name_and_run_dir_defaults(tmp_path: Path):
    f = tmp_path / "my_exp.yaml"
    f.write_text("data:\n  num_frames: 9\n")
    recipe = load_recipe(f)
    assert recipe.name == "my_exp"
    assert recipe.run_dir == "runs/my_exp"
    assert load_recipe(f, ["name=other"]).run_dir == "runs/other"


def test_overrides_and_interpolation(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("run_dir: ${data.shapes.seed}/out\ndata:\n  shapes:\n    seed: 3\n")
    recipe = load_recipe(f, ["data.shapes.seed=7", "data.resolution=[32,64]", "trainer.devices=2"])
    assert recipe.run_dir == "7/out"
    assert list(recipe.data.resolution) == [32, 64]
    assert recipe.trainer.devices == 2


def test_a_leading_tilde_in_a_path_key_is_the_home_folder(tmp_path: Path, monkeypatch):
    """`run_dir=~/runs/x` on a command line reaches walt unexpanded (the shell expands `~` only
    at the start of a word): path-valued keys expand it, from the file or an override, in SR
    stages too; other strings and a `~` further in are left alone."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    f = tmp_path / "r.yaml"
    f.write_text("tokenizer:\n  checkpoint: ~/tok.safetensors\nsr:\n  - latents: ~/sr1\n")
    recipe = load_recipe(f, ["run_dir=~/runs/x", "base.latents=~/lat", "data.path=a/~b"])
    assert recipe.run_dir == f"{home}/runs/x"
    assert recipe.base.latents == f"{home}/lat"
    assert recipe.tokenizer.checkpoint == f"{home}/tok.safetensors"
    assert recipe.sr[0].latents == f"{home}/sr1"
    assert recipe.data.path == "a/~b"
    assert load_recipe(f, ["name=~x"]).name == "~x"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data:\n  colour: red\n", [], "r.yaml: unknown key 'data.colour'"),
        ("data:\n  num_frames: many\n", [], "r.yaml: data.num_frames: Value 'many'"),
        ("data:\n  num_frames: 16\n", [], "data.num_frames: must be 1 + 4k"),
        (
            "data:\n  resolution: [30, 64]\n",
            [],
            "data.resolution: sides must be positive multiples of 8",
        ),
        ("data:\n  source: manifest\n", [], "data.path: is required for data.source=manifest"),
        ("data:\n  short_clips: crash\n", [], "data.short_clips: must be one of skip, loop, pad"),
        ("{}\n", ["trainer.gpus=2"], "override 'trainer.gpus=2': unknown key 'trainer.gpus'"),
        ("{}\n", ["data.num_frames"], "is not of the form key.path=value"),
        ("data: [1, 2\n", [], "r.yaml: not valid YAML"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path: Path, text, overrides, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(WaltError) as err:
        load_recipe(f, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(WaltError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_resolved_recipe_is_saved_and_reloads(tmp_path: Path):
    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path}/tiny", "data.num_frames=5"]
    )
    out = save_recipe(recipe)
    assert out == tmp_path / "tiny" / "recipe.yaml"
    again = load_recipe(out)
    assert to_yaml(again) == to_yaml(recipe)


def test_data_paths_are_checked_when_data_is_read(tmp_path: Path):
    """A recipe naming a data set not yet downloaded validates; reading it names the key."""
    from walt_cli.data.datasets import build_dataset

    f = tmp_path / "r.yaml"
    f.write_text("data:\n  source: folder\n  path: /nonexistent/videos\n")
    recipe = load_recipe(f)
    with pytest.raises(WaltError, match="data.path: folder not found: /nonexistent/videos"):
        build_dataset(recipe.data)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sample.steps=[0]", "sample.steps: must list DDIM steps >= 1"),
        ("sample.frames=16", "sample.frames: must be 1 + 4k"),
        ("sample.noise_level=[1.5]", "sample.noise_level: must list levels in [0, 1]"),
    ],
)
def test_sample_section_is_checked(tmp_path: Path, override: str, message: str):
    with pytest.raises(WaltError, match=re.escape(message)):
        load_recipe(REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path}", override])
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path}"])
    assert list(recipe.sample.steps) == [2, 2]
