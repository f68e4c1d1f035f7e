"""Tokenizer training step of this checkout against another commit's, side by side: two worker
processes (one imports walt_cli from each checkout) take turns, one step at a time.

    python bench/bench_tokenizer_step.py --base c1032dc     # a commit: checked out once under /tmp
    python bench/bench_tokenizer_step.py --base /tmp/base-c1032dc --batch 2 --reps 5   # a checkout
    WALT_CPU_ALLOCATOR=system python bench/bench_tokenizer_step.py   # glibc's defaults in both
    python bench/bench_tokenizer_step.py --precision bf16-mixed      # this checkout under autocast

Step: the `tiny` tokenizer (reconstruction L1 loss, backward, Adam step; the adversarial and
perceptual terms are off in the tiny recipes' early steps) on random clips, batch 8 of
17x64x64 by default, fp32. Each worker builds the same model from the same seed; the table
gives the median of `--reps` interleaved steps after a warm-up, and the ratio of medians.
Times are the CPU seconds a step consumes in its worker (robust to other jobs sharing the
machine, which wall-clock steps are not; page faults count, as system time). Each worker
runs with the CPU memory setting its checkout's `walt` command applies (`walt_cli.runtime`:
this checkout keeps freed memory for reuse, commits before it did not); with
WALT_CPU_ALLOCATOR=system both keep glibc's defaults, which compares the code alone.
`--precision` / `--base-precision` run a worker's forward pass under bf16 autocast
(`bf16-mixed`, as `trainer.precision=bf16-mixed` trains; the loss and Adam stay fp32), which is
faster only on a CPU with native bf16 matrix units (AMX, AVX512-BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")

WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
kept = False  # the CPU memory setting of the checkout's `walt` command, if it has one
from pathlib import Path
import walt_cli
# Look in this checkout only: an editable install's finder would supply another's module.
if (Path(walt_cli.__file__).parent / "runtime.py").exists():  # absent before the setting
    from walt_cli.runtime import keep_freed_cpu_memory
    kept = keep_freed_cpu_memory()  # honours WALT_CPU_ALLOCATOR
import torch
from walt_cli.models.tokenizer import CausalVideoTokenizer
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
tok = CausalVideoTokenizer.from_preset("tiny").train()
opt = torch.optim.Adam(tok.parameters(), lr=1e-4)
x = torch.rand(spec["batch"], 3, *spec["clip"]) * 2 - 1
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
        out = tok(x)
    (out.float() - x).abs().mean().backward()
    opt.step()
print(json.dumps({"params": sum(p.numel() for p in tok.parameters()), "kept": kept}), flush=True)
for line in sys.stdin:
    start = time.process_time()
    step()
    print(json.dumps({"seconds": time.process_time() - start}), flush=True)
"""


def start(root: Path, spec: dict) -> tuple[subprocess.Popen, bool]:
    """A worker on `root`'s walt_cli, and whether it keeps freed CPU memory (walt_cli.runtime)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    return proc, json.loads(proc.stdout.readline())["kept"]


def step(proc: subprocess.Popen) -> float:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("a benchmark worker died (see its error above)")
    return json.loads(line)["seconds"]


def checkout(base: str) -> Path:
    """A checkout of `base`: the path itself, or a detached worktree of the commit under /tmp."""
    path = Path(base)
    if not path.exists():
        path = Path(f"/tmp/walt-bench-{base}")
        if not path.exists():
            subprocess.run(
                ["git", "-C", str(HERE), "worktree", "add", "--detach", str(path), base],
                check=True,
                capture_output=True,
            )
    if not (path / "walt_cli").is_dir():
        raise SystemExit(f"{path} is not a walt checkout")
    return path.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default="c1032dc", help="commit (or a checkout of it) to compare with"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    for flag in ("--precision", "--base-precision"):
        parser.add_argument(flag, choices=PRECISIONS, default="32-true")
    args = parser.parse_args()
    base = checkout(args.base)
    spec = dict(batch=args.batch, clip=[args.frames, args.size, args.size], threads=args.threads)
    started = {
        "this checkout": start(HERE, {**spec, "bf16": args.precision == "bf16-mixed"}),
        "base": start(base, {**spec, "bf16": args.base_precision == "bf16-mixed"}),
    }
    workers = {name: proc for name, (proc, _) in started.items()}
    kept = {name: "kept" if keep else "glibc default" for name, (_, keep) in started.items()}
    commit = subprocess.run(
        ["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for proc in workers.values():
        step(proc)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in workers}
    for _ in range(args.reps):
        for name, proc in workers.items():
            times[name].append(step(proc))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"Tiny tokenizer training step, batch {args.batch} of {args.frames}x{args.size}x"
        f"{args.size}, {args.threads} thread(s), median of {args.reps} interleaved steps, load "
        f"average at the end {load}; freed CPU memory: this checkout {kept['this checkout']}, "
        f"{commit} {kept['base']}.\n"
    )
    print(
        f"| this checkout ({args.precision}) CPU s | {commit} ({args.base_precision}) CPU s | speed-up |"
    )
    print("|---|---|---|")
    print(
        f"| {med['this checkout']:.2f} | {med['base']:.2f} "
        f"| **{med['base'] / med['this checkout']:.2f}x** |"
    )


if __name__ == "__main__":
    main()
