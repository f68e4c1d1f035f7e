"""What every command that reads a recipe shares: `--print-config` and loading."""

from __future__ import annotations

from pathlib import Path

import typer

PRINT_CONFIG = typer.Option(
    False, "--print-config", help="Print the resolved recipe (after overrides) and exit."
)


def load(recipe: Path, overrides: list[str] | None, print_config: bool):
    """The validated recipe, or None after printing it (`--print-config`)."""
    from walt_cli.config import load_recipe, to_yaml
    from walt_cli.console import console

    r = load_recipe(recipe, list(overrides or []))
    if print_config:
        console.print(to_yaml(r), markup=False, highlight=False, soft_wrap=True)
        return None
    return r
