"""The quality figures of a shapes model bundle (issue 15, "honest quality figures"), as markdown
on stdout and, with `--json FILE`, every number in one JSON file.

    python bench/eval_default_model.py                                 # the default model
    python bench/eval_default_model.py --model runs/shapes --num 256 --json shapes.json --out ev/
    python bench/eval_default_model.py --model B --skip-fvd --skip-timing --num 32

Sections (each skippable with --skip-NAME; each prints the command line that reproduces it):

1. tokenizer: per-frame PSNR of the bundle's tokenizer (encode + decode) on `--tok-num` clips of
   the "heldout" and "val" splits of the recipe (`data.shapes.holdout=true`), 17 frames, at each
   of `--tok-sizes`: per frame index (mean over clips), frame 0 against the mean of the others,
   overall;
2. fvd: `walt eval-fvd --model` (magvit protocol) on `--num` samples of held-out captions against
   the rendered real clips with those captions (heldout items 0..N-1), beside the floor (real
   items 0..N-1 against real items N..2N-1) and the untrained pipeline (the bundle's
   architecture with freshly initialised networks, see `build_untrained`), all through the CLI;
3. adherence: the pixel probe (walt_cli.metrics.adherence) on the samples `eval-fvd --model`
   wrote (generated once), beside the probe on the real clips of the same captions, against the
   targets colour >= 90%, direction >= 80%, shape >= 70%;
4. animate: frame 0 of `--animate-num` held-out real clips as PNG, animated with its caption
   through the pipeline (the path of `walt animate`): PSNR of the generated first frame against
   the picture, and the share of samples that move in the caption's direction (the probe's
   reading), beside the real clips;
5. timing: wall time of `walt sample "a red circle moving left" --out x.mp4` in a fresh process,
   median of `--timing-runs`, with the load average.

Real clips are written as lossless PNG frame folders, the form `eval-fvd --model` writes its
samples in: an mp4 (H.264, yuv420p) real side would add compression to one side of the FVD only.
Every file goes to `--out` (default: a new temporary folder); rerunning with the same `--out`
keeps the real clips, the samples (eval-fvd resumes), the untrained bundle, the tokenizer results
and the FVD results whose settings match. The sampling settings are the bundle's own unless
`--steps` / `--guidance` are given (printed in every command that uses them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("tokenizer", "fvd", "adherence", "animate", "timing")
TARGETS = {"colour": 0.90, "direction": 0.80, "shape": 0.70}  # issue 15
TIMING_PROMPT = "a red circle moving left"


# ---------------------------------------------------------------------------------------------
# Plumbing


def _walt() -> list[str]:
    """The `walt` executable (the console script; `python -m`-style fallback without it)."""
    exe = shutil.which("walt")
    return [exe] if exe else [sys.executable, "-c", "from walt_cli.cli import main; main()"]


def _shown(cmd: list[str]) -> str:
    """A command line as the user types it: `walt ...` for the console script."""
    parts = list(cmd)
    if parts[0] == shutil.which("walt"):
        parts[0] = "walt"
    elif parts[:2] == [sys.executable, "-c"]:
        parts = ["walt", *parts[3:]]
    return shlex.join(str(p) for p in parts)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], log: Path) -> dict:
    """Run a walt command in a fresh process (its output to `log`); wall and CPU seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(
            f"error: `{_shown(cmd)}` exited with {proc.returncode}: {tail[0]} (log: {log})"
        )
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Report:
    """Markdown to stdout as it goes; every number into `data` (the --json file)."""

    def __init__(self) -> None:
        self.data: dict = {}

    def print(self, *lines: str) -> None:
        print(*lines, sep="\n", flush=True)

    def section(self, title: str, command: str) -> None:
        self.print("", f"## {title}", "", "```", command, "```", "")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        right = [i > 0 for i in range(len(header))]
        self.print(
            "| " + " | ".join(header) + " |",
            "|" + "".join(" ---: |" if r else " --- |" for r in right),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        )


