"""The `walt` command line: help with examples, version, data preview, one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from walt_cli.data.video import probe, read_image

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def test_help_lists_commands_with_examples(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "data" in result.stdout
    import typer.main

    from walt_cli.cli import app

    group = typer.main.get_command(app)

    def walk(cmd, prefix=()):
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, (*prefix, name))
        if not getattr(cmd, "commands", None):
            yield prefix, cmd

    leaves = list(walk(group))
    assert leaves
    for path, cmd in leaves:
        text = cmd.help or ""
        assert re.search(r"Examples?:\s+walt " + " ".join(path), text), (
            f"`walt {' '.join(path)}` help has no example"
        )
        # Rich keeps single line breaks: each paragraph must be one line, wrapped by Rich
        assert all("\n" not in p for p in text.split("\n\n")), f"`walt {' '.join(path)}`"


def test_help_paragraphs_wrap_to_the_terminal(cli):
    """A docstring paragraph wrapped at 100 columns in the source is one line in a wide
    terminal, not broken where the source broke it."""
    from typer.testing import CliRunner

    from walt_cli.cli import app

    out = CliRunner().invoke(app, ["train-sr", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--sr N` (runs/<name>/latents/srN/). Writes runs/<name>/srN/: last.ckpt" in out
    assert "srN.safetensors (EMA weights + config +" in out


def test_version(cli):
    from walt_cli import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"walt {__version__}"


def test_cli_import_stays_light():
    """`walt --help` must not pay for torch or lightning: they are imported inside commands."""
    code = "import sys, walt_cli.cli; print(sorted(m for m in ('torch', 'lightning', 'decord') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("suffix", [".gif", ".png", ".mp4"])
def test_data_preview_writes_what_the_model_sees(cli, tmp_path: Path, suffix: str):
    out = tmp_path / f"preview{suffix}"
    result = cli("data", "preview", TINY, f"run_dir={tmp_path}/run", "--out", out, "-n", "4")
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.stat().st_size > 0
    assert "moving" in result.stdout and "9 frames x 32x32" in result.stdout
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    if suffix == ".png":
        sheet = read_image(out)
        assert sheet.shape == (4 * 32 + 3 * 2, 9 * 32 + 8 * 2, 3)
    else:
        info = probe(out)
        assert info.num_frames == 9 and (info.height, info.width) == (66, 66)


@pytest.mark.assets
def test_data_preview_on_a_folder_of_real_clips(cli, tmp_path: Path, videos_dir: Path):
    out = tmp_path / "real.mp4"
    result = cli(
        "data",
        "preview",
        TINY,
        "data.source=folder",
        f"data.path={videos_dir}",
        "data.val_fraction=0",
        "data.resolution=[64,64]",
        "data.num_frames=9",
        f"run_dir={tmp_path}/run",
        "--out",
        out,
        "--scan",
    )
    assert result.exit_code == 0, result.output
    assert "15 (8 shown" in result.stdout
    assert (
        "3 unreadable of all items" in result.stdout
    )  # the 5-, 5- and 8-frame clips are too short
    assert probe(out).num_frames == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data.colour=red",), "unknown key 'data.colour'"),
        (("data.num_frames=16",), "data.num_frames: must be 1 + 4k"),
        (
            ("data.source=folder", "data.path=/no/such/dir"),
            "data.path: folder not found: /no/such/dir",
        ),
    ],
)
def test_bad_recipe_is_one_line_exit_2(cli, tmp_path: Path, args, message):
    run = tmp_path / "run"
    result = cli("data", "preview", TINY, *args, f"run_dir={run}", "--out", tmp_path / "x.gif")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.gif").exists() and not run.exists()


def test_missing_recipe_and_bad_output(cli, tmp_path: Path):
    result = cli("data", "preview", tmp_path / "nope.yaml", "--out", tmp_path / "x.gif")
    assert result.exit_code == 2 and "recipe not found" in result.stderr
    result = cli("data", "preview", TINY, "--out", tmp_path / "x.avi")
    assert result.exit_code == 2 and "unsupported format" in result.stderr


def test_print_config(cli, tmp_path: Path):
    result = cli(
        "data", "preview", TINY, "data.num_frames=5", "--print-config", "--out", tmp_path / "x.gif"
    )
    assert result.exit_code == 0
    assert "num_frames: 5" in result.stdout and "name: tiny" in result.stdout
    assert not (tmp_path / "x.gif").exists()


def test_console_script_runs():
    """The installed entry point answers (exit 0) and shows usage."""
    out = subprocess.run(
        [sys.executable, "-m", "walt_cli.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "Usage" in out.stdout
