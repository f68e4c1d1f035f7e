"""Video decoding and encoding.

Reading: decord first (fast, random access), imageio-ffmpeg's reader as the fallback for what
decord cannot open (GIFs, some containers). Writing: imageio-ffmpeg (H.264 mp4, palette GIF, PNG).

Conventions: a clip is a float tensor (C, T, H, W) in [-1, 1]; frames on disk are uint8
(T, H, W, 3) RGB. Frame counts default to 1 + 4k, the causal tokenizer's layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from walt_cli.errors import WaltError

VIDEO_EXTS = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv", ".flv"}
)
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
SHORT_POLICIES = ("error", "loop", "pad")


class VideoDecodeError(WaltError):
    """A file that no backend can decode (corrupt, truncated, empty or not a video)."""


class ClipTooShortError(WaltError):
    """A video with fewer frames than the requested clip needs (short policy "error")."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    backend: str


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


# --------------------------------------------------------------------------------------------
# Decoding backends


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file")


def _decord_reader(path: Path):
    """A decord VideoReader, or None where decord cannot read the file (e.g. GIF)."""
    if path.suffix.lower() == ".gif":  # decord has no GIF demuxer; do not even try.
        return None
    try:
        import decord

        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        if len(reader) == 0:
            return None
        return reader
    except Exception:  # decord raises its own DECORDError and plain RuntimeErrors
        return None


def _ffmpeg_frames(path: Path, wanted: set[int] | None) -> tuple[np.ndarray, float]:
    """Decode sequentially with imageio-ffmpeg; keep the frames whose index is in `wanted`."""
    import imageio_ffmpeg

    try:
        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(gen)
        width, height = meta["size"]
        fps = float(meta.get("fps") or 0.0)
        last = max(wanted) if wanted else None
        frames = []
        for i, raw in enumerate(gen):
            if wanted is None or i in wanted:
                frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            if last is not None and i >= last:
                break
        gen.close()
    except (RuntimeError, OSError, StopIteration, ValueError) as err:
        raise VideoDecodeError(f"{path}: cannot decode ({_first_line(err)})") from None
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frames")
    return np.stack(frames), fps


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, fps and size of a video (decodes the file with ffmpeg where decord cannot)."""
    path = Path(path)
    _check_file(path)
    if is_image(path):
        frame = read_image(path)
        return VideoInfo(1, 0.0, frame.shape[1], frame.shape[0], "image")
    reader = _decord_reader(path)
    if reader is not None:
        h, w = reader[0].shape[:2]
        return VideoInfo(len(reader), float(reader.get_avg_fps()), w, h, "decord")
    frames, fps = _ffmpeg_frames(path, None)
    return VideoInfo(len(frames), fps, frames.shape[2], frames.shape[1], "ffmpeg")


def read_frames(
    path: str | os.PathLike, indices: Sequence[int] | None = None
) -> tuple[np.ndarray, float]:
    """Decode frames as uint8 (T, H, W, 3) RGB plus the stream's fps.

    `indices` selects frames (repeats allowed, any order); None decodes the whole file.
    """
    path = Path(path)
    _check_file(path)
    if is_image(path):
        frame = read_image(path)[None]
        return (frame if indices is None else frame[[0 for _ in indices]]), 0.0
    reader = _decord_reader(path)
    if reader is not None:
        fps = float(reader.get_avg_fps())
        try:
            idx = list(range(len(reader))) if indices is None else [int(i) for i in indices]
            return reader.get_batch(idx).asnumpy(), fps
        except Exception:  # a frame decord cannot seek to: fall through to ffmpeg
            pass
    if indices is None:
        return _ffmpeg_frames(path, None)
    unique = sorted(set(int(i) for i in indices))
    frames, fps = _ffmpeg_frames(path, set(unique))
    if len(frames) < len(unique):
        raise VideoDecodeError(f"{path}: truncated (frame {unique[len(frames)]} is missing)")
    pos = {i: k for k, i in enumerate(unique)}
    return frames[[pos[int(i)] for i in indices]], fps


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB, decoded by ffmpeg (no Pillow dependency)."""
    path = Path(path)
    _check_file(path)
    frames, _ = _ffmpeg_frames(path, {0})
    return frames[0]


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (its first 24 bytes), or None for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _concat_pngs(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray | None:
    """PNG files of one size decoded by ONE ffmpeg process through the concat demuxer (each
    file one frame, passed through without frame-rate conversion); None where that fails (an
    ffmpeg older than 5.1 has no -fps_mode, a name ffconcat cannot quote), for the caller's
    file-by-file path."""
    import tempfile

    import imageio_ffmpeg

    if any("\n" in str(p) or "\r" in str(p) for p in paths):
        return None
    lines = ["ffconcat version 1.0"]
    for p in paths:
        quoted = str(Path(p).resolve()).replace("'", "'\\''")
        lines += [f"file '{quoted}'", "duration 1"]
    fd, listing = tempfile.mkstemp(suffix=".ffconcat", prefix="walt-frames-")
    width, height = size
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        gen = imageio_ffmpeg.read_frames(
            listing,
            pix_fmt="rgb24",
            input_params=["-f", "concat", "-safe", "0"],
            output_params=["-fps_mode", "passthrough"],
        )
        meta = next(gen)
        if tuple(meta["size"]) != (width, height):
            gen.close()
            return None
        frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in gen]
    except (RuntimeError, OSError, StopIteration, ValueError):
        return None
    finally:
        os.unlink(listing)
    return np.stack(frames) if len(frames) == len(paths) else None


