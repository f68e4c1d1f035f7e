"""Training progress counted in a system's own steps: a Rich bar on a terminal, plain lines
elsewhere (a batch job's log, CI).

Written here rather than taken from Lightning because its bars count the batches of the current
epoch against the loader's length. walt's runs are step-based (`max_epochs=-1`; the system stops
the trainer at its own `max_steps`, and its samplers resume mid-epoch), so Lightning's bar read
"3000/25000" with an ETA for 25000 batches on a 3000-step run, started again from 0 on resume,
and, on a stream that is not a terminal, printed nothing until the run ended.
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from walt_cli.console import err_console, format_duration

# Lightning's logger version: nothing to a user watching one run.
_HIDDEN = frozenset({"v_num"})


def format_rate(steps_per_s: float) -> str:
    """Steps per second, or seconds per step when a step takes longer than a second (CPUs)."""
    if not math.isfinite(steps_per_s) or steps_per_s <= 0:
        return "? steps/s"
    return f"{steps_per_s:.2f} steps/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.2f} s/step"


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for name, value in metrics.items():
        if name in _HIDDEN:
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " · ".join(parts)


class StepProgress(ProgressBar):
    """Progress of a step-based training system (one with `step` and `max_steps`).

    On a terminal: a Rich bar, step / max_steps, the rate, elapsed and remaining time and the
    progress-bar metrics (read at most once every `refresh_s`, since reading them waits for the
    device). Otherwise: one line at the first step, every `every` steps (default: the trainer's
    `log_every_n_steps`), after each validation and at the end. A resumed run counts on from
    the step it resumed at, and its rate and ETA cover this process's steps only.
    """

    def __init__(self, console=None, *, every: int | None = None, refresh_s: float = 1.0) -> None:
        super().__init__()
        self._console = console  # None: walt's stderr console, looked up when used (picklable)
        self.every = every
        self.refresh_s = refresh_s
        self._enabled = True
        self._bar = None
        self._task = None
        self._start_step = 0
        self._total = 0
        self._t0 = 0.0
        self._last_step = -1
        self._last_read = -math.inf

    @property
    def console(self):
        return err_console if self._console is None else self._console

    # Lightning's ProgressBar interface -----------------------------------------------------

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return {
            k: v for k, v in super().get_metrics(trainer, pl_module).items() if k not in _HIDDEN
        }

    # Hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        self._total = int(pl_module.max_steps)
        self._start_step = self._last_step = int(pl_module.step)
        self._t0 = time.monotonic()
        if self.every is None:
            self.every = max(1, int(trainer.log_every_n_steps))
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=self._total, completed=self._start_step, rate="", metrics=""
            )
        elif self._start_step:
            self._line(f"resuming at step {self._start_step}/{self._total}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        step = int(pl_module.step)
        if step == self._last_step:  # a micro-batch of gradient accumulation
            return
        self._last_step = step
        now = time.monotonic()
        done = step - self._start_step
        rate = done / (now - self._t0) if now > self._t0 else math.nan
        if self._bar is not None:
            fields = {"rate": format_rate(rate)}
            if now - self._last_read >= self.refresh_s or step >= self._total:
                self._last_read = now
                fields["metrics"] = format_metrics(self.get_metrics(trainer, pl_module))
            self._bar.update(self._task, completed=step, **fields)
            return
        if done == 1 or step % self.every == 0 or step >= self._total:
            eta = (self._total - step) / rate if rate > 0 else math.inf
            # Validation metrics get lines of their own, when they are new.
            train = {
                k: v for k, v in self.get_metrics(trainer, pl_module).items() if "val" not in k
            }
            metrics = format_metrics(train)
            self._line(
                f"step {step}/{self._total} ({100 * step / max(self._total, 1):.0f}%) · "
                f"{format_rate(rate)} · elapsed {format_duration(now - self._t0)} · "
                f"eta {format_duration(eta)}" + (f" · {metrics}" if metrics else "")
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._enabled and self._bar is not None and not trainer.sanity_checking:
            self._bar.update(self._task, description="validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        if self._bar is not None:
            self._bar.update(self._task, description="train")
            return
        val = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if "val" in k}
        if val:
            self._line(f"step {int(pl_module.step)}: validation · {format_metrics(val)}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    # ---------------------------------------------------------------------------------------

    def _line(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
