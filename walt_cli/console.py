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


def progress():
    """A Rich progress bar on stderr with a rate column: `with progress() as bar: bar.track(...)`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
