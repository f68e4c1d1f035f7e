"""Helpers shared by the training tests: the tiny recipe in a temporary run directory and the
rows of a run's metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

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
