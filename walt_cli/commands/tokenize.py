"""`walt tokenize ...`: the causal 3D video tokenizer (W.A.L.T's first stage).

Torch and the model are imported inside the commands, so `walt --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from walt_cli.commands.recipe_opts import PRINT_CONFIG, load

app = typer.Typer(
    help="The causal 3D video tokenizer: train it, encode a data set into latents, check how "
    "well it round-trips videos.",
    no_args_is_help=True,
)

OUT_FORMATS = (".mp4", ".gif")
GAP = 2  # white pixels between the tiles of the side-by-side video


@app.command("reconstruct")
def reconstruct(
    videos: list[Path] = typer.Argument(
        ..., help="Video (or image) files to round-trip; one clip from each.", show_default=False
    ),
    ckpt: Path | None = typer.Option(
        None, "--ckpt", help="Tokenizer weights (.safetensors written by the tokenizer's save)."
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Use an untrained preset instead of --ckpt (tiny, shapes, paper, paper-image): checks the "
        "pipeline, not the quality.",
    ),
    out: Path = typer.Option(
        Path("reconstruction.mp4"),
        "--out",
        "-o",
        help="Output video (.mp4 or .gif): original | reconstruction, one row per clip.",
    ),
    frames: int = typer.Option(17, "--frames", "-f", help="Frames per clip: 1 + 4k (images: 1)."),
    size: str = typer.Option(
        "128",
        "--size",
        help="Frame size: N (short side resized to N, centre crop NxN) or HxW; multiples of 8.",
    ),
    start: str = typer.Option(
        "center", "--start", help="First frame of each clip: an index, 'center' or 'random'."
    ),
    stride: int = typer.Option(1, "--stride", min=1, help="Take every stride-th source frame."),
    chunk_frames: int = typer.Option(
        0,
        "--chunk-frames",
        min=0,
        help="Encode and decode this many frames at a time (a multiple of 4), carrying the "
        "causal state: same result, less memory. 0: whole clips.",
    ),
    fps: float | None = typer.Option(
        None, "--fps", help="Output frame rate (default: the clip's)."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the per-clip metrics to this JSON file."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of an untrained preset's weights."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda, cuda:1."),
) -> None:
    """Round-trip videos through the tokenizer; write them side by side and print PSNR and SSIM.

    Example: walt tokenize reconstruct clip.mp4 --ckpt runs/ucf101/tokenizer/tokenizer.safetensors --out recon.mp4
    """
    import json

    import torch

    from walt_cli.console import console, progress
    from walt_cli.data.video import is_image, load_clip, tile_videos, write_video
    from walt_cli.errors import WaltError
    from walt_cli.runio import check_writable, refuse_same

    if out.suffix.lower() not in OUT_FORMATS:
        raise WaltError(f"--out {out}: unsupported format (use {' or '.join(OUT_FORMATS)})")
    if fps is not None and not fps > 0:
        raise WaltError(f"--fps {fps:g}: must be positive")
    for path in videos:
        if not path.is_file():
            raise WaltError(f"{path}: no such file")
    # Before any compute: the outputs can be written and overwrite no input.
    for target, name in ((out, "--out"), (json_out, "--json")):
        if target is not None:
            refuse_same(target, *videos, ckpt)
            check_writable(target, what=name)
    if json_out is not None:
        refuse_same(json_out, out)
    torch.manual_seed(seed)  # an untrained preset's weights and --start random
    tok, source = _load_tokenizer(ckpt, preset, seed)
    height, width = _parse_size(size, tok.spatial_factor)
    f_t = tok.temporal_factor
    if frames < 1 or (frames - 1) % f_t:
        raise WaltError(f"--frames {frames}: must be 1 + {f_t}k (e.g. 1, {1 + f_t}, {1 + 4 * f_t})")
    if chunk_frames % f_t:
        raise WaltError(f"--chunk-frames {chunk_frames}: must be a multiple of {f_t} (or 0)")
    first = _parse_start(start)
    from walt_cli.console import resolve_device

    dev = resolve_device(device)
    tok = tok.to(dev).eval()

    console.print(
        f"tokenizer: {source}, {tok.num_parameters() / 1e6:.1f}M parameters, "
        f"f_s={tok.spatial_factor} f_t={f_t} c={tok.latent_channels}; device {dev}"
    )
    rows, pairs, clip_fps = [], [], []
    with progress() as bar, torch.inference_mode():
        for path in videos:
            clip = load_clip(
                path,
                num_frames=1 if is_image(path) else frames,
                stride=stride,
                start=first,
                size="cover",
                crop=(height, width),
            )
            clip_fps.append(clip.fps)
            # One bar per clip: encode chunks, then as many decode chunks.
            task = bar.add_task(f"round-trip {path.name}", total=None)
            x = clip.video.unsqueeze(0).to(dev)  # (1, 3, T, H, W) in [-1, 1]
            z = tok.encode(
                x,
                chunk_frames=chunk_frames or None,
                callback=lambda d, n, task=task: bar.update(task, completed=d, total=2 * n),
            )  # (1, c, t, h, w)
            y = tok.decode(
                z,
                chunk_latents=chunk_frames // f_t or None,
                callback=lambda d, n, task=task: bar.update(task, completed=n + d, total=2 * n),
            )  # (1, 3, T, H, W)
            y = y.clamp(-1, 1).float().cpu()[0]  # (3, T, H, W)
            psnr, ssim = clip_metrics(clip.video, y)
            rows.append(
                dict(
                    clip=str(path),
                    frames=clip.video.shape[1],
                    start=clip.start,
                    size=[height, width],
                    latent=list(z.shape[1:]),
                    psnr=psnr,
                    ssim=ssim,
                )
            )
            pairs.append((clip.video, y))

    t_max = max(v.shape[1] for v, _ in pairs)
    grid = tile_videos(
        torch.stack([_pad_time(v, t_max) for pair in pairs for v in pair]), ncols=2, gap=GAP
    )
    out_fps = fps or next((f for f in clip_fps if f > 0), 8.0)
    write_video(out, grid, fps=out_fps)

    console.print(_metrics_table(rows))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        summary = dict(tokenizer=source, clips=rows, **_means(rows))
        from walt_cli.runio import write_text

        write_text(json_out, json.dumps(summary, indent=2) + "\n")
    console.print(f"wrote [bold]{out}[/] (left: original, right: reconstruction)")


@app.command("train")
def train(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML (its `data` and `tokenizer` sections).", show_default=False
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="key.path=value overrides, e.g. tokenizer.max_steps=2000 data.batch_size=4.",
        show_default=False,
    ),
    progress_bar: bool = typer.Option(
        True, "--progress/--no-progress", help="Show the Rich progress bar."
    ),
    decoder: bool = typer.Option(
        False,
        "--decoder",
        help="Fine-tune the decoder of the run's trained tokenizer with its encoder frozen, into "
        "runs/<name>/decoder/: the latents and every stage trained on them stay valid, and the "
        "run's bundle decodes with it. The tokenizer section's keys (max_steps, lr, ...) apply.",
    ),
    print_config: bool = PRINT_CONFIG,
) -> None:
    """Train the causal 3D tokenizer (reconstruction + perceptual + GAN, EMA); rerun to resume.

    Writes runs/<name>/tokenizer/: last.ckpt (full training state), tokenizer.safetensors (EMA
    weights + config), metrics.csv and previews/ (original | reconstruction GIFs).

    Example: walt tokenize train recipes/shapes.yaml tokenizer.max_steps=2000
    """
    from walt_cli.console import console, setup_logging
    from walt_cli.runio import stage_lock

    r = load(recipe, overrides, print_config)
    if r is None:
        return
    from walt_cli.systems.tokenizer import DECODER_STAGE, train_tokenizer

    setup_logging()
    with stage_lock(Path(r.run_dir) / (DECODER_STAGE if decoder else "tokenizer")):
        summary = train_tokenizer(r, progress=progress_bar, console=console, decoder=decoder)
    console.print(
        f"step {summary['step']}: EMA weights [bold]{summary['weights']}[/], state "
        f"{summary['checkpoint']}, metrics {summary['metrics']}"
        + (
            f"; {summary['skipped_steps']} non-finite steps skipped"
            if summary["skipped_steps"]
            else ""
        )
        + (
            f"; {summary['skipped_files']} unreadable files skipped"
            if summary["skipped_files"]
            else ""
        ),
        soft_wrap=True,
    )


@app.command("encode")
def encode(
    recipe: Path = typer.Argument(
        ..., help="Recipe YAML (its `data` and `tokenizer` sections).", show_default=False
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        help="key.path=value overrides, e.g. tokenizer.encode_batch_size=16.",
        show_default=False,
    ),
    split: str = typer.Option("train", "--split", help="Which split to encode: train or val."),
    sr: int = typer.Option(
        0,
        "--sr",
        help="Encode the training pairs of SR stage N (clip at sr[N-1].resolution + the same "
        "clip downsampled by its factor) into latents/srN/; 0 = the base model's latents.",
    ),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda, cuda:1."),
    progress_bar: bool = typer.Option(
        True, "--progress/--no-progress", help="Show the Rich progress bar."
    ),
    print_config: bool = PRINT_CONFIG,
) -> None:
    """Encode the recipe's data set with the EMA tokenizer into latent shards + statistics.

    Writes runs/<name>/latents/<split>/: shard-NNNNN.safetensors (memory-mappable), index.jsonl
    (label, caption, source, start, frames per clip) and stats.json (per-channel mean/std keyed
    by the tokenizer's hash). With a `text_encoder` in the recipe the shards also hold each
    caption's text states. `--sr N` writes SR stage N's pairs to latents/srN/<split>/. Rerunning
    skips the shards already written.

    Example: walt tokenize encode recipes/shapes.yaml --split val ; ... --sr 1
    """
    from walt_cli.console import console, setup_logging
    from walt_cli.errors import WaltError
    from walt_cli.runio import stage_lock

    if split not in ("train", "val"):
        raise WaltError(f"--split {split!r}: use train or val")
    r = load(recipe, overrides, print_config)
    if r is None:
        return
    from walt_cli.systems.encode import encode_dataset

    setup_logging()
    from walt_cli.systems.encode import latent_folder

    with stage_lock(latent_folder(r, sr) / split):
        summary = encode_dataset(
            r, split=split, device=device, progress=progress_bar, console=console, sr=sr
        )
    console.print(
        f"{summary['clips']} clips in {summary['shards']} shards ({summary['skipped_shards']} "
        f"already done) -> [bold]{summary['folder']}[/]; latent mean "
        f"{_fmt(summary['stats']['mean'])}, std {_fmt(summary['stats']['std'])}; "
        f"{summary['clips_per_s']:.1f} clips/s",
        soft_wrap=True,
    )


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# --------------------------------------------------------------------------------------------
# Helpers


def _load_tokenizer(ckpt: Path | None, preset: str | None, seed: int):
    """(tokenizer, description) from --ckpt or --preset (exactly one)."""
    from walt_cli.errors import WaltError
    from walt_cli.models.tokenizer import PRESETS, CausalVideoTokenizer

    if ckpt is not None and preset is not None:
        raise WaltError("give either --ckpt or --preset, not both")
    if ckpt is not None:
        return CausalVideoTokenizer.from_checkpoint(ckpt), str(ckpt)
    if preset is None:
        raise WaltError(
            f"give --ckpt PATH (a trained tokenizer) or --preset NAME (an untrained one: "
            f"{', '.join(PRESETS)})"
        )
    return CausalVideoTokenizer.from_preset(preset), f"untrained preset {preset!r} (seed {seed})"


def _parse_size(size: str, multiple: int) -> tuple[int, int]:
    from walt_cli.errors import WaltError

    parts = size.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise WaltError(f"--size {size!r}: use N or HxW, e.g. 128 or 256x448")
    h, w = (int(parts[0]), int(parts[-1]))
    if min(h, w) < multiple or h % multiple or w % multiple:
        raise WaltError(f"--size {size}: height and width must be positive multiples of {multiple}")
    return h, w


def _parse_start(start: str) -> int | str:
    from walt_cli.errors import WaltError

    if start in ("center", "random"):
        return start
    if start.isdigit():
        return int(start)
    raise WaltError(f"--start {start!r}: use a frame index, 'center' or 'random'")


def _pad_time(video, frames: int):
    """Repeat the last frame of a (3, T, H, W) clip up to `frames` frames (images in a grid)."""
    import torch

    if video.shape[1] == frames:
        return video
    tail = video[:, -1:].expand(-1, frames - video.shape[1], -1, -1)
    return torch.cat([video, tail], dim=1)


def clip_metrics(original, reconstruction) -> tuple[float, float]:
    """PSNR (dB) and SSIM of one clip, both (3, T, H, W) in [-1, 1], measured on [0, 1].

    PSNR is over the whole clip (one MSE over all frames and pixels); SSIM (Gaussian window 11,
    sigma 1.5) is the mean over frames. Both from torchmetrics.
    """
    from einops import rearrange
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    target = rearrange((original.float() + 1) / 2, "c t h w -> t c h w")
    preds = rearrange((reconstruction.float().clamp(-1, 1) + 1) / 2, "c t h w -> t c h w")
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0)
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0)
    return float(psnr), float(ssim)


def _means(rows: list[dict]) -> dict[str, float]:
    return dict(
        mean_psnr=sum(r["psnr"] for r in rows) / len(rows),
        mean_ssim=sum(r["ssim"] for r in rows) / len(rows),
    )


def _metrics_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="tokenizer reconstruction")
    for name, justify in (
        ("clip", "left"),
        ("frames", "right"),
        ("latent c×t×h×w", "right"),
        ("PSNR (dB)", "right"),
        ("SSIM", "right"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        table.add_row(
            Path(r["clip"]).name,
            str(r["frames"]),
            "×".join(map(str, r["latent"])),
            f"{r['psnr']:.2f}",
            f"{r['ssim']:.4f}",
        )
    if len(rows) > 1:
        m = _means(rows)
        table.add_section()
        table.add_row("mean", "", "", f"{m['mean_psnr']:.2f}", f"{m['mean_ssim']:.4f}")
    return table
