"""Seconds per sample for each stage of a cascade and for decoding, on this machine.

The shapes cascade: recipes/shapes.yaml's base (tiny preset, 8 layers x 192, 40 classes,
17x64x64 = 5x8x8 latents, SW 1x8x8, STW 5x4x4) and one x2 SR stage of the same size at
17x128x128 (5x16x16 latents, p = 2: the same 8x8 token grid, as the paper's SR1 uses p = 2),
with the tiny tokenizer; untrained weights (speed does not depend on them). Defaults of the
shapes `sample` section: 50 DDIM steps with guidance 2 at the base (two forward passes a step),
25 unguided steps at SR.

    python bench/sample_speed.py [--batch 1 8] [--steps 50 25] [--threads 2]
    python bench/sample_speed.py --model default    # the trained model shipped in the package
    python bench/sample_speed.py --model default --precision bf16   # faster with AMX

`--model` (a run directory, a bundle, or "default") times a trained cascade instead, with
captions of the shapes vocabulary and the bundle's own steps and guidance unless given. Like
`walt`, it keeps freed CPU memory for reuse (walt_cli.runtime).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from walt_cli.data.latents import file_hash
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.models.transformer import WALT
from walt_cli.pipelines import Pipeline
from walt_cli.runtime import keep_freed_cpu_memory

PROMPTS = ("a red circle moving left slowly on a white background",
           "a blue square moving up quickly on a black background")  # fmt: skip


def build(root: Path) -> Path:
    torch.manual_seed(0)
    tok = CausalVideoTokenizer.from_preset("tiny")
    tok.save(root / "tokenizer" / "tokenizer.safetensors")
    th = file_hash(root / "tokenizer" / "tokenizer.safetensors")
    stats = {"mean": [0.0] * 8, "std": [1.0] * 8, "tokenizer": th}
    size = dict(depth=8, width=192, heads=6, num_classes=40, text_dim=None)
    base = WALT.from_preset(
        "tiny", **size, latent_size=(5, 8, 8), spatial_window=(8, 8), st_window=(4, 4)
    )
    base.save(root / "base" / "base.safetensors", extra={"latent_stats": stats})
    sr = WALT.from_preset(
        "tiny", **size, patch_size=2, latent_size=(5, 16, 16), spatial_window=(8, 8),
        st_window=(4, 4), lowres_factor=2, noise_level_cond=True,
    )  # fmt: skip
    sr.save(
        root / "sr1" / "sr1.safetensors",
        extra={"latent_stats": stats, "lowres_latent_stats": stats, "factor": 2,
               "resolution": [128, 128], "lowres_resolution": [64, 64], "noise_level": 0.1},
    )  # fmt: skip
    (root / "recipe.yaml").write_text("name: shapes-cascade\ndata:\n  source: shapes\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument(
        "--steps", type=int, nargs="+", help="per stage (default 50 25, or the bundle's)"
    )
    ap.add_argument(
        "--guidance", type=float, nargs="+", help="per stage (default 2 1, or the bundle's)"
    )
    ap.add_argument(
        "--model", help='a trained run, bundle or "default" instead of untrained weights'
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batched", action="store_true", help="batch_invariant=False on CPU")
    ap.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (as `walt sample`)")
    args = ap.parse_args()
    keep_freed_cpu_memory()  # as the `walt` command does
    torch.set_num_threads(args.threads)
    if args.model is None:  # untrained weights: the defaults of the shapes `sample` section
        args.steps, args.guidance = args.steps or [50, 25], args.guidance or [2.0, 1.0]
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline.from_bundle(
            args.model or build(Path(tmp) / "run"), device="cpu",
            batch_invariant=False if args.batched else None, precision=args.precision,
        )  # fmt: skip

        def conditions(b: int) -> dict:
            if args.model is None:
                return {"labels": [i % 40 for i in range(b)]}
            return {"prompts": [PROMPTS[i % len(PROMPTS)] for i in range(b)]}

        pipe.generate(seeds=[0], steps=[1] * len(pipe.stages), **conditions(1))  # warm-up
        for b in args.batch:
            start = time.perf_counter()
            pipe.generate(seeds=list(range(b)), steps=args.steps, guidance=args.guidance,
                          **conditions(b))  # fmt: skip
            total = time.perf_counter() - start
            row = {k: round(v / b, 2) for k, v in pipe.timings.items()}
            print(json.dumps({"batch": b, "batch_invariant": pipe.batch_invariant,
                              "precision": pipe.precision,
                              "seconds_per_sample": row, "total_per_sample": round(total / b, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
