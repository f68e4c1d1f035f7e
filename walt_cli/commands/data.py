"""`walt data ...`: inspect data sets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect data sets: see exactly what the data pipeline feeds the model.", no_args_is_help=True)
