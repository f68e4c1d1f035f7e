"""`walt eval-fvd`: the golden value end to end, JSON, the --max-fvd gate, errors, detector tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from walt_cli.data.video import write_image, write_video


@pytest.fixture()
def env(tmp_path, monkeypatch, assets):
    """A private cache; the detector comes from the assets."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WALT_ASSETS", str(assets))
    monkeypatch.delenv("WALT_I3D", raising=False)
    return tmp_path


def _constant_set(folder: Path, n: int, value: int, *, t: int, size: int = 64) -> Path:
    """n copies of a constant-colour clip (mp4 decodes black/white exactly)."""
    folder.mkdir(parents=True)
    first = write_video(folder / "c00.mp4", np.full((t, size, size, 3), value, np.uint8), fps=8)
    for i in range(1, n):
        shutil.copy(first, folder / f"c{i:02d}.mp4")
    return folder


def test_golden_fvd_zeros_vs_ones(cli, env):
    real = _constant_set(env / "zeros", 8, 0, t=30)
    fake = _constant_set(env / "ones", 8, 255, t=30)
    out = env / "fvd.json"
    res = cli("eval-fvd", "--real", real, "--fake", fake, "--frames", "30", "--json", out)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["fvd"] == pytest.approx(151.4, abs=1.0)  # TF 151.39, StyleGAN-V port 151.26
    assert (data["protocol"], data["num_real"], data["num_fake"]) == ("magvit", 8, 8)
    assert data["frames"] == 30 and data["resolution"] == [64, 64] and data["seconds"] > 0
    assert "151.3" in res.stdout or "151.4" in res.stdout  # the Rich result table


def test_max_fvd_gate_and_cached_real_stats(cli, env):
    # Frame folders on the real side (read once: the second run takes the cached statistics),
    # videos on the generated side; 9 frames is I3D's minimum.
    real = env / "black"
    for k in range(2):
        for f in range(9):
            write_image(real / f"clip{k}" / f"{f}.png", np.full((32, 32, 3), 40 * k, np.uint8))
    fake = _constant_set(env / "white", 2, 255, t=9, size=32)
    args = ("eval-fvd", "--real", real, "--fake", fake, "--protocol", "raw")
    res = cli(*args, "--max-fvd", "10")
    assert res.exit_code == 1, res.output
    assert "above --max-fvd 10" in res.stderr
    res = cli(*args, "--max-fvd", "1e6", "--json", env / "r.json")
    assert res.exit_code == 0, res.output
    data = json.loads((env / "r.json").read_text())
    assert data["real_stats_cached"] is True and data["frames"] is None
    assert data["fvd"] > 10


@pytest.mark.parametrize(
    "args, message",
    [
        (("--frames", "8"), "at least 9 frames"),
        (("--protocol", "tats"), "unknown FVD protocol"),
        (("--num-samples", "1"), "at least 2 clips per side"),
    ],
)
def test_bad_options_are_one_line_errors(cli, env, args, message):
    real = _constant_set(env / "a", 2, 0, t=16, size=32)
    fake = _constant_set(env / "b", 2, 255, t=16, size=32)
    res = cli("eval-fvd", "--real", real, "--fake", fake, *args)
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_sets_are_one_line_errors(cli, env):
    one = _constant_set(env / "one", 1, 0, t=16, size=32)
    two = _constant_set(env / "two", 2, 255, t=16, size=32)
    big = _constant_set(env / "big", 2, 255, t=16, size=48)
    cases = [
        (("--real", two, "--fake", one), "at least 2 clips per side"),
        (
            ("--real", big, "--fake", two, "--protocol", "raw"),
            "48x48 but generated clips are 32x32",
        ),
        (("--real", env / "missing", "--fake", two), "no such folder"),
        (("--real", two), "needs both --real and --fake"),
        ((), "nothing to do"),
    ]
    for args, message in cases:
        res = cli("eval-fvd", *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr, (args, res.stderr)


def test_classify_prints_top5(cli, env, videos_dir):
    res = cli(
        "eval-fvd",
        "--classify",
        videos_dir / "kinetics-i3d_v_CricketShot_g04_c01_rgb.gif",
        "--frames",
        "32",
    )
    assert res.exit_code == 0, res.output
    lines = [
        ln for ln in res.stdout.splitlines() if "│" in ln and ln.split("│")[1].strip().isdigit()
    ]
    assert len(lines) == 5
    assert "playing cricket" in lines[0]
    res = cli("eval-fvd", "--classify", videos_dir / "mmpose_demo.mp4")  # 5 frames
    assert res.exit_code == 2 and "at least 9" in res.stderr


def test_export_detector_then_use_it(cli, env):
    out = env / "i3d.safetensors"
    res = cli("eval-fvd", "--export-detector", out)
    assert res.exit_code == 0, res.output
    from walt_cli.models.checkpoint import load_weights

    config, state, extra = load_weights(out, kind="i3d-kinetics-400")
    assert config == {"num_classes": 400} and len(state) == 344
    assert extra["source"] == "i3d-kinetics-400.ckpt"
    bad = env / "evil.ckpt"
    bad.write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")
    res = cli("eval-fvd", "--export-detector", env / "x.safetensors", "--detector", bad)
    assert res.exit_code == 2 and "refusing to load global os.system" in res.stderr


def test_fetch_detector_uses_the_fetcher(cli, env, monkeypatch):
    from walt_cli.metrics import weights

    fetched = []

    def fake_fetch(name, force=False):
        fetched.append(name)
        return env / f"{name}.bin"

    monkeypatch.setattr(weights, "fetch", fake_fetch)
    res = cli("eval-fvd", "--fetch-detector")
    assert res.exit_code == 0, res.output
    assert fetched == ["i3d", "inception"]
    assert "i3d.bin" in res.stdout