def _section_command(args, keep: str) -> str:
    """This script with the other sections skipped: reproduces one section alone."""
    cmd = ["python", "bench/eval_default_model.py", "--model", args.model, "--out", str(args.out)]
    sizes = {
        "tokenizer": [
            "--tok-num", args.tok_num, "--tok-sizes", ",".join(map(str, args.tok_sizes)),
            "--tok-frames", args.tok_frames,
        ],
        "fvd": ["--num", args.num],
        "adherence": ["--num", args.num],
        "animate": ["--animate-num", args.animate_num],
        "timing": ["--timing-runs", args.timing_runs],
    }  # fmt: skip
    cmd += sizes[keep]
    if keep == "tokenizer" and args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if keep in ("fvd", "adherence", "animate"):
        cmd += _overrides(args) + ["--seed", args.seed]
    if keep == "fvd" and args.devices > 1:
        cmd += ["--devices", args.devices]
    if keep == "fvd":
        cmd += ["--skip-floor"] * args.skip_floor + ["--skip-untrained"] * args.skip_untrained
    cmd += [f"--skip-{s}" for s in SECTIONS if s != keep]
    return shlex.join(str(c) for c in cmd)


def _overrides(args) -> list[str]:
    out = []
    if args.steps:
        out += ["--steps", args.steps]
    if args.guidance:
        out += ["--guidance", args.guidance]
    return out


def _tag(args) -> str:
    """Names the samples and results of one set of sampling settings (the bundle's: "")."""
    parts = [
        f"steps{args.steps}" if args.steps else "",
        f"g{args.guidance}" if args.guidance else "",
    ]
    return "".join(f"-{p}" for p in parts if p)


def _values(text: str | None, cast):
    """ "50,25" -> [50, 25]; one value -> the value; None -> None (the bundle's default)."""
    if not text:
        return None
    vals = [cast(v) for v in text.split(",")]
    return vals[0] if len(vals) == 1 else vals


# ---------------------------------------------------------------------------------------------
# Data: the recipe's shapes splits, and real clips on disk


def _shapes(recipe: str, split: str, num: int, frames: int, size: tuple[int, int], fps=None):
    """The recipe's `split` ("heldout" or "val", held-out triples on) with at least `num` items."""
    import math

    from walt_cli.config import load_recipe
    from walt_cli.data.datasets import build_dataset

    path = recipe if Path(recipe).is_file() else REPO / recipe
    base = load_recipe(path, [])
    items = num
    if split == "val":  # the val split holds round(num_items * val_fraction) items
        items = max(num, math.ceil((num + 1) / max(base.data.val_fraction, 1e-6)))
    overrides = [
        "data.shapes.holdout=true",
        f"data.num_frames={frames}",
        f"data.resolution=[{size[0]},{size[1]}]",
        f"data.shapes.num_items={items}",
    ]
    if fps is not None:
        overrides.append(f"data.shapes.fps={float(fps)}")
    ds = build_dataset(load_recipe(path, overrides).data, split)
    if len(ds) < num:
        raise SystemExit(f"error: the {split} split holds {len(ds)} clips, {num} needed")
    return ds


class RealClips:
    """Held-out real clips at the model's clip size as PNG frame folders `clip-NNNNNN` (items
    of the "heldout" split, rendered once) and manifests (.jsonl: path, caption) over them."""

    def __init__(self, args, frames: int, size: tuple[int, int], fps: float) -> None:
        self.args, self.frames, self.size, self.fps = args, frames, size, fps
        self.root = args.out / "real" / f"heldout-{frames}x{size[0]}x{size[1]}-fps{fps:g}"
        self._ds = None
        self.captions: dict[int, str] = {}

    def folder(self, i: int) -> Path:
        return self.root / f"clip-{i:06d}"

    def ensure(self, indices: range) -> None:
        """Render the missing clips of `indices` (each written whole, then renamed into place)."""
        from walt_cli.data.video import tensor_to_frames
        from walt_cli.pipelines.evaluation import write_frame_folder

        if self._ds is None or len(self._ds) < indices.stop:
            self._ds = _shapes(
                self.args.recipe, "heldout", indices.stop, self.frames, self.size, self.fps
            )
        self.root.mkdir(parents=True, exist_ok=True)
        for i in indices:
            self.captions[i] = self._ds.scene(i).caption
            if not self.folder(i).is_dir():
                write_frame_folder(self.folder(i), tensor_to_frames(self._ds[i]["video"]))

    def manifest(self, name: str, indices: range) -> Path:
        self.ensure(indices)
        path = self.args.out / "real" / f"{name}.jsonl"
        rows = [
            json.dumps({"path": str(self.folder(i).resolve()), "caption": self.captions[i]})
            for i in indices
        ]
        path.write_text("\n".join(rows) + "\n")
        return path

    def read(self, i: int):
        from walt_cli.metrics.videoset import ClipSource, read_clip

        folder = self.folder(i)
        return read_clip(ClipSource(folder, tuple(sorted(folder.glob("*.png")))))


