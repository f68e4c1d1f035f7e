"""`walt data ...`: inspect data sets."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Inspect data sets: see exactly what the data pipeline feeds the model.",
    no_args_is_help=True,
)

PREVIEW_FORMATS = (".gif", ".mp4", ".png")


@app.command("preview")
def preview(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides, key.path=value.", show_default=False
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output file: .gif, .mp4 (a grid of clips) or .png (a contact sheet).",
    ),
    split: str = typer.Option("train", help="Which split to show: train or val."),
    num: int = typer.Option(8, "--num", "-n", min=1, help="How many samples to show."),
    scan: bool = typer.Option(
        False, help="Decode every item (with a progress bar) to count unreadable files."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved recipe and exit."
    ),
) -> None:
    """Write what the data pipeline feeds the model, and summarise the data set.

    Example: walt data preview recipes/shapes.yaml --out preview.gif data.num_frames=9
    """
    from walt_cli.config import load_recipe, save_recipe, to_yaml
    from walt_cli.console import console
    from walt_cli.errors import WaltError

    cfg = load_recipe(recipe, overrides or [])
    if print_config:
        console.print(to_yaml(cfg), markup=False, highlight=False)
        return
    if out.suffix.lower() not in PREVIEW_FORMATS:
        raise WaltError(f"--out {out}: unsupported format (use {', '.join(PREVIEW_FORMATS)})")
    from walt_cli.console import setup_logging
    from walt_cli.data.preview import preview_dataset, summary_table

    setup_logging()
    summary = preview_dataset(cfg, out, split=split, num=num, scan=scan)
    save_recipe(cfg)  # after the preview: a recipe whose data fails leaves no run folder
    console.print(summary_table(summary))
    console.print(f"wrote [bold]{out}[/]")
