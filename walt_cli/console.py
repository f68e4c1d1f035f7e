"""Rich consoles shared by the commands: results to stdout, messages and errors to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

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


def progress(*, rate: bool = False, disable: bool = False):
    """A Rich progress bar on stderr: `with progress() as bar: bar.track(...)`.

    With `rate=True` it shows a `rate` task field (e.g. "12.3 clips/s") that the caller updates.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err_console, transient=False, disable=disable)


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