def _read_samples(folder: Path, n: int):
    """uint8 (T, H, W, 3) of sample-000000 .. sample-(n-1) of a generated set."""
    from walt_cli.metrics.videoset import ClipSource, read_clip
    from walt_cli.pipelines.evaluation import sample_name

    out = []
    for i in range(n):
        d = folder / sample_name(i)
        if not d.is_dir():
            raise SystemExit(f"error: {d} is missing (generate the samples first)")
        out.append(read_clip(ClipSource(d, tuple(sorted(d.glob("*.png"))))))
    return out


# ---------------------------------------------------------------------------------------------
# The untrained pipeline


def build_untrained(model: str, out: Path, seed: int) -> Path:
    """A bundle with the architecture of `model` and every network freshly initialised.

    The tokenizer and each diffusion stage are rebuilt from the configs stored in their files
    with the constructors' own initialisation (what training starts from: adaLN-Zero, so the
    untrained denoisers predict v = 0), torch seeded with `seed`. Their latent statistics become
    mean 0 / std 1 (the trained ones describe another tokenizer's latents), keyed to the new
    tokenizer; the text encoder (MiniLM, not trained by walt), the metadata of each stage
    (resolution, factor, noise level, frame prediction) and the sampling defaults stay the
    bundle's. Reused when `out` already holds the one built from the same bundle and seed."""
    import torch

    from walt_cli.data.latents import file_hash
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.models.transformer import WALT
    from walt_cli.pipelines.bundle import (
        INDEX_FILE,
        BundleIndex,
        StageEntry,
        read_bundle,
        sha256_file,
        stage_resolution,
    )

    src = read_bundle(model)
    stamp = {"source": src.hashes, "seed": seed}
    marker = out / "untrained.json"
    done = (out / INDEX_FILE).is_file() and marker.is_file()
    if done and json.loads(marker.read_text()) == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    tok_config = CausalVideoTokenizer.from_checkpoint(src.tokenizer).config
    tok_file = CausalVideoTokenizer(**tok_config).save(out / "tokenizer.safetensors")
    tok_hash = file_hash(tok_file)
    stages = []
    for i, entry in enumerate(src.stages):
        trained = WALT.from_checkpoint(entry.file)
        extra = {**trained.checkpoint_extra, "step": 0, "ema": False, "untrained": True}
        for key in ("latent_stats", "lowres_latent_stats"):
            if key in extra:
                c = len(extra[key]["mean"])
                extra[key] = {"mean": [0.0] * c, "std": [1.0] * c, "tokenizer": tok_hash}
        file = out / f"{entry.name}.safetensors"
        WALT(**trained.config).save(file, extra=extra)
        meta = {**extra, "resolution": stage_resolution(src, i)}
        stages.append(StageEntry(entry.name, file, sha256_file(file), meta))
    index = BundleIndex(
        root=out,
        name=f"{src.name}-untrained",
        tokenizer=tok_file,
        tokenizer_sha256=sha256_file(tok_file),
        stages=stages,
        text_encoder=src.text_encoder,
        class_names=src.class_names,
        sample=src.sample,
    )
    (out / INDEX_FILE).write_text(json.dumps(index.to_json(), indent=2) + "\n")
    marker.write_text(json.dumps(stamp) + "\n")
    read_bundle(out)  # every file and hash as the pipeline will check them
    return out


# ---------------------------------------------------------------------------------------------
# 1. Tokenizer


