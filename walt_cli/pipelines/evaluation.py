"""A model's own samples for FVD (`walt eval-fvd --model`): N samples through the pipeline,
conditioned as the evaluation asks, written as frame folders (lossless PNG, one folder per
sample) that `metrics.fvd.evaluate_sets` reads as the generated set.

Conditions (`task`, "auto" picks from the model):
- class: labels follow the real set's class distribution when the real set is a manifest with
  labels (each sample takes the label of a real clip, in a seeded shuffled order), else uniform
  (sample i gets class i mod C);
- text: the captions of a manifest (.jsonl with "caption"), in order, cycling;
- frames: frame prediction, each sample continues real clip i mod n from its first 5 frames
  (2 latent frames: the K600 setting), so its first frames are the real clip's;
- unconditional.

Sample i always uses seed + i. Sampling spreads over `devices` with Lightning Fabric (each rank
takes every world-th missing sample), and resumes: a sample folder is renamed into place when
complete, so the folders already there are kept and only the missing ones are made. The
folder's `generation.json` records the model hashes and settings; another model or other
settings in the same folder are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walt_cli.errors import WaltError

TASKS = ("auto", "class", "text", "frames", "unconditional")
SETTINGS_FILE = "generation.json"


@dataclass
class Job:
    index: int
    seed: int
    label: int | None = None
    prompt: str | None = None
    context: int | None = None  # frames task: index of the real clip continued


def sample_name(index: int) -> str:
    return f"sample-{index:06d}"


def write_frame_folder(folder: Path, frames) -> Path:
    """uint8 (T, H, W, 3) as folder/0000.png ... in one ffmpeg call (image2 muxer), written to a
    temporary folder and renamed into place."""
    import imageio_ffmpeg
    import numpy as np

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t, h, w, _ = frames.shape
        writer = imageio_ffmpeg.write_frames(
            str(tmp / "%04d.png"),
            (w, h),
            codec="png",
            pix_fmt_out="rgb24",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-start_number", "0"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        if len(list(tmp.glob("*.png"))) != t:
            raise WaltError(f"{folder}: ffmpeg wrote {len(list(tmp.glob('*.png')))} of {t} frames")
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _manifest_rows(real: str) -> list[dict[str, Any]]:
    path = Path(real)
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise WaltError(f"{path}: not a JSONL manifest") from None
            rows.append(obj if isinstance(obj, dict) else {})
    return rows


def resolve_task(pipe, task: str) -> str:
    if task not in TASKS:
        raise WaltError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if task != "auto":
        return task
    if pipe.conditioning != "unconditional":
        return pipe.conditioning
    return "frames" if pipe.base.frame_channels else "unconditional"


def plan_jobs(pipe, task: str, real: str, num_samples: int, seed: int) -> tuple[list[Job], str]:
    """The N samples to make and how their conditions were chosen."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = _manifest_rows(real)
    jobs = [Job(i, seed + i) for i in range(num_samples)]
    if task == "class":
        labels = [r["label"] for r in rows if r.get("label") is not None]
        if labels:
            ids = [pipe.class_id(v) for v in labels]
            order = rng.permutation(len(ids))
            for job in jobs:
                job.label = ids[int(order[job.index % len(ids)])]
            return jobs, f"classes of the {len(ids)} labelled real clips"
        c = pipe.base.net.num_classes
        for job in jobs:
            job.label = job.index % c
        return jobs, f"uniform over {c} classes"
    if task == "text":
        captions = [r["caption"] for r in rows if r.get("caption")]
        if not captions:
            raise WaltError(f"--real {real}: a text model needs captions (a .jsonl with 'caption')")
        for job in jobs:
            job.prompt = captions[job.index % len(captions)]
        return jobs, f"captions of {len(captions)} real clips"
    if task == "frames":
        from walt_cli.metrics.videoset import open_video_set

        n = len(open_video_set(real, what="--real"))
        for job in jobs:
            job.context = job.index % n
        return jobs, f"continuations of {n} real clips from their first 5 frames"
    if pipe.conditioning == "class":
        raise WaltError("--task unconditional on a class-conditional model: use --task class")
    return jobs, "unconditional"


