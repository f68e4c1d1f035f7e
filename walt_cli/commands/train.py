"""`walt train-base` and `walt train-sr`: the base latent transformer (W.A.L.T's second stage)
and the super-resolution stages of the cascade.

Torch and Lightning are imported inside the command, so `walt --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from walt_cli.commands.recipe_opts import PRINT_CONFIG, load


def train_base(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML (its `data`, `trainer` and `base` sections).", show_default=False
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="key.path=value overrides, e.g. base.max_steps=2000 data.batch_size=8.",
        show_default=False,
    ),
    progress_bar: bool = typer.Option(
        True, "--progress/--no-progress", help="Show the Rich progress bar."
    ),
    print_config: bool = PRINT_CONFIG,
) -> None:
    """Train the base latent transformer (v-prediction, self-conditioning, EMA); rerun to resume.

    Reads the latent shards of `walt tokenize encode` (or encodes online with
    base.latents=online). Writes runs/<name>/base/: last.ckpt (full training state),
    base.safetensors (EMA weights + config + latent statistics), metrics.csv and previews/
    (DDIM samples decoded by the tokenizer).

    Example: walt train-base recipes/shapes.yaml base.max_steps=2000
    """
    from walt_cli.console import console, setup_logging
    from walt_cli.runio import stage_lock

    r = load(recipe, overrides, print_config)
    if r is None:
        return
    from walt_cli.systems.base import train_base as run

    setup_logging()
    with stage_lock(Path(r.run_dir) / "base"):
        summary = run(r, progress=progress_bar, console=console)
    if summary["main_process"]:
        _report(summary)


def _report(summary: dict) -> None:
    from walt_cli.console import console

    console.print(
        f"step {summary['step']}: weights [bold]{summary['weights']}[/], state "
        f"{summary['checkpoint']}, metrics {summary['metrics']}, previews {summary['previews']}"
        + (
            f"; {summary['skipped_steps']} non-finite steps skipped"
            if summary["skipped_steps"]
            else ""
        ),
        soft_wrap=True,
    )


def train_sr(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML (its `data`, `trainer` and `sr` sections).", show_default=False
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="key.path=value overrides, e.g. sr.0.max_steps=2000 sr.0.batch_size=8.",
        show_default=False,
    ),
    stage: int = typer.Option(
        ..., "--stage", help="Which SR stage to train: 1 (reads sr[0]), 2, ...", show_default=False
    ),
    progress_bar: bool = typer.Option(
        True, "--progress/--no-progress", help="Show the Rich progress bar."
    ),
    print_config: bool = PRINT_CONFIG,
) -> None:
    """Train super-resolution stage N of the cascade (noise-conditioning augmentation, EMA);
    rerun to resume.

    Reads the latent pairs of `walt tokenize encode RECIPE --sr N` (runs/<name>/latents/srN/).
    Writes runs/<name>/srN/: last.ckpt (full training state), srN.safetensors (EMA weights +
    config + latent statistics of both resolutions), metrics.csv and previews/ (low-res input |
    SR output | ground truth).

    Example: walt train-sr recipes/shapes.yaml --stage 1 sr.0.max_steps=2000
    """
    from walt_cli.console import console, setup_logging
    from walt_cli.runio import stage_lock

    r = load(recipe, overrides, print_config)
    if r is None:
        return
    from walt_cli.systems.sr import train_sr as run

    setup_logging()
    with stage_lock(Path(r.run_dir) / f"sr{stage}"):
        summary = run(r, stage, progress=progress_bar, console=console)
    if summary["main_process"]:
        _report(summary)