def tokenizer_section(args, rep: Report, info: dict) -> None:
    import torch

    from walt_cli.losses.perceptual import psnr
    from walt_cli.models.tokenizer import CausalVideoTokenizer

    rep.section("Tokenizer: per-frame PSNR of encode + decode", _section_command(args, "tokenizer"))
    tok = CausalVideoTokenizer.from_checkpoint(info["tokenizer_file"]).eval()
    sha = info["hashes"]["tokenizer"]
    results = []
    t0, cpu0 = time.perf_counter(), _own_cpu()
    for split in ("heldout", "val"):
        for size in args.tok_sizes:
            cache = (
                args.out / "tokenizer" / f"{split}-{size}-{args.tok_frames}f-{args.tok_num}.json"
            )
            if cache.is_file() and json.loads(cache.read_text()).get("tokenizer") == sha:
                results.append(json.loads(cache.read_text()))
                continue
            ds = _shapes(args.recipe, split, args.tok_num, args.tok_frames, (size, size))
            per_clip = []  # (N, T) PSNR of each frame of each clip
            for lo in range(0, args.tok_num, args.batch):
                x = torch.stack(
                    [ds[i]["video"] for i in range(lo, min(lo + args.batch, args.tok_num))]
                )
                with torch.no_grad():
                    y = tok.decode(tok.encode(x))  # (B, 3, T, H, W)
                b, _, t = x.shape[:3]
                frames = psnr(y.transpose(1, 2).flatten(0, 1), x.transpose(1, 2).flatten(0, 1))
                per_clip += frames.view(b, t).tolist()
            per_frame = torch.tensor(per_clip).mean(0)  # (T,)
            row = {
                "split": split,
                "size": size,
                "frames": args.tok_frames,
                "num": args.tok_num,
                "tokenizer": sha,
                "per_frame": [round(v, 3) for v in per_frame.tolist()],
                "frame0": round(float(per_frame[0]), 3),
                "others": round(float(per_frame[1:].mean()), 3),
                "overall": round(float(per_frame.mean()), 3),
                "clip_min": round(min(min(c) for c in per_clip), 3),
            }
            row["frame0_gap"] = round(row["others"] - row["frame0"], 3)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(row) + "\n")
            results.append(row)
    rep.table(
        ["split", "size", "N", "frame 0", "frames 1..", "gap", "overall", "worst frame"],
        [
            [r["split"], f"{r['frames']}x{r['size']}x{r['size']}", r["num"],
             f"{r['frame0']:.2f}", f"{r['others']:.2f}", f"{r['frame0_gap']:+.2f}",
             f"{r['overall']:.2f}", f"{r['clip_min']:.2f}"]
            for r in results
        ],
    )  # fmt: skip
    rep.print("", "PSNR (dB) per frame index, mean over clips:", "")
    t = len(results[0]["per_frame"])
    rep.table(
        ["split", "size", *map(str, range(t))],
        [[r["split"], r["size"], *(f"{v:.1f}" for v in r["per_frame"])] for r in results],
    )
    rep.print(
        "",
        "Bar (issue 15): >= 30 dB at the default resolution, frame 0 within 1 dB of the others"
        " (gap = frames 1.. minus frame 0).",
    )
    rep.data["tokenizer"] = {
        "command": _section_command(args, "tokenizer"),
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(_own_cpu() - cpu0, 1),
    }


# ---------------------------------------------------------------------------------------------
# 2. FVD


def _fvd_command(args, real: Path, *, model: str | None, fake: Path, result: Path) -> list[str]:
    cmd = [*_walt(), "eval-fvd", "--real", real, "--fake", fake, "--protocol", "magvit"]
    if model is not None:
        cmd += ["--model", model, "--task", "text", "-n", args.num, "--seed", args.seed]
        cmd += ["--sample-batch-size", args.batch] + _overrides(args)
        if args.devices > 1:
            cmd += ["--devices", args.devices]
    return cmd + ["--device", args.device, "--json", result]


def _fvd(args, rep: Report, name: str, cmd: list[str], result: Path, want: dict) -> dict:
    """Run one `walt eval-fvd` (or keep its result when one with the same settings exists)."""
    shown = _shown(cmd)
    kept = False
    if result.is_file():
        old = json.loads(result.read_text())
        hashes = (old.get("model") or {}).get("model_hashes") or {}
        kept = old.get("num_fake") == want["num"] and all(
            hashes.get(k) == v for k, v in (want.get("hashes") or {}).items()
        )
    cost = {}
    if not kept:
        result.unlink(missing_ok=True)
        cost = _run(cmd, args.out / "logs" / f"fvd-{name}.log")
    data = json.loads(result.read_text())
    entry = {"command": shown, "kept": kept, **cost, "result": data, "fvd": data["fvd"]}
    if data.get("model"):
        entry["samples"] = str(Path(data["model"]["manifest"]).parent)
    return entry


