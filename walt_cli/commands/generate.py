"""`walt sample`, `walt animate` and `walt export`: generation through the one pipeline
(walt_cli/pipelines). Torch is imported inside the commands, so `walt --help` stays instant."""

from __future__ import annotations

from pathlib import Path

import typer

from walt_cli.data.shapes_vocab import describe as describe_shapes_vocab
from walt_cli.errors import WaltError

MODEL_HELP = "A run directory (runs/<name>) or an exported bundle; default: the bundled model."
STEPS_HELP = "DDIM steps: one value, or one per stage (base,sr1,...); default: the model's."
# What `walt sample --help` and `walt animate --help` say of the bundled model (a shapes model:
# the caption words are its whole vocabulary; other words draw a warning and still a video).
DEFAULT_MODEL_EPILOG = (
    "The default model (no --model) is the shapes cascade shipped in the package: 17 frames, "
    "128x128, 8 fps. It knows the words of its captions, "
    "'a|an (size) COLOUR SHAPE moving DIRECTION SPEED (and ...) on a BACKGROUND background': "
    + describe_shapes_vocab()
    + ". Other words draw a warning naming them, and still a video."
)
PRECISION_HELP = (
    "auto (CUDA bf16, CPU fp32), fp32, bf16 (on a CPU, faster only with AMX or AVX512-BF16)."
)
GUIDANCE_HELP = (
    "Classifier-free guidance: one value or one per stage (1 = none); default: the model's."
)


# The options `sample` and `animate` share, passed on by name from the command's locals().
SHARED = (
    "model",
    "num_samples",
    "seed",
    "steps",
    "guidance",
    "frames",
    "fps",
    "device",
    "precision",
)


def _request(
    kind: str,
    *,
    model,
    prompts: list[str],
    classes: list[str],
    num_samples: int,
    seed: int,
    steps,
    guidance,
    frames,
    fps,
    device,
    precision,
    **extra,
):
    from walt_cli.pipelines.requests import Request, parse_values

    if num_samples < 1:
        raise WaltError(f"--num-samples must be >= 1, got {num_samples}")
    if prompts and classes:
        raise WaltError("pass prompts or --class, not both")
    conds: list[tuple[str | None, str | None]]
    if prompts:
        conds = [(p, None) for p in prompts]
    elif classes:
        conds = [(None, c) for c in classes]
    else:
        conds = [(None, None)]
    rows = [c for c in conds for _ in range(num_samples)]
    return Request(
        kind=kind,
        model=None if model is None else str(model),
        prompts=[p for p, _ in rows],
        labels=[c for _, c in rows],  # class names resolved to ids once the model is loaded
        seeds=[seed + i for i in range(len(rows))],
        steps=parse_values(steps, "--steps", int, minimum=1),
        guidance=parse_values(guidance, "--guidance", float),
        num_frames=frames,
        fps=fps,
        device=device,
        precision=precision,
        **extra,
    )


def _generate(request, out: Path, batch_size: int, progress: bool, expected=None) -> None:
    from walt_cli.console import console
    from walt_cli.pipelines import Pipeline
    from walt_cli.pipelines.requests import check_writable, run

    check_writable(out)
    pipe = Pipeline.from_bundle(request.model, device=request.device, precision=request.precision)
    if any(v is not None for v in request.labels):
        request.labels = [None if v is None else pipe.class_id(v) for v in request.labels]
    elif pipe.conditioning == "class" and request.kind == "sample":
        raise WaltError(
            f"this model is class-conditional ({pipe.base.net.num_classes} classes): pass "
            "--class NAME|ID"
        )
    written = run(
        request,
        out,
        batch_size=batch_size,
        progress=progress,
        pipeline=pipe,
        expected_hashes=expected,
    )
    videos = [p for p in written if p.suffix != ".json"]
    shown = ", ".join(str(p) for p in videos[:3]) + (" ..." if len(videos) > 3 else "")
    console.print(f"wrote {len(videos)} file(s): {shown} (+ .json sidecars)", soft_wrap=True)


