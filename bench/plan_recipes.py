"""`walt plan` for every stage of every shipped recipe on an 80 GB and a 24 GB GPU: the
README's "Planning a run" table (predictions; one device's view, the recipe's per-device batch).

    python bench/plan_recipes.py [--gpus H100 "RTX 4090"] [--recipes recipes/t2v.yaml ...]

Each stage is simulated once (the memory does not depend on the GPU); the fit and the
smallest change that fits are worked out per GPU. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from walt_cli.config import load_recipe
    from walt_cli.plan import GIB, GPUS, find_gpu, simulate, stage_model, suggest_fix

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", nargs="+", default=["H100", "RTX 4090"])
    ap.add_argument(
        "--recipes", nargs="+", default=sorted(map(str, Path("recipes").glob("*.yaml")))
    )
    args = ap.parse_args()
    cards = [find_gpu(g) for g in args.gpus]
    head = "| recipe | stage | model | batch | peak GiB | per sample GiB | TFLOP / sample |"
    head += "".join(f" {c.name} ({c.memory_gib:g} GiB) |" for c in cards)
    print(head)
    print("|" + " --- |" * (7 + len(cards)))
    began = time.perf_counter()
    for path in args.recipes:
        recipe = load_recipe(path)
        stages = ["tokenizer", "base", *(f"sr{i + 1}" for i in range(len(recipe.sr)))]
        for stage in stages:
            model = stage_model(recipe, stage)
            mem = simulate(model, model.batch)
            one = simulate(model, 1).peak if model.batch > 1 else mem.peak
            per = (mem.peak - one) / max(1, model.batch - 1)
            cells = []
            for card in cards:
                cap = card.memory_gib * GIB
                half = model.precision.split("-")[0] in ("bf16", "16")
                tflops = (card.half_tflops if half else card.fp32_tflops) * 0.4
                samples = model.batch * (model.accumulate or 1)  # per optimizer step
                step = model.flops_per_sample * samples / (tflops * 1e12)
                if mem.peak <= cap:
                    cells.append(f"fits, {step:.2g} s/step")
                else:
                    fix = suggest_fix(model, cap, 1, "ddp").split("  (")[0]
                    cells.append(f"no: `{fix}`")
            ck = "" if model.checkpointing is None else (" ckpt" if model.checkpointing else "")
            print(
                f"| {Path(path).stem} | {stage} | {model.describe.split(':')[0]}{ck} | "
                f"{model.batch} | {mem.peak / GIB:.1f} | {per / GIB:.2f} | "
                f"{model.flops_per_sample / 1e12:.2f} |" + "".join(f" {c} |" for c in cells),
                flush=True,
            )
    print(
        f"\n{len(GPUS)} GPUs known; assumed MFU 40%; {time.perf_counter() - began:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