def fvd_section(args, rep: Report, info: dict, real: RealClips) -> None:
    n = args.num
    set_a = real.manifest("heldout-a", range(n))
    rep.section(
        "FVD: samples for held-out captions against real clips with the same captions",
        _section_command(args, "fvd"),
    )
    rows, out = [], {"num": n, "real": str(set_a)}
    result = args.out / "fvd" / f"model{_tag(args)}.json"
    model_cmd = _fvd_command(
        args, set_a, model=args.model, fake=args.out / "samples" / f"model{_tag(args)}",
        result=result,
    )  # fmt: skip
    out["model"] = _fvd(args, rep, "model", model_cmd, result, {"num": n, "hashes": info["hashes"]})
    rows.append(["model", out["model"]])
    if not args.skip_floor:
        set_b = real.manifest("heldout-b", range(n, 2 * n))
        cmd = [*_walt(), "eval-fvd", "--real", set_a, "--fake", set_b, "--protocol", "magvit"]
        cmd += ["--device", args.device, "--json", args.out / "fvd" / "floor.json"]
        out["floor"] = _fvd(args, rep, "floor", cmd, args.out / "fvd" / "floor.json", {"num": n})
        out["floor"]["real_b"] = str(set_b)
        rows.append(["floor: real items 0..N-1 vs N..2N-1", out["floor"]])
    if not args.skip_untrained:
        bundle = build_untrained(args.model, args.out / "untrained", args.seed)
        from walt_cli.pipelines.bundle import read_bundle

        result = args.out / "fvd" / f"untrained{_tag(args)}.json"
        cmd = _fvd_command(
            args, set_a, model=str(bundle), fake=args.out / "samples" / f"untrained{_tag(args)}",
            result=result,
        )  # fmt: skip
        out["untrained"] = _fvd(
            args, rep, "untrained", cmd, result, {"num": n, "hashes": read_bundle(bundle).hashes}
        )
        out["untrained"]["bundle"] = str(bundle)
        rows.append(["untrained pipeline (same architecture, fresh weights)", out["untrained"]])
    first = out["model"]["result"]
    rep.print(
        f"magvit protocol, N = {n} a side, {first['frames']} frames, "
        f"{first['resolution'][0]}x{first['resolution'][1]}; real: heldout items 0..{n - 1} "
        f"of {args.recipe} ({info['frames']} frames at {info['fps']:g} fps, lossless PNG).",
        "",
    )
    rep.table(
        ["set", "FVD", "wall s", "CPU s"],
        [
            [name, f"{e['fvd']:.2f}", "kept" if e["kept"] else f"{e['wall_s']:.0f}",
             "" if e["kept"] else f"{e['cpu_s']:.0f}"]
            for name, e in rows
        ],
    )  # fmt: skip
    rep.print("")
    for name, e in rows:
        rep.print(f"- {name}: `{e['command']}`")
    rep.data["fvd"] = out


# ---------------------------------------------------------------------------------------------
# 3. Text adherence


def _generate_samples(args, real_manifest: Path, folder: Path) -> None:
    """The samples `walt eval-fvd --model` makes, made in-process when the FVD is skipped: the
    same function, folder and settings, so a later eval-fvd keeps them."""
    from walt_cli.pipelines.evaluation import generate_set

    generate_set(
        args.model,
        str(real_manifest),
        folder,
        num_samples=args.num,
        task="text",
        seed=args.seed,
        steps=_values(args.steps, int),
        guidance=_values(args.guidance, float),
        batch_size=args.batch,
        accelerator="cpu" if args.device == "cpu" else "gpu",
    )


