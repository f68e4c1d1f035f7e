"""Rich consoles shared by the commands: results to stdout, messages and errors to stderr."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """Print a user-facing error as exactly one line on stderr."""
    one_line = " ".join(message.split())
    err_console.print(f"[bold red]error:[/] {escape(one_line)}", soft_wrap=True, highlight=False)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


def setup_logging(level: int | None = None) -> None:
    """Route the library's `walt.*` loggers to stderr through Rich (once)."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("walt")
    if not logger.handlers:
        handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        logger.addHandler(handler)
    logger.setLevel(level or logging.INFO)


class LoggedProgress(Progress):
    """Rich's progress bar, which on a stream that is not a terminal (a CI job, a batch job's
    log) draws nothing until it stops (then its final state, unless transient): there each task
    prints a plain line every `log_every_s` seconds once it has run that long, so long work
    shows it is alive, and one when it completes if it printed any before or the bar is
    transient (short work is left to Rich's final render)."""

    def __init__(self, *columns, log_every_s: float = 30.0, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self.log_every_s = log_every_s
        self._plain = not self.console.is_terminal and not self.disable
        self._last_line: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if not self._plain:
            return
        with self._lock:
            task = self._tasks[task_id]
        now = time.monotonic()
        last = self._last_line.get(task_id, task.start_time or now)
        if last == math.inf:  # its completion is printed
            return
        if not task.finished and now - last < self.log_every_s:
            return
        if task.finished and task_id not in self._last_line and not self.live.transient:
            return
        self._last_line[task_id] = math.inf if task.finished else now
        total = f"/{task.total:.0f} ({task.percentage:.0f}%)" if task.total else ""
        left = task.time_remaining
        eta = "" if task.finished or left is None else f" · eta {format_duration(left)}"
        self.console.print(
            f"{task.description}: {task.completed:.0f}{total} · elapsed "
            f"{format_duration(task.elapsed or 0.0)}{eta}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def progress(
    *, rate: bool = False, disable: bool = False, transient: bool = False, log_every_s: float = 30.0
) -> LoggedProgress:
    """A Rich progress bar on stderr: `with progress() as bar: bar.track(...)`; plain lines
    where stderr is not a terminal (`LoggedProgress`).

    With `rate=True` it shows a `rate` task field (e.g. "12.3 clips/s") that the caller updates.
    """
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return LoggedProgress(
        *columns,
        console=err_console,
        transient=transient,
        disable=disable,
        log_every_s=log_every_s,
    )


def format_duration(seconds: float) -> str:
    """1:02:03 / 2:03; "?" for an unknown (infinite or NaN) duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)  # whole seconds elapsed, as Rich's columns show them
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def resolve_device(device: str):
    """`auto`, `cpu`, `cuda`, `cuda:N` -> a torch.device, with one-line errors for the rest."""
    import torch

    from walt_cli.errors import WaltError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise WaltError(
            f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:1)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WaltError(f"--device {device}: CUDA is not available here (use --device cpu)")
    return dev
