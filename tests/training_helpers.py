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