def adherence_section(args, rep: Report, info: dict, real: RealClips) -> None:
    from walt_cli.metrics.adherence import ATTRIBUTES, accuracy, score_batch

    n = args.num
    set_a = real.manifest("heldout-a", range(n))
    captions = [real.captions[i] for i in range(n)]
    rep.section(
        "Text adherence: the pixel probe on the samples of held-out captions",
        _section_command(args, "adherence"),
    )
    folder = args.out / "samples" / f"model{_tag(args)}"
    t0, cpu0 = time.perf_counter(), _own_cpu()
    made_here = not (folder / f"samples-{n}.txt").is_file()
    if made_here:
        _generate_samples(args, set_a, folder)
    gen_wall, gen_cpu = time.perf_counter() - t0, _own_cpu() - cpu0
    names = {
        "model": "model",
        "untrained": "untrained pipeline",
        "real": "real clips, same captions",
    }
    acc = {}
    for key, path in (
        ("model", folder),
        ("untrained", args.out / "samples" / f"untrained{_tag(args)}"),
    ):
        if (path / f"samples-{n}.txt").is_file():
            acc[key] = accuracy(score_batch(_read_samples(path, n), captions))
    acc["real"] = accuracy(score_batch([real.read(i) for i in range(n)], captions))
    rows = [[names[k], n, *(f"{100 * a[x]:.1f}%" for x in ATTRIBUTES)] for k, a in acc.items()]
    rep.table(["clips", "N", *ATTRIBUTES], rows)
    rep.print("", "Targets (issue 15), model samples:", "")
    verdict = {}
    for attr, target in TARGETS.items():
        got = acc["model"][attr]
        verdict[attr] = {
            "target": target,
            "model": got,
            "real": acc["real"][attr],
            "pass": got >= target,
            "margin_points": round(100 * (got - target), 1),
        }
    rep.table(
        ["attribute", "target", "model", "probe on real", "verdict"],
        [
            [a, f">= {100 * v['target']:.0f}%", f"{100 * v['model']:.1f}%",
             f"{100 * v['real']:.1f}%",
             ("pass" if v["pass"] else "miss") + f" ({v['margin_points']:+.1f} points)"]
            for a, v in verdict.items()
        ],
    )  # fmt: skip
    how = (
        "generated here (FVD skipped) with walt_cli.pipelines.evaluation.generate_set"
        if made_here
        else "the samples `walt eval-fvd --model` wrote"
    )
    rep.print("", f"Samples: {folder} ({how}); captions: {set_a}.")
    rep.data["adherence"] = {
        "command": _section_command(args, "adherence"),
        "num": n,
        "samples": str(folder),
        "generated_here": made_here,
        "generation_wall_s": round(gen_wall, 1) if made_here else None,
        "generation_cpu_s": round(gen_cpu, 1) if made_here else None,
        "accuracy": acc,
        "targets": verdict,
    }


# ---------------------------------------------------------------------------------------------
# 4. Animate


def animate_section(args, rep: Report, info: dict, real: RealClips) -> None:
    import numpy as np
    import torch

    from walt_cli.data.video import frames_to_tensor, read_image, resize_crop, write_image
    from walt_cli.metrics.adherence import parse_caption, read_video
    from walt_cli.pipelines import Pipeline
    from walt_cli.pipelines.evaluation import sample_name, write_frame_folder

    k = args.animate_num
    real.ensure(range(k))
    rep.section(
        "Animate: frame 0 of held-out clips, animated with their captions",
        _section_command(args, "animate"),
    )
    root = args.out / "animate"
    inputs = []
    for i in range(k):
        png = root / "inputs" / f"frame0-{i:06d}.png"
        if not png.is_file():
            write_image(png, real.read(i)[0])
        inputs.append(png)
    settings = {
        "model": info["hashes"],
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
    }
    samples = root / "samples"
    stamp = root / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        shutil.rmtree(samples, ignore_errors=True)  # another model or other settings
    samples.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings) + "\n")
    missing = [i for i in range(k) if not (samples / sample_name(i)).is_dir()]
    t0, cpu0 = time.perf_counter(), _own_cpu()
    if missing:
        pipe = Pipeline.from_bundle(args.model, device="cpu" if args.device == "cpu" else "auto")
        for lo in range(0, len(missing), args.batch):
            batch = missing[lo : lo + args.batch]
            # What Pipeline.animate does for one picture (the picture as the first latent frame,
            # resized to cover the model's resolution), for a batch of different pictures.
            cond = torch.stack(
                [
                    resize_crop(
                        frames_to_tensor(read_image(inputs[i])[None]), "cover", pipe.resolution
                    )
                    for i in batch
                ]
            )  # (B, 3, 1, H, W)
            videos = pipe.generate(
                seeds=[args.seed + i for i in batch],
                prompts=[real.captions[i] for i in batch],
                cond_video=cond,
                steps=_values(args.steps, int),
                guidance=_values(args.guidance, float),
            )
            for i, video in zip(batch, videos, strict=True):
                write_frame_folder(samples / sample_name(i), video.numpy())
    wall, cpu = time.perf_counter() - t0, _own_cpu() - cpu0
    generated = _read_samples(samples, k)
    psnrs, moved, moved_real, static = [], [], [], 0
    for i, video in enumerate(generated):
        picture = read_image(inputs[i]).astype(np.float64)
        mse = np.mean((video[0].astype(np.float64) - picture) ** 2) / 255.0**2
        psnrs.append(float(-10 * np.log10(max(mse, 1e-10))))
        want = parse_caption(real.captions[i]).direction
        got = read_video(video).direction
        moved.append(got == want)
        static += got == "static"
        moved_real.append(read_video(real.read(i)).direction == want)
    first = {
        "mean": round(float(np.mean(psnrs)), 3),
        "median": round(float(np.median(psnrs)), 3),
        "min": round(float(np.min(psnrs)), 3),
    }
    rep.table(
        ["clips", "N", "first frame PSNR vs picture (mean / median / min)", "moves as the caption says", "static"],
        [
            ["animated", k, f"{first['mean']:.2f} / {first['median']:.2f} / {first['min']:.2f} dB",
             f"{100 * np.mean(moved):.1f}%", f"{100 * static / k:.1f}%"],
            ["real clips (same captions)", k, "", f"{100 * np.mean(moved_real):.1f}%", ""],
        ],
    )  # fmt: skip
    rep.print(
        "",
        f"Pictures: {root / 'inputs'}; animations: {samples} (Pipeline.generate with the picture "
        "as the first latent frame, the path of `walt animate IMAGE PROMPT`).",
    )
    rep.data["animate"] = {
        "command": _section_command(args, "animate"),
        "num": k,
        "first_frame_psnr": first,
        "first_frame_psnr_all": [round(v, 3) for v in psnrs],
        "direction_model": float(np.mean(moved)),
        "direction_real": float(np.mean(moved_real)),
        "static_model": static / k,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "made": len(missing),
    }


