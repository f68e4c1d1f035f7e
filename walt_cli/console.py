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
