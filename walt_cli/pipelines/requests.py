"""What `walt sample` and `walt animate` ask the pipeline for, and the files they write.

A `Request` holds everything that decides the pixels (model, conditions, seeds, steps, guidance,
frames, the input image or clip); it is written beside each video as a JSON sidecar, with the
model's hashes, the walt version, device and timings, and `walt sample --from SIDECAR` reads it
back to make the same video again.

Outputs (`--out`): a .mp4/.gif file holds one sample, or all samples tiled into one video; a .png
file is a contact sheet (one row per sample); anything else is a folder with one video and one
sidecar per sample. The output is checked for writability before any compute, and every file is
written to a temporary name and renamed, so a failed run leaves nothing partial behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from walt_cli.errors import WaltError

FILE_SUFFIXES = (".mp4", ".gif", ".png")


@dataclass
class Request:
    kind: str  # sample | animate | continue
    model: str | None  # a run dir, a bundle, or None for the default model
    prompts: list[str | None]  # one per sample (None: class or unconditional models)
    labels: list[int | None]  # one per sample
    seeds: list[int]
    steps: list[int] | None = None  # per stage (None: the model's defaults)
    guidance: list[float] | None = None
    num_frames: int | None = None
    fps: float | None = None
    image: str | None = None  # animate: the image file
    video: str | None = None  # continue: the clip
    input_sha256: str | None = None
    device: str = "auto"
    precision: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def parse_values(values: list[str] | None, name: str, cast, minimum=None) -> list | None:
    """`--guidance 4,2` or `--guidance 4 --guidance 2` -> [4.0, 2.0]; each value at least
    `minimum` when one is given."""
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(cast(part))
            except ValueError:
                raise WaltError(f"{name}: {part!r} is not a number") from None
            if minimum is not None and out[-1] < minimum:
                raise WaltError(f"{name}: {part} is below {minimum}")
    return out or None


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt a line; blank lines skipped; an empty file is an error."""
    p = Path(path)
    if not p.is_file():
        raise WaltError(f"--prompts {p}: file not found")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise WaltError(f"--prompts {p}: not a UTF-8 text file") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise WaltError(f"--prompts {p}: the file holds no prompts")
    return prompts


def check_writable(out: Path) -> None:
    """Fail before any compute when `out` cannot be written."""
    if out.suffix.lower() in FILE_SUFFIXES:
        if out.is_dir():
            raise WaltError(f"--out {out}: is a directory")
        target = out.parent
    else:
        if out.exists() and not out.is_dir():
            raise WaltError(f"--out {out}: exists and is not a directory (or use .mp4/.gif/.png)")
        target = out
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise WaltError(f"--out {out}: {probe} is not a writable directory")


def slug(text: str | None, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")
    return s[:limit].rstrip("-") or "sample"


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_output(path: Path, videos, fps: float) -> Path:
    """uint8 videos (B, T, H, W, 3) into one file: the video, all tiled, or a contact sheet."""
    import torch

    from walt_cli.data.video import contact_sheet, tile_videos, write_image, write_video

    if path.suffix.lower() == ".png":
        sheet = contact_sheet([v.numpy() for v in videos], max_frames=videos.shape[1])
        return _atomic(path, lambda p: write_image(p, sheet))
    if videos.shape[0] == 1:
        clip = videos[0].numpy()
    else:
        floats = videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, H, W)
        clip = tile_videos(floats, ncols=min(len(videos), 4))
        clip = ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
        clip = clip.numpy()
    return _atomic(path, lambda p: write_video(p, clip, fps=fps))


