"""TensorBoard scalars of a stage beside its `metrics.csv` (`trainer.loggers: [tensorboard]`).

Event files go to `runs/<name>/<stage>/tensorboard/`, so `tensorboard --logdir runs/<name>`
shows every stage of an experiment. The values and steps are the ones `metrics.csv` gets (the
system's own step, not Lightning's global step).

Written here rather than with Lightning's `TensorBoardLogger` for one reason: resuming. A run
killed after its last checkpoint has logged steps that the resumed run logs again; the CSV
logger drops them (`truncate_after`), and TensorBoard drops them when the writer is opened with
`purge_step` (it discards the events of earlier sessions at steps >= purge_step). The step is
known only once the checkpoint is restored, after the Trainer and its loggers are built, and
Lightning's logger takes the writer's arguments at construction; this one opens its writer at
the first event, with the purge step set by `truncate_after`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from walt_cli.errors import WaltError


def _summary_writer():
    """torch's SummaryWriter (the `tensorboard` package), else tensorboardX's."""
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter
    elif importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter
    else:
        raise WaltError(
            "trainer.loggers: tensorboard needs the tensorboard package (pip install tensorboard)"
        )
    return SummaryWriter


class TensorBoardMetrics(Logger):
    def __init__(self, log_dir: str | Path) -> None:
        super().__init__()
        self._dir = Path(log_dir)
        self._writer_cls = _summary_writer()  # fails before training starts, not at step 1
        self._writer = None
        self._purge_step: int | None = None

    @property
    def name(self) -> str:
        return "tensorboard"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._dir)

    def _open(self):
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self._dir), purge_step=self._purge_step)
        return self._writer

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved recipe is runs/<name>/recipe.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        writer = self._open()
        for key, value in metrics.items():
            writer.add_scalar(key, float(value), int(step or 0))

    @rank_zero_only
    def truncate_after(self, step: int) -> None:
        """Events of steps after `step` (a killed run's, past its last checkpoint, or all of a
        run killed before its first one: step 0) are dropped when this run writes its first."""
        if self._writer is None:
            self._purge_step = step + 1

    @rank_zero_only
    def save(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    @rank_zero_only
    def flush(self) -> None:
        self.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def extra_loggers(names, stage_dir: Path) -> list[Logger]:
    """The loggers `trainer.loggers` names, for a stage writing into `stage_dir`."""
    out: list[Logger] = []
    for name in dict.fromkeys(names):  # each once
        if name == "tensorboard":
            out.append(TensorBoardMetrics(Path(stage_dir) / "tensorboard"))
        else:  # load_recipe refuses these first
            raise WaltError(f"trainer.loggers: unknown logger {name!r}")
    return out