def sample(
    prompts: list[str] | None = typer.Argument(
        None, help="Prompts (text models); each makes --num-samples videos.", show_default=False
    ),
    prompts_file: Path | None = typer.Option(
        None, "--prompts", help="A text file with one prompt a line."
    ),
    classes: list[str] | None = typer.Option(
        None, "--class", help="Class name or id (class-conditional models); repeatable."
    ),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples per prompt/class."),
    seed: int = typer.Option(0, "--seed", help="Sample i uses seed + i (whatever the batch)."),
    steps: list[str] | None = typer.Option(None, "--steps", help=STEPS_HELP),
    guidance: list[str] | None = typer.Option(None, "--guidance", help=GUIDANCE_HELP),
    frames: int | None = typer.Option(
        None, "--frames", help="Frames; beyond one clip by autoregressive extension (17, 29, 41)."
    ),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    out: Path = typer.Option(
        Path("samples"), "--out", "-o", help="FILE (.mp4, .gif, .png contact sheet) or DIR."
    ),
    fps: float | None = typer.Option(None, "--fps", help="Frame rate (default: the model's, 8)."),
    from_sidecar: Path | None = typer.Option(
        None, "--from", help="Regenerate the video a JSON sidecar describes."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Rich progress."),
) -> None:
    """Generate videos: base DDIM -> SR stages -> decoder; a JSON sidecar beside each file.

    Examples:

      walt sample "a red circle moving left" --model runs/t2v -n 4 --out samples/

      walt sample --class "circle moving left" --model runs/shapes --frames 29 --out c.mp4

      walt sample --from samples/0000-a-red-circle-moving-left-s0.json --out again.mp4
    """
    from walt_cli.console import setup_logging
    from walt_cli.pipelines.requests import load_sidecar, read_prompts

    setup_logging()
    if from_sidecar is not None:
        import json

        request = load_sidecar(from_sidecar)
        if model is not None:
            request.model = model
        expected = json.loads(from_sidecar.read_text()).get("model_hashes")
        _generate(request, out, batch_size, progress_bar, expected=expected)
        return
    texts = list(prompts or [])
    if prompts_file is not None:
        texts += read_prompts(prompts_file)
    shared = {k: v for k, v in locals().items() if k in SHARED}
    request = _request("sample", prompts=texts, classes=list(classes or []), **shared)
    _generate(request, out, batch_size, progress_bar)


def animate(
    image: Path | None = typer.Argument(
        None, help="The image that becomes the first frame.", show_default=False
    ),
    prompt: str | None = typer.Argument(None, help="Prompt (text models).", show_default=False),
    video: Path | None = typer.Option(
        None, "--video", help="Continue this clip from its last 5 frames instead (K600 setting)."
    ),
    classes: list[str] | None = typer.Option(None, "--class", help="Class name or id."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples."),
    seed: int = typer.Option(0, "--seed", help="Sample i uses seed + i."),
    steps: list[str] | None = typer.Option(None, "--steps", help=STEPS_HELP),
    guidance: list[str] | None = typer.Option(None, "--guidance", help=GUIDANCE_HELP),
    frames: int | None = typer.Option(None, "--frames", help="Frames (17, 29, 41, ...)."),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    out: Path = typer.Option(Path("animated"), "--out", "-o", help="FILE or DIR."),
    fps: float | None = typer.Option(None, "--fps", help="Frame rate (default: the model's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    progress_bar: bool = typer.Option(True, "--progress/--no-progress", help="Rich progress."),
) -> None:
    """Image-to-video (the image is the first latent frame), or continue a clip with --video.

    The image is resized to cover the model's resolution and centre-cropped.

    Examples:

      walt animate photo.png "waves rolling onto a beach" --model runs/t2v --out waves.mp4

      walt animate --video clip.mp4 --frames 29 --model runs/k600 --out continued.mp4
    """
    from walt_cli.console import setup_logging

    setup_logging()
    if image is None and video is None:
        raise WaltError("pass an IMAGE, or --video CLIP")
    if (
        video is not None and image is not None
    ):  # `--video CLIP "PROMPT"`: the one argument is the prompt
        if prompt is not None:
            raise WaltError("pass an IMAGE or --video CLIP, not both")
        image, prompt = None, str(image)
    shared = {k: v for k, v in locals().items() if k in SHARED}
    request = _request(
        "animate" if video is None else "continue",
        prompts=[prompt] if prompt else [],
        classes=list(classes or []),
        **shared,
        image=None if image is None else str(image),
        video=None if video is None else str(video),
        extra={"context_frames": 5} if video is not None else {},
    )
    _generate(request, out, batch_size, progress_bar)


def export(
    run_dir: Path = typer.Argument(
        ..., help="The run directory (runs/<name>).", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle folder to write (new or empty)."),
    force: bool = typer.Option(False, "--force", help="Replace the bundle already at --out."),
) -> None:
    """Write a model bundle (tokenizer, base, SR stages, sha256s, walt_bundle.json).

    The weights are the run's EMA exports (safetensors); walt_bundle.json names them with their
    sha256, the text encoder, the latent statistics and the sampling defaults.

    Example: walt export runs/shapes --out bundles/shapes && walt sample --model bundles/shapes --class 3
    """
    from walt_cli.console import console
    from walt_cli.pipelines.bundle import INDEX_FILE, export_bundle

    path = export_bundle(run_dir, out, force=force)
    console.print(f"wrote bundle {path} ({INDEX_FILE} + weights)", soft_wrap=True)