def write_sidecar(path: Path, data: dict[str, Any]) -> Path:
    return _atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def load_sidecar(path: str | os.PathLike) -> Request:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        request = Request.from_json(data["request"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise WaltError(f"--from {p}: not a walt sidecar ({err})") from None
    return request


def _warn_unknown_words(prompts: list[str | None], vocabulary: dict[str, list[str]]) -> None:
    """Warn (once per prompt) about words the model never saw in a caption: the video is still
    made, but those words steer nothing the model learned."""
    from walt_cli.console import warn
    from walt_cli.data.shapes_vocab import describe, unknown_words

    for prompt in dict.fromkeys(p for p in prompts if p):
        unknown = unknown_words(prompt, vocabulary)
        if unknown:
            warn(
                f"{prompt!r}: words outside the model's vocabulary: {', '.join(unknown)} "
                f"(it knows {describe(vocabulary)})"
            )


def run(
    request: Request,
    out: Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    pipeline=None,
    expected_hashes: dict[str, str] | None = None,
) -> list[Path]:
    """Generate what `request` asks for and write it to `out` (see the module docstring).
    Returns the files written (videos, then sidecars)."""
    import torch

    from walt_cli import __version__
    from walt_cli.pipelines.cascade import Pipeline

    check_writable(out)
    if batch_size < 1:
        raise WaltError(f"--batch-size must be >= 1, got {batch_size}")
    input_frames = _read_input(request)
    pipe = pipeline or Pipeline.from_bundle(
        request.model, device=request.device, precision=request.precision
    )
    if expected_hashes and expected_hashes != pipe.hashes:
        from walt_cli.console import warn

        warn(
            "the sidecar was made by other model files "
            f"({expected_hashes}); this model is {pipe.hashes}: the video will differ"
        )
    if pipe.conditioning == "class" and any(p for p in request.prompts if p):
        raise WaltError("this model is class-conditional: pass --class NAME|ID instead of a prompt")
    if pipe.conditioning == "text" and any(v is not None for v in request.labels):
        raise WaltError("this model is text-conditioned: pass a prompt instead of --class")
    if pipe.conditioning == "text" and pipe.vocabulary:
        _warn_unknown_words(request.prompts, pipe.vocabulary)
    num_frames = request.num_frames or pipe.defaults.get("frames") or pipe.clip_frames
    pipe.check_frames(num_frames)
    fps = float(request.fps or pipe.fps)
    if fps <= 0:
        raise WaltError(f"--fps must be positive, got {fps}")

    n = len(request.seeds)
    videos, timings = [], {}
    start = time.perf_counter()
    with _progress_bar(pipe, progress) as report:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            prompts = request.prompts[lo:hi] if pipe.conditioning == "text" else None
            labels = request.labels[lo:hi] if pipe.conditioning == "class" else None
            common = dict(
                seeds=request.seeds[lo:hi],
                prompts=prompts,
                labels=labels,
                num_frames=num_frames,
                steps=request.steps,
                guidance=request.guidance,
                callback=report,
            )
            if request.kind == "animate":
                video = pipe.animate(input_frames, **common)
            elif request.kind == "continue":
                ctx = int(request.extra.get("context_frames", 5))
                video = pipe.continue_video(input_frames, context_frames=ctx, **common)
            else:
                video = pipe.generate(**common)
            videos.append(video)
            for k, v in pipe.timings.items():
                timings[k] = timings.get(k, 0.0) + v
    videos = torch.cat(videos)
    seconds = time.perf_counter() - start
    about = {
        "walt_version": __version__,
        "request": request.to_json(),
        "model_name": pipe.name,
        "model_hashes": pipe.hashes,
        "conditioning": pipe.conditioning,
        "steps": request.steps or pipe.default_steps(),
        "guidance": request.guidance or pipe.default_guidance(),
        "num_frames": int(videos.shape[1]),
        "fps": fps,
        "resolution": list(pipe.resolution),
        "device": str(pipe.device),
        "precision": pipe.precision,
        "batch_invariant": pipe.batch_invariant,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "seconds": round(seconds, 3),
        "samples": [
            {"prompt": p, "class": y, "class_name": _class_name(pipe, y), "seed": s}
            for p, y, s in zip(request.prompts, request.labels, request.seeds, strict=True)
        ],
    }
    written: list[Path] = []
    if out.suffix.lower() in FILE_SUFFIXES:
        written.append(write_output(out, videos, fps))
        written.append(write_sidecar(out.with_suffix(".json"), about))
        return written
    for i in range(n):
        one = Request(
            **{
                **request.to_json(),
                "prompts": [request.prompts[i]],
                "labels": [request.labels[i]],
                "seeds": [request.seeds[i]],
            }
        )
        name = f"{i:04d}-{slug(request.prompts[i] or _class_name(pipe, request.labels[i]))}-s{request.seeds[i]}"
        path = write_output(out / f"{name}.mp4", videos[i : i + 1], fps)
        sample = {**about, "request": one.to_json(), "samples": about["samples"][i : i + 1]}
        sample["batch_size"] = min(batch_size, n)
        write_sidecar(path.with_suffix(".json"), sample)
        written += [path, path.with_suffix(".json")]
    return written


def _class_name(pipe, label) -> str | None:
    if label is None or not (0 <= label < len(pipe.class_names)):
        return None
    return pipe.class_names[label]


def _read_input(request: Request):
    """The image (animate) or clip (continue) as uint8 frames, checked against the sidecar's
    sha256 when regenerating."""
    import torch

    from walt_cli.data.video import VideoDecodeError, is_image, read_frames, read_image
    from walt_cli.pipelines.bundle import sha256_file

    path = request.image if request.kind == "animate" else request.video
    if request.kind == "sample" or path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise WaltError(f"{p}: file not found")
    digest = sha256_file(p)
    if request.input_sha256 and request.input_sha256 != digest:
        raise WaltError(f"{p}: not the file the sidecar was made from (sha256 differs)")
    request.input_sha256 = digest
    try:
        if request.kind == "animate":
            if not is_image(p):
                raise WaltError(f"{p}: not an image (png, jpg, bmp, webp, tif)")
            frames = read_image(p)
        else:
            frames, _ = read_frames(p)
    except (VideoDecodeError, RuntimeError, OSError) as err:  # ffmpeg / decord refusals
        what = "an image" if request.kind == "animate" else "a video"
        reason = str(err).split(": ")[-1] if str(err) else type(err).__name__
        raise WaltError(f"{p}: not {what} that can be decoded ({reason})") from None
    return torch.from_numpy(frames)


class _progress_bar:
    """Rich progress across clips, stages and steps (one bar per stage)."""

    def __init__(self, pipe, enabled: bool) -> None:
        self.enabled = enabled
        self.pipe = pipe

    def __enter__(self):
        if not self.enabled:
            return None
        from walt_cli.console import progress

        self.bar = progress().__enter__()
        self.tasks: dict[str, int] = {}
        return self

    def __call__(self, event) -> None:
        key = event.stage
        label = f"{event.stage} (clip {event.chunk}/{event.chunks})" if event.chunks > 1 else key
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(label, total=event.total)
        self.bar.update(self.tasks[key], completed=event.step, total=event.total, description=label)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