def read_images(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Image files of one size (a frame folder) as uint8 (N, H, W, 3) RGB.

    PNG frames, what `walt eval-fvd --model` and the bench scripts write, are decoded by one
    ffmpeg process for the whole list, where a process per file spends most of its time
    starting (17 frames of 128x128: 0.073 s instead of 1.038 s, 14x; `bench/bench_frame_folders.py`
    on 2 CPU cores). Sizes are read from the PNG headers first, so frames of different sizes are
    still refused. Anything else (JPEG, ..., or a failed batch call) is decoded file by file.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return np.zeros((0, 1, 1, 3), np.uint8)
    folder = paths[0].parent
    sizes = [_png_size(p) for p in paths]
    if len(paths) > 1 and all(s is not None for s in sizes):
        if len(set(sizes)) > 1:
            raise WaltError(f"{folder}: its frame images differ in size")
        batch = _concat_pngs(paths, sizes[0])
        if batch is not None:
            return batch
    frames = [read_image(p) for p in paths]
    if len({f.shape for f in frames}) > 1:
        raise WaltError(f"{folder}: its frame images differ in size")
    return np.stack(frames)


# --------------------------------------------------------------------------------------------
# Clip sampling


def clip_indices(
    total: int,
    num_frames: int,
    *,
    step: float = 1.0,
    start: int = 0,
    short: str = "error",
    source: str = "video",
) -> list[int]:
    """Frame indices of a clip of `num_frames` frames taken every `step` source frames.

    `short` says what happens when the video has too few frames: "error" raises
    :class:`ClipTooShortError`, "loop" wraps around to the start, "pad" repeats the last frame.
    """
    if short not in SHORT_POLICIES:
        raise WaltError(f"short-clip policy must be one of {SHORT_POLICIES}, got {short!r}")
    idx = [start + int(math.floor(k * step + 1e-6)) for k in range(num_frames)]
    if idx[-1] < total:
        return idx
    if short == "error":
        need = int(math.floor((num_frames - 1) * step + 1e-6)) + 1
        raise ClipTooShortError(
            f"{source}: {total} frames, but a clip of {num_frames} frames at step {step:g} needs {need}"
        )
    if short == "loop":
        return [i % total for i in idx]
    return [min(i, total - 1) for i in idx]


def clip_span(num_frames: int, step: float) -> int:
    """How many source frames a clip of `num_frames` frames at `step` covers."""
    return int(math.floor((num_frames - 1) * step + 1e-6)) + 1


def resize_crop(
    video: torch.Tensor,
    size: int | str | None,
    crop: tuple[int, int] | None,
    *,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize (antialiased bilinear), then take a centre or random crop of (H, W).

    video: (C, T, H, W) float. `size` is the short side after resizing, or "cover" for the
    smallest size whose frame covers the crop (aspect ratio kept), or None for no resize.
    """
    c, t, h, w = video.shape
    if size == "cover":
        if crop is None:
            raise ValueError("size='cover' needs a crop")
        scale = max(crop[0] / h, crop[1] / w)
        nh, nw = max(crop[0], round(h * scale)), max(crop[1], round(w * scale))
    elif size is not None:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh, nw = h, w
    if (nh, nw) != (h, w):
        video = (
            F.interpolate(
                video.transpose(0, 1),
                size=(nh, nw),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            .transpose(0, 1)
            .clamp_(-1.0, 1.0)
        )  # antialiased bilinear overshoots slightly
        h, w = nh, nw
    if crop is not None:
        ch, cw = crop
        if ch > h or cw > w:
            raise WaltError(f"cannot crop {ch}x{cw} out of a {h}x{w} frame; set a larger resize")
        if random_crop:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        video = video[:, :, top : top + ch, left : left + cw]
    return video


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3), rounding to nearest."""
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


@dataclass(frozen=True)
class Clip:
    video: torch.Tensor  # (3, T, H, W) in [-1, 1]
    start: int  # first source frame
    step: float  # source frames between clip frames
    fps: float  # frame rate of the clip (source fps / step)
    source_frames: int  # frames in the source file


def load_clip(
    path: str | os.PathLike,
    *,
    num_frames: int | None = 17,
    stride: int = 1,
    fps: float | None = None,
    start: int | str = "random",
    size: int | str | None = None,
    crop: tuple[int, int] | None = None,
    random_crop: bool = False,
    short: str = "error",
    generator: torch.Generator | None = None,
) -> Clip:
    """Decode one clip of a video (or image) as float (3, T, H, W) in [-1, 1].

    Args:
        num_frames: frames in the clip (None: every frame of the file).
        stride: take every `stride`-th source frame; ignored where `fps` is given.
        fps: resample to this frame rate (by picking frames, no blending).
        start: first source frame, "random" or "center" (the clip's place in the video).
        size / crop / random_crop: resize (short side, or "cover" the crop), then a centre (or
            random) crop (H, W); see `resize_crop`.
        short: what to do with videos shorter than the clip: "error", "loop" or "pad".
    """
    path = Path(path)
    if is_image(path):
        frames, src_fps = read_frames(path)
        if num_frames not in (None, 1):
            frames = frames[[0] * num_frames]
        video = resize_crop(
            frames_to_tensor(frames), size, crop, random_crop=random_crop, generator=generator
        )
        return Clip(video, 0, 1.0, 0.0, 1)

    info = probe(path)
    src_fps = info.fps if info.fps > 0 else 25.0
    # A target fps above the source's gives step < 1: frames repeat, nothing is invented.
    step = src_fps / fps if fps else float(stride)
    if num_frames is None:
        n = max(1, int(math.floor((info.num_frames - 1) / step + 1e-6)) + 1)
        indices = clip_indices(info.num_frames, n, step=step, short="pad", source=str(path))
        first = 0
    else:
        span = clip_span(num_frames, step)
        room = max(info.num_frames - span, 0)
        if start == "random":
            first = int(torch.randint(0, room + 1, (1,), generator=generator))
        elif start == "center":
            first = room // 2
        else:
            first = int(start)
            if first < 0 or (first >= info.num_frames):
                raise WaltError(
                    f"{path}: start frame {first} is outside its {info.num_frames} frames"
                )
        indices = clip_indices(
            info.num_frames, num_frames, step=step, start=first, short=short, source=str(path)
        )
    frames, _ = read_frames(path, indices)
    video = resize_crop(
        frames_to_tensor(frames), size, crop, random_crop=random_crop, generator=generator
    )
    return Clip(video, first, step, src_fps / step, info.num_frames)


# --------------------------------------------------------------------------------------------
# Encoding


def _as_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Accept float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3); return uint8 (T, H, W, 3)."""
    if isinstance(video, torch.Tensor):
        if video.dtype == torch.uint8:
            return video.cpu().numpy()
        if video.ndim != 4 or video.shape[0] != 3:
            raise WaltError(f"expected a (3, T, H, W) video tensor, got {tuple(video.shape)}")
        return tensor_to_frames(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise WaltError(f"expected uint8 (T, H, W, 3) frames, got {video.dtype} {video.shape}")
    return video


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by one replicated pixel row/column.

    H.264 in yuv420p needs even sizes. imageio-ffmpeg's answer (macro_block_size) is to *rescale*
    the frames silently; we never resample pixels, we add at most one edge row and column.
    """
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(
    path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float = 8.0, *, quality: int = 8
) -> Path:
    """Write a clip as .mp4 (H.264, yuv420p), .gif (palette per clip) or .png (contact sheet).

    `video` is float (3, T, H, W) in [-1, 1] or uint8 (T, H, W, 3). Returns the path written.
    """
    import imageio_ffmpeg

    path = Path(path)
    frames = _as_frames(video)
    suffix = path.suffix.lower()
    if suffix == ".png":
        write_image(path, contact_sheet([frames]))
        return path
    if suffix not in (".mp4", ".gif"):
        raise WaltError(f"{path}: unsupported output format {suffix!r} (use .mp4, .gif or .png)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        frames = _pad_even(frames)
        kwargs = dict(
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=quality,
            output_params=["-movflags", "+faststart"],
        )
    else:
        # One palette for the whole clip, built from its own colours: far less banding than the
        # fixed web palette ffmpeg uses by default.
        kwargs = dict(
            codec="gif",
            pix_fmt_out="pal8",
            output_params=[
                "-filter_complex",
                "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=none",
                "-loop",
                "0",
            ],
        )
    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, macro_block_size=1, ffmpeg_log_level="error", **kwargs
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write one uint8 (H, W, 3) image (PNG or JPEG by suffix) through ffmpeg."""
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = image.shape
    codec = "png" if path.suffix.lower() == ".png" else "mjpeg"
    pix = "rgb24" if codec == "png" else "yuvj444p"
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        codec=codec,
        pix_fmt_out=pix,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=["-frames:v", "1", "-update", "1"],
    )
    writer.send(None)
    writer.send(np.ascontiguousarray(image))
    writer.close()
    return path


def contact_sheet(
    clips: Sequence[torch.Tensor | np.ndarray], *, max_frames: int = 17, gap: int = 2
) -> np.ndarray:
    """A grid image: one row per clip, one column per frame (at most `max_frames`, evenly spaced)."""
    rows = [_as_frames(c) for c in clips]
    h = max(r.shape[1] for r in rows)
    w = max(r.shape[2] for r in rows)
    cols = min(max_frames, max(r.shape[0] for r in rows))
    sheet = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        picks = np.linspace(0, r.shape[0] - 1, min(cols, r.shape[0])).round().astype(int)
        for j, k in enumerate(picks):
            f = r[k]
            y, x = i * (h + gap), j * (w + gap)
            sheet[y : y + f.shape[0], x : x + f.shape[1]] = f
    return sheet


def tile_videos(videos: torch.Tensor, ncols: int | None = None, gap: int = 2) -> torch.Tensor:
    """Tile a batch (B, 3, T, H, W) into one video (3, T, H', W'), white gaps between tiles."""
    b, c, t, h, w = videos.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    out = torch.ones(c, t, nrows * (h + gap) - gap, ncols * (w + gap) - gap, dtype=videos.dtype)
    for i in range(b):
        r, q = divmod(i, ncols)
        out[:, :, r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = videos[i]
    return out
