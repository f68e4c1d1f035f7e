"""`walt plan RECIPE`: per-device memory, FLOPs and step time of a training stage, before
launching it (walt_cli/plan.py). Torch is imported inside the command."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML.", show_default=False),
    overrides: list[str] | None = typer.Argument(
        None, help="key.path=value overrides, e.g. base.batch_size=16.", show_default=False
    ),
    stage: str = typer.Option(
        "base",
        "--stage",
        help="tokenizer, decoder (walt tokenize train --decoder: encoder frozen), base or srN.",
    ),
    gpu: str | None = typer.Option(
        None, "--gpu", help="A GPU by name (H100, A100-40GB, RTX 4090, ...).", show_default=False
    ),
    memory: float | None = typer.Option(
        None, "--memory", help="Device memory in GiB (instead of --gpu).", show_default=False
    ),
    devices: int | None = typer.Option(
        None, "--devices", help="Devices in all (default: the recipe's trainer.devices, or 1)."
    ),
    strategy: str | None = typer.Option(
        None, "--strategy", help="ddp or fsdp (default: the recipe's trainer.strategy)."
    ),
    mfu: float = typer.Option(
        0.4, "--mfu", help="Assumed share of the GPU's peak FLOP/s a step reaches."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the plan as JSON here.", show_default=False
    ),
    max_memory: float | None = typer.Option(
        None,
        "--max-memory",
        help="CI gate: print one verdict line, exit 1 when the peak per device exceeds this GiB.",
        show_default=False,
    ),
) -> None:
    """Plan a training stage: memory per device, FLOPs, step time; the smallest change that fits.

    It prints the parameters; per-device memory (weights, gradients, optimizer state, EMA,
    activations, transients) for DDP and FSDP; FLOPs per sample and the step time they imply on
    a GPU; whether it fits, and the smallest change that does.

    Memory comes from running a training step of the stage's real networks on PyTorch's meta
    device (shapes, no data): nothing is allocated and no GPU is needed. The numbers are
    predictions (walt_cli/plan.py says how they are made).

    Example: walt plan recipes/ucf101.yaml --gpu H100 --devices 8
    """
    from walt_cli.config import load_recipe
    from walt_cli.errors import WaltError
    from walt_cli.plan import make_plan

    if max_memory is not None and max_memory <= 0:
        raise WaltError(f"--max-memory must be positive GiB, got {max_memory}")
    r = load_recipe(recipe, list(overrides or []))
    capacity = memory if memory is not None or gpu is not None else max_memory
    p = make_plan(
        r,
        stage,
        gpu=gpu,
        memory_gib=capacity,
        devices=devices,
        strategy=strategy,
        mfu=mfu,
        source=str(recipe),
    )
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(p.to_json(), indent=2) + "\n")
        except OSError as err:
            raise WaltError(f"--json {json_out}: cannot write ({err.strerror})") from None
    if max_memory is not None:
        peak = (p.fsdp if p.strategy == "fsdp" else p.ddp).peak / 1024**3
        ok = peak <= max_memory
        typer.echo(
            f"{'FITS' if ok else 'DOES NOT FIT'}: {p.stage} peak {peak:.2f} GiB per device "
            f"{'<=' if ok else '>'} {max_memory:g} GiB ({p.strategy}, {p.devices} device(s), "
            f"batch {p.batch})" + ("" if ok or not p.suggestion else f"; try {p.suggestion}")
        )
        raise typer.Exit(0 if ok else 1)
    from walt_cli.console import console
    from walt_cli.plan import render

    console.print(render(p))
