"""`walt sample` end to end, as a user runs it: wall-clock seconds from the command to the written
mp4 (imports, loading the bundle and its text encoder, generation, encoding the file), for
this checkout and, side by side, other commits.

    python bench/sample_wall.py                         # this checkout, the default model
    python bench/sample_wall.py --base 4237253 --reps 3 # against a commit (a worktree in /tmp)
    python bench/sample_wall.py --import-times          # where start-up goes (python -X importtime)

Each run is a fresh `python -m walt_cli.cli sample PROMPT` process, started outside any
checkout, with the checkout first on PYTHONPATH (checked: its `walt_cli` is the one imported).
The checkouts take turns in every repetition; the table gives the median wall time and the
median CPU seconds (user + system) of each. Wall time is what the user waits for, so run it on
an idle machine, and read the ratios of one run: this machine's own speed varied 1.8x within
an hour (BENCHMARKS.md, "Start-up").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer_step import HERE, checkout  # noqa: E402


def run(tree: Path, prompt: str, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one `walt sample` in a fresh process importing walt_cli from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "walt_cli.cli", "sample", prompt, "--out", str(out),
         "--no-progress"],
        env=env, check=True, capture_output=True, text=True, cwd=out.parent,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not out.is_file() or out.stat().st_size == 0:
        raise SystemExit(f"{tree}: no video written")
    return wall, cpu


def import_times(tree: Path, prompt: str, out: Path, top: int = 8) -> None:
    """The slowest top-level imports of one run (`python -X importtime`), in seconds."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "walt_cli.cli", "sample", prompt, "--out",
         str(out), "--no-progress"],
        env=env, check=True, capture_output=True, text=True, cwd=out.parent,
    )  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        top_level = len(parts) == 3 and parts[1].strip().isdigit() and parts[2][1:2] != " "
        if line.startswith("import time:") and top_level:
            rows.append((int(parts[1]) / 1e6, parts[2].strip()))
    print(f"{tree}: top-level imports {sum(s for s, _ in rows):.2f} s; slowest:")
    for seconds, name in sorted(rows, reverse=True)[:top]:
        print(f"  {seconds:6.2f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", nargs="*", default=[], help="commits (or checkouts) to compare")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default="a red circle moving left")
    ap.add_argument("--import-times", action="store_true")
    args = ap.parse_args()
    trees = {"this checkout": HERE, **{b: checkout(b) for b in args.base}}
    for name, tree in trees.items():
        where = subprocess.run(
            [sys.executable, "-c", "import walt_cli; print(walt_cli.__file__)"],
            env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
            cwd=tempfile.gettempdir(),  # not a checkout: python -c puts the cwd first on the path
        ).stdout.strip()  # fmt: skip
        if not where.startswith(str(tree)):
            raise SystemExit(f"{name}: walt_cli comes from {where}, not {tree}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for i, (name, tree) in enumerate(trees.items()):
                times[name].append(run(tree, args.prompt, Path(tmp) / f"{rep}-{i}.mp4"))
        if args.import_times:
            for i, tree in enumerate(trees.values()):
                import_times(tree, args.prompt, Path(tmp) / f"imports-{i}.mp4")
    print(f"`walt sample {args.prompt!r}` (default model), median of {args.reps}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| checkout | wall s | CPU s | runs (wall) |\n| --- | ---: | ---: | --- |")
    for name, rows in times.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {', '.join(f'{w:.2f}' for w, _ in rows)} |")


if __name__ == "__main__":
    main()
