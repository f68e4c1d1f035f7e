"""`metrics.csv` of a stage: one row per step, written atomically, trimmed on resume.

Lightning's CSVLogger appends rows to the file (a kill can cut the last one) and deletes an
existing file when it starts; and a run resumed from its last checkpoint repeats the steps it
had logged after that checkpoint. This logger keeps the rows in memory, merges what is logged
for one step into one row, rewrites the whole file through `runio.atomic_path` (at most every
`interval` seconds, and always when a checkpoint is written or training ends), and, when a run
starts at step k, drops the rows of steps after k: the file never holds a step twice.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from walt_cli.runio import write_text


class MetricsCSV(Logger):
    def __init__(self, path: str | Path, *, interval: float = 2.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.interval = interval
        self.rows: list[dict[str, Any]] = self._read()
        self._written = 0.0
        self._dirty = False

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]
        except (OSError, csv.Error, UnicodeDecodeError):
            return []  # unreadable history: start the file again
        return [{k: v for k, v in r.items() if k and v not in (None, "")} for r in rows]

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = int(step or 0)
        values = {k: float(v) for k, v in metrics.items()}
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": step, **values})
        self._dirty = True

    @rank_zero_only
    def truncate_after(self, step: int) -> None:
        """Forget the rows of steps after `step` (a run resuming from its checkpoint at `step`)."""
        kept = [r for r in self.rows if int(r["step"]) <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._dirty = True
            self.flush()

    @rank_zero_only
    def save(self) -> None:
        if self._dirty and time.monotonic() - self._written >= self.interval:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        if not self._dirty:
            return
        keys: dict[str, None] = {}
        for row in self.rows:
            keys.update(dict.fromkeys(k for k in row if k != "step"))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["step", *sorted(keys)], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, out.getvalue())
        self._written = time.monotonic()
        self._dirty = False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()
