"""Text adherence on held-out shapes captions: does the video show the colour, shape and direction
the caption asks for? Prints a markdown table (walt_cli/metrics/adherence.py is the probe).

    python bench/probe_text_adherence.py --real --size 128 --num 200     # the probe on real clips
    python bench/probe_text_adherence.py --model default --num 200       # a model, beside real clips
    python bench/probe_text_adherence.py --real --size 128 --blur 2      # the probe on blurred clips
    python bench/probe_text_adherence.py --model default --through tokenizer,sr1 --num 200
    python bench/probe_text_adherence.py --model default --offset 100 --num 100  # 2nd half

The captions are the first N items of the recipe's "heldout" split (`data.shapes.holdout`
forced on): one object each, whose (colour, shape, direction) is one of the 40 triples that a
model trained with `data.shapes.holdout: true` never saw, each triple N / 40 times.

`--real` scores the rendered clips of those captions: the probe's own accuracy, the ceiling a
model can be read at. `--model BUNDLE` generates one sample per caption (seed `--seed` + i)
through `walt_cli.pipelines.Pipeline` and scores it, then scores the real clips at the
resolution and length the model produced, for the row beside it. `--blur` and `--noise`
damage the real clips first: how far the probe's reading holds on imperfect pixels.

`--through tokenizer,base,sr1,...` scores real clips passed through one part of the model
instead of sampling it: `tokenizer` encodes and decodes them at the model's resolution (what
the decoder can show at best); `base` downsamples them to the base stage's resolution (as `walt
tokenize encode --sr 1` does for training), encodes and decodes them there, and scores them at
that size (what the base's latents can show at best; `--real --size` scores the clips at that
size without the tokenizer); `srN` downsamples them to the input resolution of SR stage N,
encodes, super-resolves from there to the model's resolution and decodes. Each row is the
ceiling that part of the cascade leaves for the samples.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _one_thread():
    """The probe works on small tensors: one thread is fastest and immune to contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shapes_clips(
    recipe: str, num: int, frames: int, height: int, width: int, split: str = "heldout"
):
    """A split of the recipe's shapes data with `data.shapes.holdout` on (a ShapesDataset) at
    this clip size, with `num` items: "heldout" by default, or "train" (the seen triples)."""
    from walt_cli.config import load_recipe
    from walt_cli.data.datasets import build_dataset

    r = load_recipe(
        recipe if Path(recipe).is_file() else REPO / recipe,
        ["data.shapes.holdout=true", f"data.shapes.num_items={num}"],
    )
    # The clip size is set on the data section after the recipe is validated: a recipe is
    # checked as a whole for training (e.g. base.num_cond_frames against data.num_frames), and
    # the probe's clip size (1 frame for captions, any --frames) is no training recipe.
    r.data.num_frames, r.data.resolution = frames, [height, width]
    return build_dataset(r.data, split)


