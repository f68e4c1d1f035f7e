"""`walt tokenize encode`: a recipe's data set -> latent shards + per-channel statistics.

Deterministic (no augmentation: centred crops and starts), unreadable files dropped (never
duplicated), resumable per shard (walt_cli/data/latents.py), with the EMA tokenizer the run
trained (or `tokenizer.checkpoint`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from walt_cli.errors import WaltError
from walt_cli.models.tokenizer import CausalVideoTokenizer

TOKENIZER_FILE = "tokenizer.safetensors"


def tokenizer_path(recipe) -> Path:
    """`tokenizer.checkpoint` if set, else `runs/<name>/tokenizer/tokenizer.safetensors`."""
    if recipe.tokenizer.checkpoint:
        p = Path(recipe.tokenizer.checkpoint)
        if not p.is_file():
            raise WaltError(f"tokenizer.checkpoint: file not found: {p}")
        return p
    p = Path(recipe.run_dir) / "tokenizer" / TOKENIZER_FILE
    if not p.is_file():
        raise WaltError(
            f"no tokenizer weights: {p} does not exist; run `walt tokenize train` first or set "
            "tokenizer.checkpoint=PATH"
        )
    return p


@torch.no_grad()
def encode_batch(
    tok: CausalVideoTokenizer,
    video: torch.Tensor,
    is_image: torch.Tensor,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents of a batch, video (B, 3, T, H, W) -> (B, c, t, h, w).

    Videos are encoded as clips (t = 1 + (T - 1) / f_t); packs of N independent images (padded
    to T, `frames` (B,) the real counts) frame by frame (t = N), each image as a 1-frame video.
    A batch mixing both must give one latent shape.
    """
    from walt_cli.data.datasets import pack_frames

    out: list[torch.Tensor | None] = [None] * video.shape[0]
    vid = (~is_image).nonzero().flatten().tolist()
    img = is_image.nonzero().flatten().tolist()
    if vid:
        z = tok.encode(video[vid])  # (Bv, c, t, h, w)
        for j, i in enumerate(vid):
            out[i] = z[j]
    if img:
        packs = video[img][
            :, :, : pack_frames(is_image, frames, video.shape[2])
        ]  # (Bi, 3, N, H, W)
        z = tok.encode(rearrange(packs, "b c t h w -> (b t) c 1 h w"))  # (Bi*T, c, 1, h, w)
        z = rearrange(z, "(b t) c 1 h w -> b c t h w", b=len(img))
        for j, i in enumerate(img):
            out[i] = z[j]
    shapes = {tuple(o.shape) for o in out}
    if len(shapes) != 1:
        raise WaltError(
            f"a batch mixes latent shapes {sorted(shapes)}: packed images need as many images as "
            "a video has latent frames (data.images_per_sample)"
        )
    return torch.stack(out)  # type: ignore[arg-type]


def _collate_readable(items: list[dict | None]) -> dict | None:
    from walt_cli.data.datasets import collate

    items = [it for it in items if it is not None]
    return collate(items) if items else None


def encode_dataset(
    recipe,
    *,
    split: str = "train",
    device: str = "auto",
    progress: bool = True,
    console=None,
) -> dict[str, Any]:
    """Encode the recipe's `split` into `runs/<name>/latents/<split>/`; returns a summary."""
    from torch.utils.data import DataLoader, Subset

    from walt_cli.config import save_recipe
    from walt_cli.data.datasets import build_dataset
    from walt_cli.data.latents import file_hash, shard_path, write_latents

    if split not in ("train", "val"):
        raise WaltError(f"split must be train or val, got {split!r}")
    path = tokenizer_path(recipe)
    digest = file_hash(path)
    from walt_cli.console import resolve_device

    dev = resolve_device(device)
    tok = CausalVideoTokenizer.from_checkpoint(path).to(dev).eval()
    dataset = build_dataset(recipe.data, split, augment=False, drop_unreadable=True)
    if split == "train":  # K random windows and flips per video; val keeps one centred clip
        from walt_cli.data.clips import clips_per_video

        dataset = clips_per_video(dataset, recipe.data.clips_per_video, recipe.trainer.seed)
    k = recipe.tokenizer
    folder = Path(recipe.run_dir) / "latents" / split
    save_recipe(recipe)
    n_items = len(dataset)
    n_shards = -(-n_items // k.shard_size)
    done_before = 0
    for s in range(n_shards):
        if shard_path(folder, s).is_file():
            done_before += 1
    if console is not None:
        console.print(
            f"encoding {n_items} {split} clips of {recipe.data.num_frames}x"
            f"{'x'.join(map(str, recipe.data.resolution))} with {path} (hash {digest}) into "
            f"{n_shards} shards of {k.shard_size} at {folder}"
            + (
                f"; {done_before} shard files exist (reused if from this tokenizer)"
                if done_before
                else ""
            )
        )

    def batches(start: int, stop: int):
        loader = DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=k.encode_batch_size,
            shuffle=False,
            num_workers=recipe.trainer.num_workers,
            collate_fn=_collate_readable,
        )
        yield from loader

    def encode(batch: dict) -> torch.Tensor:
        z = encode_batch(tok, batch["video"].to(dev), batch["is_image"].to(dev), batch["frames"])
        return z.float().cpu()

    from walt_cli.console import progress as progress_bar

    bar = progress_bar(rate=True, disable=not progress)
    t0 = time.perf_counter()
    encoded = 0
    skipped_shards = 0
    with bar:
        task = bar.add_task(f"encode {split}", total=n_items, rate="")

        def on_batch(n: int) -> None:
            nonlocal encoded
            encoded += n
            rate = encoded / max(time.perf_counter() - t0, 1e-6)
            bar.update(task, advance=n, rate=f"{rate:.1f} clips/s")

        def on_shard(s: int, total: int, skipped: bool) -> None:
            nonlocal skipped_shards
            if skipped:
                skipped_shards += 1
                start, stop = s * k.shard_size, min((s + 1) * k.shard_size, n_items)
                bar.update(task, advance=stop - start)

        stats = write_latents(
            folder,
            encode,
            batches,
            n_items,
            shard_size=k.shard_size,
            tokenizer=digest,
            on_shard=on_shard,
            on_batch=on_batch,
        )
    elapsed = time.perf_counter() - t0
    return {
        "folder": str(folder),
        "clips": stats["clips"],
        "shards": n_shards,
        "skipped_shards": skipped_shards,
        "encoded": encoded,
        "dropped_files": len(getattr(dataset, "skipped", {}) or {}),
        "clips_per_s": encoded / elapsed if encoded else 0.0,
        "tokenizer": digest,
        "stats": stats,
    }