# ---------------------------------------------------------------------------------------------
# 5. Timing


def timing_section(args, rep: Report, info: dict) -> None:
    folder = args.out / "timing"
    runs = []
    cmds = []
    for r in range(args.timing_runs):
        cmd = [*_walt(), "sample", TIMING_PROMPT, "--out", folder / f"x{r}.mp4"]
        if args.model != "default":
            cmd += ["--model", args.model]
        cmd += _overrides(args)
        cmds.append(cmd)
        (folder / f"x{r}.mp4").unlink(missing_ok=True)
        load = _load()
        cost = _run(cmd, args.out / "logs" / f"timing-{r}.log")
        runs.append({**cost, "load_before": load, "load_after": _load()})
    shown = _shown(cmds[0]).replace(str(folder / "x0.mp4"), "x.mp4")
    rep.section(f"Timing: `walt sample` in a fresh process, median of {args.timing_runs}", shown)
    median = statistics.median(r["wall_s"] for r in runs)
    rep.table(
        ["run", "wall s", "CPU s", "load average before (1, 5, 15 min)"],
        [[i + 1, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", ", ".join(map(str, r["load_before"]))]
         for i, r in enumerate(runs)],
    )  # fmt: skip
    rep.print("", f"Median wall time: {median:.1f} s (target <= 30 s on 2 cores, issue 15).")
    rep.data["timing"] = {"command": shown, "runs": runs, "median_wall_s": median}


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections: " + ", ".join(SECTIONS),
    )  # fmt: skip
    ap.add_argument("--model", default="default", help="bundle, run directory or 'default'")
    ap.add_argument(
        "--out", type=Path, default=None, help="working folder (default: a new temp dir)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--recipe", default="recipes/shapes.yaml", help="whose shapes splits to use")
    ap.add_argument("--num", type=int, default=256, help="FVD / adherence samples (N a side)")
    ap.add_argument("--tok-num", type=int, default=64, help="clips per split and size (tokenizer)")
    ap.add_argument("--tok-sizes", default="64,128", help="tokenizer resolutions, comma-separated")
    ap.add_argument("--tok-frames", type=int, default=17, help="frames per tokenizer clip")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="score this tokenizer.safetensors in the tokenizer section instead of the "
        "bundle's (a tokenizer trial, at the bundle's splits and sizes); needs every other "
        "section skipped",
    )
    ap.add_argument("--animate-num", type=int, default=32, help="pictures to animate")
    ap.add_argument("--timing-runs", type=int, default=3, help="walt sample runs (median)")
    ap.add_argument("--steps", default=None, help="override the bundle's DDIM steps: 50 or 50,25")
    ap.add_argument("--guidance", default=None, help="override the bundle's guidance: 2 or 2,1")
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    ap.add_argument("--batch", type=int, default=8, help="samples / clips per batch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (sampling and the detector)")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="FVD samples: processes (CPU) or GPUs to sample on (`walt eval-fvd --devices`); "
        "on a CPU give each one thread (OMP_NUM_THREADS=1)",
    )
    for s in SECTIONS:
        ap.add_argument(f"--skip-{s}", action="store_true", help=f"skip the {s} section")
    ap.add_argument("--skip-floor", action="store_true", help="FVD: skip the real-vs-real floor")
    ap.add_argument(
        "--skip-untrained", action="store_true", help="FVD: skip the untrained pipeline"
    )
    args = ap.parse_args(argv)
    for name in ("num", "tok_num", "animate_num", "timing_runs", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num < 2 and not args.skip_fvd:
        ap.error("FVD needs --num >= 2")
    if args.tokenizer and not all(getattr(args, f"skip_{s}") for s in SECTIONS[1:]):
        ap.error(
            "--tokenizer scores a tokenizer alone: add --skip-" + " --skip-".join(SECTIONS[1:])
        )
    try:
        args.tok_sizes = [int(v) for v in args.tok_sizes.split(",")]
    except ValueError:
        ap.error(f"--tok-sizes: comma-separated integers, got {args.tok_sizes!r}")
    return args


def _machine() -> dict:
    import torch

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": _load(),
        "walt_commit": commit or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _model_info(args) -> dict:
    from walt_cli.pipelines import Pipeline
    from walt_cli.pipelines.bundle import read_bundle

    index = read_bundle(args.model)
    pipe = Pipeline.from_bundle(args.model, device="cpu")
    if pipe.conditioning != "text":
        raise SystemExit(
            f"error: --model {args.model} is {pipe.conditioning}, not text-conditioned"
        )
    return {
        "model": args.model,
        "name": index.name,
        "root": str(index.root),
        "tokenizer_file": str(index.tokenizer),
        "hashes": pipe.hashes,
        "stages": [s.name for s in pipe.stages],
        "frames": pipe.clip_frames,
        "resolution": list(pipe.resolution),
        "fps": pipe.fps,
        "frame_prediction": pipe.base.frame_channels,
        "default_steps": pipe.default_steps(),
        "default_guidance": pipe.default_guidance(),
        "steps_override": args.steps,
        "guidance_override": args.guidance,
    } | (_tokenizer_trial(args.tokenizer, pipe.hashes) if args.tokenizer else {})


def _tokenizer_trial(path: str, hashes: dict) -> dict:
    """`--tokenizer FILE`: the tokenizer section reads this file (and keys its cache by it)."""
    from walt_cli.data.latents import file_hash
    from walt_cli.models.checkpoint import read_metadata
    from walt_cli.models.tokenizer import CHECKPOINT_KIND

    read_metadata(path, kind=CHECKPOINT_KIND)  # a missing or foreign file: one line, exit 2
    return {"tokenizer_file": str(path), "hashes": {**hashes, "tokenizer": file_hash(path)}}


def main(argv=None) -> int:
    args = parse_args(argv)
    from walt_cli.errors import WaltError

    args.out = (args.out or Path(tempfile.mkdtemp(prefix="walt-eval-"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    began = time.perf_counter()
    try:
        machine = _machine()
        info = _model_info(args)
    except WaltError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rep.data.update(machine=machine, model=info, out=str(args.out))
    rep.data["settings"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    cpus = machine["cpus_usable"] or machine["cpus"]
    rep.print(
        f"# Quality figures of `{args.model}` ({info['name']})",
        "",
        f"- machine: {cpus} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads)"
        + (f", {machine['cuda']}" if machine["cuda"] else "")
        + f", load average {', '.join(map(str, machine['load_average']))} (1, 5, 15 min);"
        f" walt {machine['walt_commit']}, {machine['date']}",
        f"- model: {' -> '.join(info['stages'])}, {info['frames']} frames at "
        f"{info['resolution'][0]}x{info['resolution'][1]}, {info['fps']:g} fps; hashes "
        + ", ".join(f"{k} {v}" for k, v in info["hashes"].items()),
        f"- sampling: steps {args.steps or info['default_steps']}, guidance "
        f"{args.guidance or info['default_guidance']}"
        + (" (overridden)" if args.steps or args.guidance else " (the bundle's defaults)"),
        f"- working folder: {args.out}",
    )
    real = RealClips(args, info["frames"], tuple(info["resolution"]), info["fps"])
    try:
        if not args.skip_tokenizer:
            tokenizer_section(args, rep, info)
        if not args.skip_fvd:
            fvd_section(args, rep, info, real)
        if not args.skip_adherence:
            adherence_section(args, rep, info, real)
        if not args.skip_animate:
            animate_section(args, rep, info, real)
        if not args.skip_timing:
            timing_section(args, rep, info)
    except WaltError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = time.perf_counter() - began
    rep.data["wall_s"] = round(total, 1)
    rep.print("", f"({total:.0f} s in all; load average now {', '.join(map(str, _load()))})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep.data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
