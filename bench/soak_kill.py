"""Soak test of crash safety: kill -9 each training command at random moments, rerun, check.

For `walt tokenize train` and then `walt train-base` (tiny recipe, a checkpoint every step, so
many kills land inside a checkpoint or export write), this script N times starts the command,
waits a random time, and sends SIGKILL. After each kill it checks that every file a later step
reads still loads (last.ckpt with weights_only=True, the exported safetensors, metrics.csv);
each rerun must say that it resumes when a checkpoint exists. Finally it runs each command to
the end and checks metrics.csv for repeated steps and the run directory for temp files.

    python bench/soak_kill.py --kills 5 --workdir /tmp/walt-soak

Not part of the test suite (minutes of wall time). Prints one summary line per command.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def walt(*args: str) -> list[str]:
    return [sys.executable, "-m", "walt_cli.cli", *args]


def check_files(stage: Path, weights: str) -> list[str]:
    """Names of the files of `stage` that exist but do not load."""
    import torch

    from walt_cli.models.checkpoint import load_weights

    bad = []
    ckpt = stage / "last.ckpt"
    if ckpt.exists():
        try:
            torch.load(ckpt, weights_only=True, map_location="cpu")
        except Exception:
            bad.append(str(ckpt))
    if (stage / weights).exists():
        from walt_cli.models import tokenizer, transformer

        module = tokenizer if weights.startswith("tokenizer") else transformer
        try:
            load_weights(stage / weights, kind=module.CHECKPOINT_KIND)
        except Exception:
            bad.append(str(stage / weights))
    metrics = stage / "metrics.csv"
    if metrics.exists():
        try:
            with open(metrics, newline="") as f:
                rows = list(csv.DictReader(f))
            if any(not str(r.get("step", "")).isdigit() for r in rows):
                raise ValueError("a row without a step")
        except Exception:
            bad.append(str(metrics))
    return bad


def soak(name: str, args: list[str], stage: Path, weights: str, kills: int, rng, window) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    report = {"command": name, "kills": 0, "reruns": 0, "resumed": 0, "corrupt": 0}
    attempts = 0
    while report["kills"] < kills and attempts < 3 * kills:
        attempts += 1
        had_ckpt = (stage / "last.ckpt").is_file()
        marker = stage / "metrics.csv"
        seen = marker.stat().st_mtime_ns if marker.exists() else 0
        proc = subprocess.Popen(walt(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)  # fmt: skip
        # Wait until this process trains (its metrics file changes), then kill at a random
        # moment of the next `window` seconds: with a checkpoint every step, many kills land
        # inside a checkpoint or export write.
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 600:
            if marker.exists() and marker.stat().st_mtime_ns != seen:
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(*window))
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode(errors="replace")
        if had_ckpt:
            report["reruns"] += 1
            report["resumed"] += "resuming from" in out
        if finished:
            if proc.returncode != 0:
                raise SystemExit(f"{name} exited {proc.returncode}:\n{out[-2000:]}")
            break  # ran to the end before the kill: stop killing
        report["kills"] += 1
        report["corrupt"] += len(check_files(stage, weights))
        print(f"{name}: kill {report['kills']}: {report}", flush=True)
    had_ckpt = (stage / "last.ckpt").is_file()
    final = subprocess.run(walt(*args), capture_output=True, text=True, env=env, cwd=REPO)
    if final.returncode != 0:
        raise SystemExit(f"{name}: final run exited {final.returncode}:\n{final.stdout[-2000:]}")
    if had_ckpt:
        report["reruns"] += 1
        report["resumed"] += "resuming from" in final.stdout
    report["corrupt"] += len(check_files(stage, weights))
    with open(stage / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    report["rows"] = len(steps)
    report["duplicated_rows"] = len(steps) - len(set(steps))
    report["temp_files"] = len(list(stage.parent.rglob("*.walt-tmp-*")))
    report["lock_left"] = (stage / ".walt.lock").exists()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="kills per command (N)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/walt-soak"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40, help="max_steps of each command")
    p.add_argument("--window", type=float, nargs=2, default=(0.0, 3.0),
                   help="seconds after training starts within which the kill falls")  # fmt: skip
    p.add_argument("--base-only", action="store_true", help="soak train-base alone")
    a = p.parse_args()
    rng = random.Random(a.seed)
    shutil.rmtree(a.workdir, ignore_errors=True)
    run = a.workdir / "run"
    common = [str(TINY), f"run_dir={run}", "trainer.checkpoint_every=1", "--no-progress"]
    print(f"soak: {a.kills} kills per command, {a.steps} steps, in {a.workdir}", flush=True)
    reports = []
    if not a.base_only:
        reports.append(soak("tokenize train",
             ["tokenize", "train", *common, f"tokenizer.max_steps={a.steps}",
              "tokenizer.val_every=10"],
             run / "tokenizer", "tokenizer.safetensors", a.kills, rng, a.window))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if a.base_only:  # an untrained tiny tokenizer stands in for the trained one
        from walt_cli.models.tokenizer import CausalVideoTokenizer

        CausalVideoTokenizer.from_preset("tiny").save(run / "tokenizer" / "tokenizer.safetensors")
    subprocess.run(walt("tokenize", "encode", str(TINY), f"run_dir={run}", "--no-progress"),
                   check=True, capture_output=True, env=env, cwd=REPO)  # fmt: skip
    reports.append(
        soak("train-base",
             ["train-base", *common, f"base.max_steps={a.steps}", "base.preview_every=0"],
             run / "base", "base.safetensors", a.kills, rng, a.window)
    )  # fmt: skip
    for r in reports:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
