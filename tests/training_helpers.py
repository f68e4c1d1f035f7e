"""Helpers shared by the training tests: the tiny recipe in a temporary run directory and the
rows of a run's metrics.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L

from walt_cli.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def tiny(tmp_path: Path, *overrides: str):
    """recipes/tiny.yaml with run_dir under tmp_path and the given overrides."""
    return load_recipe(TINY, [f"run_dir={tmp_path}/run", *overrides])


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, over the rows that logged it."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def resume_snapshot(trainer, module) -> dict:
    """What the resume tests compare of a diffusion stage: step, weights, EMA, optimizer state,
    scheduler and the latent statistics buffers (copies)."""
    import torch

    opt = trainer.optimizers[0].state_dict()
    buffers = ("latent_std", "lowres_std")
    return {
        "step": int(module.step),
        "net": {k: v.clone() for k, v in module.net.state_dict().items()},
        "ema": {k: v.clone() for k, v in module.ema.state_dict().items()},
        "opt": {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                for i, s in opt["state"].items()},
        "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "stats": {b: getattr(module, b).clone() for b in buffers if hasattr(module, b)},
    }  # fmt: skip


class RecordTimesteps(L.Callback):
    """Writes, per rank, the diffusion timesteps the base network saw in its first steps to
    `folder/rank-<r>.json` (module level, so `ddp_spawn` can pickle it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.seen: list[list[float]] = []

    def on_train_start(self, trainer, module):
        def hook(net, args):
            if net.training and len(self.seen) < 8:
                self.seen.append(args[1].flatten().tolist())

        self.handle = module.net.register_forward_pre_hook(hook)

    def on_train_end(self, trainer, module):
        self.handle.remove()
        out = self.folder / f"rank-{trainer.global_rank}.json"
        out.write_text(json.dumps(self.seen))


def run_ranks(target, *args, world: int = 2, timeout: float = 1200.0) -> None:
    """`target(*args)` in `world` forked processes that find their rank in the environment, as
    torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT): Lightning launches
    nothing and each process is one rank. Forked, not spawned, so no process imports torch
    and Lightning again. Raises if a rank fails."""
    import multiprocessing
    import socket

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, target, args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"rank exit codes {codes}"


def _rank_main(rank: int, world: int, port: int, target, args) -> None:
    import os
    import traceback

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
        RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    # GNU OpenMP's thread team does not survive a fork (the child waits on the parent's
    # workers): each rank computes on one thread of its own.
    torch.set_num_threads(1)

    rank_zero_only.rank = rank  # what Lightning reads from the environment at import
    import sys

    code = 0
    try:
        target(*args)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # not the parent's (pytest's) exit handlers
