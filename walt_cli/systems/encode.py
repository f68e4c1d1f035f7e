"""`walt tokenize encode`: a recipe's data set -> latent shards + per-channel statistics.

Deterministic (no augmentation: centred crops and starts), unreadable files dropped (never
duplicated), resumable per shard (walt_cli/data/latents.py), with the EMA tokenizer the run
trained (or `tokenizer.checkpoint`). With a `text_encoder` in the recipe, each clip's caption
(each image's, for packs) is stored as text states beside its latent, with the encoder's hash.

`--sr N` encodes the training pairs of SR stage N into runs/<name>/latents/sr<N>/: each clip at
the stage's resolution and, as `lowres`, the same clip downsampled (antialiased) by the stage's
factor, both through the same tokenizer (the paper's z and z_lr). Pairs are encoded once here
rather than at every training step: an SR step would otherwise run the tokenizer's encoder on
two resolutions of every clip, which costs more than the SR step itself at the paper's sizes.
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


def downsample(video: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 3, T, H/f, W/f): each frame resized with an
    antialiased bicubic filter (what a camera at the lower resolution would see)."""
    import torch.nn.functional as F

    b, _, t, h, w = video.shape
    frames = rearrange(video.float(), "b c t h w -> (b t) c h w")
    small = F.interpolate(
        frames, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False
    )
    return rearrange(small.clamp(-1, 1), "(b t) c h w -> b c t h w", b=b).to(video.dtype)


def caption_states(text_encoder, captions: list, is_image: torch.Tensor, frames: int):
    """Text states of a batch's captions: (B, L, D) + (B, L) for videos, or (B, T, L, D) +
    (B, T, L) when the batch holds packs of images (one caption per image, videos' repeated)."""
    if not bool(is_image.any()):
        return text_encoder.encode([str(c) for c in captions])
    flat = []
    for caption in captions:
        per_image = list(caption) if isinstance(caption, (list, tuple)) else [caption] * frames
        flat += [str(c) for c in (per_image + [""] * frames)[:frames]]  # padded images: null
    states, mask = text_encoder.encode(flat)  # (B*T, L, D)
    b = len(captions)
    return (
        rearrange(states, "(b t) l d -> b t l d", b=b),
        rearrange(mask, "(b t) l -> b t l", b=b),
    )


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
    sr: int = 0,
) -> dict[str, Any]:
    """Encode the recipe's `split` into `runs/<name>/latents/<split>/` (SR stage `sr` > 0:
    latents/sr<N>/<split>/ with low-res pairs); returns a summary."""
    from torch.utils.data import DataLoader, Subset

    from walt_cli.config import save_recipe
    from walt_cli.data.datasets import build_dataset
    from walt_cli.data.latents import encoder_key, shard_path, write_latents

    if split not in ("train", "val"):
        raise WaltError(f"split must be train or val, got {split!r}")
    data, factor = stage_data(recipe, sr)
    path = tokenizer_path(recipe)
    # Keyed by the encoder, not the file: a decoder fine-tuned on its frozen encoder encodes the
    # same latents as the file it came from, and the stages trained on them fit either decoder.
    digest = encoder_key(path)
    from walt_cli.console import resolve_device

    dev = resolve_device(device)
    tok = CausalVideoTokenizer.from_checkpoint(path).to(dev).eval()
    text_encoder = load_text_encoder(recipe)
    if text_encoder is not None:
        text_encoder.to(dev)
    dataset = build_dataset(data, split, augment=False, drop_unreadable=True)
    if split == "train":  # K random windows and flips per video; val keeps one centred clip
        from walt_cli.data.clips import clips_per_video

        dataset = clips_per_video(dataset, data.clips_per_video, recipe.trainer.seed)
    k = recipe.tokenizer
    folder = latent_folder(recipe, sr) / split
    save_recipe(recipe)
    n_items = len(dataset)
    n_shards = -(-n_items // k.shard_size)
    done_before = 0
    for s in range(n_shards):
        if shard_path(folder, s).is_file():
            done_before += 1
    if console is not None:
        console.print(
            f"encoding {n_items} {split} clips of {data.num_frames}x"
            f"{'x'.join(map(str, data.resolution))} with {path} (hash {digest}) into "
            f"{n_shards} shards of {k.shard_size} at {folder}"
            + (f", with low-res pairs at 1/{factor}" if factor else "")
            + (
                f", captions through {text_encoder.spec.name} (hash {text_encoder.hash})"
                if text_encoder is not None
                else ""
            )
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

    def encode(batch: dict) -> dict[str, torch.Tensor]:
        video, is_image = batch["video"].to(dev), batch["is_image"].to(dev)
        z = encode_batch(tok, video, is_image, batch["frames"])
        out = {"latents": z.float().cpu()}
        if factor:
            low = encode_batch(tok, downsample(video, factor), is_image, batch["frames"])
            out["lowres"] = low.float().cpu()
        if text_encoder is not None:
            states, mask = caption_states(text_encoder, batch["caption"], is_image, z.shape[2])
            out["text"], out["text_mask"] = states.cpu(), mask.cpu()
        return out

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
            text_encoder=text_encoder.hash if text_encoder is not None else None,
            lowres=bool(factor),
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
        "text_encoder": text_encoder.hash if text_encoder is not None else None,
        "stats": stats,
    }


def latent_folder(recipe, sr: int = 0) -> Path:
    """Where `tokenize encode` writes a stage's shards: runs/<name>/latents (the base) or
    runs/<name>/latents/sr<N>, each holding train/ and val/."""
    root = Path(recipe.run_dir) / "latents"
    return root if sr == 0 else root / f"sr{sr}"


def stage_data(recipe, sr: int = 0):
    """(data section at the stage's resolution, its SR factor or 0 for the base)."""
    if sr == 0:
        return recipe.data, 0
    check_stage(recipe, sr, flag="--sr")
    from omegaconf import OmegaConf

    stage = recipe.sr[sr - 1]
    data = OmegaConf.merge(recipe.data, {"resolution": list(stage.resolution)})
    return data, int(stage.factor)


def check_stage(recipe, stage: int, flag: str = "--stage") -> None:
    """One line when the recipe has no SR stage `stage` (1-based) or its resolutions do not
    chain (each stage's is the previous one's times its factor)."""
    n = len(recipe.sr)
    if not 1 <= stage <= n:
        have = f"stages 1..{n}" if n else "no sr stages"
        raise WaltError(f"{flag} {stage}: the recipe has {have} (its `sr` list)")
    from walt_cli.config import check_sr_chain

    check_sr_chain(recipe, stage)


def load_text_encoder(recipe):
    """The recipe's text encoder (`text_encoder` section), or None for name=none."""
    from walt_cli.models.text import TextEncoder

    e = recipe.text_encoder
    return TextEncoder.from_spec(
        name=e.name, path=e.path, max_length=int(e.max_length), dtype=e.dtype
    )