def _generate(args, captions: list[str]):
    """uint8 (N, T, H, W, 3) from the pipeline, `--batch` captions at a time."""
    import numpy as np
    import torch

    pipe = _pipeline(args.model)
    kwargs = {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.guidance is not None:
        g = [float(x) for x in args.guidance.split(",")]
        kwargs["guidance"] = g[0] if len(g) == 1 else tuple(g)
    if args.frames is not None:
        kwargs["num_frames"] = args.frames
    out = []
    for start in range(0, len(captions), args.batch):
        prompts = captions[start : start + args.batch]
        seeds = [args.seed + args.offset + start + i for i in range(len(prompts))]
        video = pipe.generate(prompts=prompts, seeds=seeds, **kwargs)
        video = video.cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
        out.append(video)
        print(f"generated {start + len(prompts)}/{len(captions)}", file=sys.stderr)
    return np.concatenate(out)


def _upscale(stages) -> int:
    """How many times the SR stages among `stages` enlarge a frame's side, together."""
    return math.prod(s.net.lowres_factor for s in stages if s.is_sr)


def _through(args, pipe, part: str, ds, captions: list[str]):
    """uint8 (N, T, H, W, 3): the real clips of `ds` through one part of the model (--through)."""
    import numpy as np
    import torch

    from walt_cli.data.video import tensor_to_frames
    from walt_cli.errors import WaltError
    from walt_cli.pipelines import Pipeline
    from walt_cli.systems.encode import downsample

    names = [s.name for s in pipe.stages]
    known = part in ("tokenizer", "base") or (
        part in names and pipe.stages[names.index(part)].is_sr
    )
    if not known:
        sr = [s.name for s in pipe.stages if s.is_sr]
        raise WaltError(f"--through {part}: not a part of {args.model} (tokenizer, base, {sr})")
    out = []
    for start in range(0, len(captions), args.batch):
        idx = range(start, min(start + args.batch, len(captions)))
        video = torch.stack([ds[args.offset + i]["video"] for i in idx])  # (B, 3, T, H, W)
        with torch.no_grad():
            if part == "tokenizer":
                got = pipe.decode(pipe.encode(video))
            elif part == "base":  # the tokenizer at the base stage's resolution
                got = pipe.decode(pipe.encode(downsample(video, _upscale(pipe.stages))))
            else:
                stage = names.index(part)
                z_low = pipe.encode(downsample(video, _upscale(pipe.stages[stage:])))
                sub = Pipeline(
                    pipe.tokenizer,
                    pipe.stages[stage:],
                    text_encoder=pipe.text_encoder,
                    refine_only=True,
                )
                kwargs = {"steps": args.steps} if args.steps is not None else {}
                got = sub.super_resolve(
                    z_low, seeds=[args.seed + args.offset + i for i in idx],
                    prompts=[captions[i] for i in idx], output="float", **kwargs,
                )  # fmt: skip
        out.append(np.stack([tensor_to_frames(v) for v in got]))
        print(f"{part}: {start + len(idx)}/{len(captions)}", file=sys.stderr)
    return np.concatenate(out)


@functools.cache
def _pipeline(model: str):
    from walt_cli.pipelines import Pipeline

    return Pipeline.from_bundle(model)


def _degrade(video, blur: float, noise: float, seed: int):
    """Real clip (3, T, H, W) in [-1, 1] with a Gaussian blur (sigma in pixels) and Gaussian noise
    (std in 0..255 units, seeded): how the probe reads imperfect pixels."""
    import torch
    import torch.nn.functional as F

    if blur > 0:
        k = int(3 * blur + 0.5)
        x = torch.arange(-k, k + 1, dtype=torch.float32)
        g = torch.exp(-(x**2) / (2 * blur**2))
        g = g / g.sum()
        c, t, h, w = video.shape
        y = video.permute(1, 0, 2, 3).reshape(t * c, 1, h, w)  # (T*3, 1, H, W)
        y = F.conv2d(F.pad(y, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1))
        video = y.view(t, c, h, w).permute(1, 0, 2, 3)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed)
        video = video + torch.randn(video.shape, generator=gen) * (noise / 127.5)
    return video


def _row(name: str, n: int, shape: tuple[int, int, int], scores: list[dict]) -> str:
    from walt_cli.metrics.adherence import ATTRIBUTES, accuracy

    acc = accuracy(scores)
    t, h, w = shape
    cells = " | ".join(f"{100 * acc[a]:.1f}%" for a in ATTRIBUTES)
    return f"| {name} | {n} | {t}x{h}x{w} | {cells} |"