def generate_set(
    model: str | None,
    real: str,
    out: Path,
    *,
    num_samples: int,
    task: str = "auto",
    seed: int = 0,
    steps=None,
    guidance=None,
    num_frames: int | None = None,
    batch_size: int = 8,
    devices: int = 1,
    accelerator: str = "auto",
    precision: str = "auto",
    progress=None,
) -> dict[str, Any]:
    """Make the missing samples of `out` (see the module docstring); returns what generation.json
    holds plus how many samples were made and kept."""
    import lightning as L
    import torch

    from walt_cli.pipelines.cascade import Pipeline
    from walt_cli.pipelines.requests import check_writable

    if num_samples < 2:
        raise WaltError(f"FVD needs at least 2 samples, got --num-samples {num_samples}")
    if devices < 1:
        raise WaltError(f"--devices must be >= 1, got {devices}")
    check_writable(out)
    fabric = L.Fabric(
        accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto"
    )
    fabric.launch()
    pipe = Pipeline.from_bundle(model, device=str(fabric.device), precision=precision)
    task = resolve_task(pipe, task)
    frames = num_frames or pipe.defaults.get("frames") or pipe.clip_frames
    pipe.check_frames(frames)
    jobs, how = plan_jobs(pipe, task, real, num_samples, seed)
    settings = {
        "model": model or "default",
        "model_hashes": pipe.hashes,
        "task": task,
        "conditions": how,
        "seed": seed,
        "steps": steps or pipe.default_steps(),
        "guidance": guidance or pipe.default_guidance(),
        "num_frames": frames,
        "resolution": list(pipe.resolution),
    }
    out.mkdir(parents=True, exist_ok=True)
    if fabric.global_rank == 0:  # a killed run's half-written sample
        for stale in out.glob(f".{sample_name(0)[:-6]}*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    settings_file = out / SETTINGS_FILE
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        before_core = {k: before.get(k) for k in settings if k != "model"}
        if before_core != {k: v for k, v in settings.items() if k != "model"}:
            raise WaltError(
                f"{out}: holds samples of another model or other settings ({SETTINGS_FILE}); "
                "use another folder"
            )
    elif fabric.global_rank == 0:
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    missing = [j for j in jobs if not (out / sample_name(j.index)).is_dir()]
    mine = missing[fabric.global_rank :: fabric.world_size]
    real_set = None
    if task == "frames":
        from walt_cli.metrics.videoset import open_video_set

        real_set = open_video_set(real, what="--real")
    done = 0
    for lo in range(0, len(mine), batch_size):
        batch = mine[lo : lo + batch_size]
        common = dict(
            seeds=[j.seed for j in batch], steps=steps, guidance=guidance, num_frames=frames
        )
        if task == "class":
            videos = pipe.generate(labels=[j.label for j in batch], **common)
        elif task == "text":
            videos = pipe.generate(prompts=[j.prompt for j in batch], **common)
        elif task == "frames":
            videos = torch.cat([_continue(pipe, real_set, j, common) for j in batch])
        else:
            videos = pipe.generate(**common)
        for job, video in zip(batch, videos, strict=True):
            write_frame_folder(out / sample_name(job.index), video.numpy())
        done += len(batch)
        if progress is not None:
            progress("generating samples", len(jobs) - len(missing) + done, len(jobs))
    fabric.barrier()
    manifest = out / f"samples-{num_samples}.txt"  # exactly samples 0..N-1, whatever else is there
    if fabric.global_rank == 0:
        manifest.write_text("".join(f"{sample_name(j.index)}\n" for j in jobs))
    return {
        **settings,
        "made": len(missing),
        "kept": len(jobs) - len(missing),
        "manifest": str(manifest),
        "is_main": fabric.global_rank == 0,
    }


def _continue(pipe, real_set, job: Job, common: dict):
    import torch

    from walt_cli.metrics.videoset import read_clip

    frames = read_clip(real_set.items[job.context], 0, 5)
    return pipe.continue_video(
        torch.from_numpy(frames), **{**common, "seeds": [job.seed]}, context_frames=5
    )