def _confusion(videos, captions: list[str]) -> str:
    """Shape asked for (rows) against shape read (columns), and the same for direction."""
    from walt_cli.data.shapes import DIRECTIONS, SHAPES
    from walt_cli.metrics.adherence import parse_caption, read_video

    with _one_thread():
        pairs = [(parse_caption(c), read_video(v)) for v, c in zip(videos, captions, strict=True)]
    lines = []
    for attr, names in (("shape", SHAPES), ("direction", (*DIRECTIONS, "static"))):
        counts = Counter((getattr(w, attr), getattr(g, attr)) for w, g in pairs)
        cols = [*names, "none"]
        lines += [f"| {attr} asked \\ read | " + " | ".join(cols) + " |"]
        lines += ["| --- |" + " ---: |" * len(cols)]
        for asked in names:
            if asked == "static":
                continue
            row = [counts[(asked, read if read != "none" else None)] for read in cols]
            lines += [f"| {asked} | " + " | ".join(str(x) for x in row) + " |"]
        lines += [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--real", action="store_true", help="score rendered held-out clips")
    mode.add_argument(
        "--model", metavar="BUNDLE", help='a run dir, an exported bundle or "default"'
    )
    ap.add_argument("--num", type=int, default=200, help="clips (captions), >= 200 for the README")
    ap.add_argument("--size", type=int, default=128, help="--real: frame side in pixels")
    ap.add_argument("--frames", type=int, default=None, help="frames (--real default: 17)")
    ap.add_argument("--recipe", default="recipes/shapes.yaml", help="whose heldout split to use")
    ap.add_argument("--steps", type=int, default=None, help="--model: sampling steps")
    ap.add_argument("--guidance", default=None, help="--model: scale, or one per stage: 7.5,4,4")
    ap.add_argument("--seed", type=int, default=0, help="--model: sample i uses seed + i")
    ap.add_argument(
        "--offset",
        type=int,
        default=0,
        help="start at held-out caption K: runs with --offset 0 --num 100 and --offset 100 --num "
        "100 (e.g. one per core) score exactly the clips and samples of one --num 200 run",
    )
    ap.add_argument("--batch", type=int, default=8, help="--model: prompts per generate call")
    ap.add_argument("--blur", type=float, default=0.0, help="real clips: Gaussian blur sigma, px")
    ap.add_argument("--noise", type=float, default=0.0, help="real clips: noise std, 0..255")
    ap.add_argument("--details", action="store_true", help="also print confusion tables")
    ap.add_argument(
        "--through",
        default="",
        help="--model: also score real clips passed through these parts (tokenizer,base,sr1,...)",
    )
    ap.add_argument("--no-sample", action="store_true", help="--model: only the --through rows")
    args = ap.parse_args()
    parts = [p for p in args.through.split(",") if p]
    if parts and args.model is None:
        ap.error("--through needs --model")
    if args.no_sample and not parts:
        ap.error("--no-sample needs --through")
    if args.num < 1 or args.offset < 0:
        ap.error("--num must be >= 1 and --offset >= 0")
    picked = range(args.offset, args.offset + args.num)

    import torch

    from walt_cli.data.video import tensor_to_frames
    from walt_cli.metrics.adherence import ATTRIBUTES, score_batch

    began = time.time()
    header = "| clips | N | T x H x W | " + " | ".join(ATTRIBUTES) + " |"
    rule = "| --- | ---: | --- |" + " ---: |" * len(ATTRIBUTES)
    rows = []
    if args.model is not None and not args.no_sample:
        # The captions do not depend on the clip size (only the paths do).
        scenes = shapes_clips(args.recipe, args.offset + args.num, 1, 8, 8)
        captions = [scenes.scene(i).caption for i in picked]
        videos = _generate(args, captions)
        n, t, h, w, _ = videos.shape
        with _one_thread():
            model_scores = score_batch(videos, captions)
        settings = ", ".join(
            f"{k} {v}" for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v
        )
        name = f"model `{args.model}`" + (f" ({settings})" if settings else "")
        rows.append(_row(name, n, (t, h, w), model_scores))
    elif args.model is not None:  # --no-sample: real clips at the model's clip size
        (h, w), t = (
            _pipeline(args.model).resolution,
            args.frames or _pipeline(args.model).clip_frames,
        )
    else:
        t, h, w = args.frames or 17, args.size, args.size
    ds = shapes_clips(args.recipe, args.offset + args.num, t, h, w)
    real = [tensor_to_frames(_degrade(ds[i]["video"], args.blur, args.noise, i)) for i in picked]
    real_captions = [ds.scene(i).caption for i in picked]
    with _one_thread():
        real_scores = score_batch(real, real_captions)
    damage = ", ".join(
        f"{k} {v:g}" for k, v in (("blur sigma", args.blur), ("noise std", args.noise)) if v
    )
    for part in parts:
        videos_p = _through(args, _pipeline(args.model), part, ds, real_captions)
        with _one_thread():
            part_scores = score_batch(videos_p, real_captions)
        rows.append(
            _row(f"real clips through `{part}`", args.num, videos_p.shape[1:4], part_scores)
        )
        if args.details:
            print(f"\nreal clips through `{part}`:\n" + _confusion(videos_p, real_captions))
    real_name = "real held-out clips" + (f" ({damage})" if damage else "")
    rows.append(_row(real_name, args.num, (t, h, w), real_scores))
    print(header, rule, *rows, sep="\n")
    if args.details:
        if args.model is not None:
            print(f"\nmodel `{args.model}`:\n" + _confusion(videos, captions))
        print("\nreal held-out clips:\n" + _confusion(real, real_captions))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n({time.time() - began:.0f} s on {machine})")


if __name__ == "__main__":
    main()
