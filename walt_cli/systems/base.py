"""`walt train-base`: the base latent transformer's training system [P §3-4, SPEC_WALT.md §2-4].

The LightningModule wires, and computes nothing of its own: the W.A.L.T denoiser
(models/transformer.py), the v-prediction loss with self-conditioning, frame-prediction
conditioning and condition dropout (diffusion/losses.py), an EMA of the weights, AdamW or
Adafactor with warmup + cosine, gradient clipping and the non-finite-loss guard. Mixed precision
and the distribution strategy come from the recipe's `trainer` section through Lightning.

Data: latent shards written by `walt tokenize encode` (runs/<name>/latents/, normalised with
their stats.json), or pixels encoded on the fly by the frozen tokenizer (`base.latents: online`,
statistics measured on the first `stats_batches` batches). Packed images (is_image) and videos
share batches at `data.image_ratio`; class labels and precomputed text embeddings (L, D) from
the shards become the `Conditioning`.

Outputs in `runs/<name>/base/`: last.ckpt (Lightning state: weights, EMA, optimizer, scheduler,
step, latent statistics), base.safetensors (EMA weights + config + latent statistics, exported at
every checkpoint), metrics.csv, previews/step-XXXXXXX.mp4 (+ .json naming what each tile shows).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.runio import write_text
from walt_cli.systems.common import (
    DiffusionSystem,
    build_network,
    check_text_states,
    section_kwargs,
    stage_fps,
)

log = logging.getLogger("walt.base")

BASE_FILE = "base.safetensors"
STATS_FILE = "latent_stats.json"  # online encoding: the statistics measured at the start
ONLINE = "online"


# ---------------------------------------------------------------------------------------------
# Latent batches


def collate_latents(items: list[dict]) -> dict:
    """Batch `LatentShards` items: latent (B, c, T, h, w), label (B,) or (B, T) where a pack of
    images carries one label per frame, is_image (B,), captions, and text (B, L, D) or
    (B, T, L, D) + text_mask when the shards hold embeddings."""
    z = torch.stack([it["latent"] for it in items]).float()
    frames = z.shape[2]
    per_frame = any(isinstance(it["label"], list) for it in items)
    if per_frame:
        labels = torch.tensor(
            [
                it["label"] if isinstance(it["label"], list) else [it["label"]] * frames
                for it in items
            ]
        )
    else:
        labels = torch.tensor([int(it["label"]) for it in items])
    batch = {
        "latent": z,
        "label": labels,
        "is_image": torch.tensor([bool(it.get("is_image", False)) for it in items]),
        "caption": [it["caption"] for it in items],
    }
    if all("lowres" in it for it in items):  # SR pairs: the low-res latents (B, c, T, h/f, w/f)
        batch["lowres"] = torch.stack([it["lowres"] for it in items]).float()
    with_text = ["text" in it for it in items]
    if any(with_text):
        if not all(with_text):
            raise WaltError("some latent shards hold text embeddings and some do not; re-encode")
        texts = [it["text"].float() for it in items]
        masks = [it["text_mask"].bool() for it in items]
        if any(t.ndim == 3 for t in texts):  # packs carry a caption per frame: broadcast videos
            texts = [t if t.ndim == 3 else t.expand(frames, *t.shape) for t in texts]
            masks = [m if m.ndim == 2 else m.expand(frames, *m.shape) for m in masks]
        batch["text"], batch["text_mask"] = torch.stack(texts), torch.stack(masks)
    return batch


def joint_sampler(is_image: list[bool], image_ratio: float, *, num_samples: int, seed: int):
    """Draws packs of images with probability `image_ratio` and videos otherwise, whatever their
    counts in the shards (None: a plain shuffle does, the data being videos only).

    Weighted draws with replacement (`ResumableSampler`: sharded over the ranks, resumable).
    """
    from walt_cli.systems.rng import ResumableSampler

    n_img = sum(is_image)
    n_vid = len(is_image) - n_img
    if image_ratio == 0 and n_img == 0:
        return None
    if image_ratio > 0 and n_img == 0:
        raise WaltError(
            f"data.image_ratio is {image_ratio} but the latents hold no packed images; encode "
            "with data.images set (or set data.image_ratio=0)"
        )
    if image_ratio < 1 and n_vid == 0:
        raise WaltError(
            f"data.image_ratio is {image_ratio} but the latents hold only packed images; set "
            "data.image_ratio=1"
        )
    weights = torch.tensor(
        [image_ratio / n_img if img else (1 - image_ratio) / max(n_vid, 1) for img in is_image],
        dtype=torch.double,
    )
    return ResumableSampler(len(is_image), seed=seed, weights=weights, num_samples=num_samples)


# ---------------------------------------------------------------------------------------------
# Previews


@dataclass
class PreviewSpec:
    """What the previews show: `mode` is class (a few evenly spaced classes), frames (real clips
    continued from their first `cond_frames` latent frames), text (the captions of real clips)
    or unconditional. `batch` holds the real items (collated, CPU) the conditions come from."""

    mode: str
    batch: dict
    labels: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    cond_frames: int = 0
    seed: int = 0


def preview_mode(num_classes: int, text_dim: int | None, p_frame_pred: float) -> str:
    if p_frame_pred > 0:
        return "frames"
    if num_classes:
        return "class"
    if text_dim:
        return "text"
    return "unconditional"


# ---------------------------------------------------------------------------------------------
# The system


class BaseSystem(DiffusionSystem):
    """Trains a `WALT` denoiser on normalised latents (see the module docstring).

    Args mirror the recipe's `base` section (walt_cli.config.BaseConfig); the shared ones are
    `DiffusionSystem`'s. `latent_mean` and `latent_std` (c,) normalise the latents
    (z - mean) / std and travel in the checkpoint; `tokenizer` (frozen, not saved) encodes pixel
    batches online and decodes previews.
    """

    export_file = BASE_FILE

    def __init__(
        self,
        net: WALT,
        *,
        p_frame_pred: float = 0.0,
        num_cond_frames: tuple[int, ...] = (1, 2),
        preview: PreviewSpec | None = None,
        online: bool = False,
        **shared: Any,
    ) -> None:
        super().__init__(net, **shared)
        self.p_frame_pred = p_frame_pred
        self.num_cond_frames = tuple(int(k) for k in num_cond_frames)
        self.preview = preview
        self.online = online
        if online and self.tokenizer is None:
            raise WaltError("online encoding needs the tokenizer")

    # ---------------------------------------------------------------------------------------
    # Batches -> normalised latents and conditioning

    def prepare(self, batch: dict) -> tuple[Tensor, Conditioning]:
        """Normalised latents z0 (B, c, T, h, w) and their `Conditioning`."""
        if self.online:
            from walt_cli.systems.encode import encode_batch

            with torch.no_grad():
                z = encode_batch(
                    self.tokenizer, batch["video"], batch["is_image"], batch.get("frames")
                )
        else:
            z = batch["latent"]
        return self.normalize(z), self.conditioning(batch)

    def compute_loss(self, batch: dict):
        z0, cond = self.prepare(batch)
        out = self.diffusion_loss(
            z0, cond, p_frame_pred=self.p_frame_pred, num_cond_frames=self.num_cond_frames
        )
        return out, {
            "train/video_clips": float((~cond.is_image).sum()),
            "train/image_packs": float(cond.is_image.sum()),
            "train/frame_pred": float(out.frame_mask.any(1).sum()),
        }

    def wants_preview(self) -> bool:
        return self.preview is not None and bool(self.preview_every)

    # Previews and export

    def pipeline(self):
        """The generation pipeline (walt_cli.pipelines) over the EMA model and the tokenizer:
        previews sample through the same path as `walt sample`."""
        from walt_cli.pipelines import Pipeline, Stage

        net = self.model
        f = self.tokenizer.spatial_factor
        h, w = net.config["latent_size"][1:]
        stage = Stage(
            name="base",
            net=net,
            mean=self.latent_mean,
            std=self.latent_std,
            resolution=(h * f, w * f),
            frame_channels=self.p_frame_pred > 0,
        )
        return Pipeline(self.tokenizer, [stage], schedule=self.schedule, batch_invariant=False)

    @torch.no_grad()
    def generate(self, spec: PreviewSpec) -> tuple[Tensor, Tensor | None]:
        """DDIM samples of the preview spec through the pipeline, decoded: (videos
        (N, 3, T, H, W) in [-1, 1], the real clips they continue (frames mode) or None)."""
        net = self.model
        was_training = net.training
        net.eval()
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in spec.batch.items()}
        z0, cond = self.prepare(batch)
        n = z0.shape[0]
        pipe = self.pipeline()
        labels = text = cond_latents = None
        if spec.mode == "class":
            labels = list(spec.labels)
        elif net.num_classes and spec.mode != "unconditional":
            labels = cond.labels.reshape(n, -1)[:, 0].tolist()
        if net.text_dim and spec.mode != "unconditional":
            text = (cond.text, cond.text_mask)
        if spec.mode == "frames":
            cond_latents = z0[:, :, : spec.cond_frames]
        videos = pipe.generate(
            seeds=[spec.seed + i for i in range(n)],  # the same noise at every preview
            labels=labels,
            text=text,
            steps=self.preview_steps,
            guidance=1.0 if self.guidance_scale is None else self.guidance_scale,
            cond_latents=cond_latents,
            output="float",
        )
        net.train(was_training)
        real = pipe.decode(self.denormalize(z0)).cpu() if cond_latents is not None else None
        return videos, real

    def write_preview(self) -> Path | None:
        """previews/step-XXXXXXX.mp4 (.png for images) and a .json saying what each tile is."""
        from walt_cli.data.video import tile_videos, write_video

        spec = self.preview
        videos, real = self.generate(spec)
        if self._trainer is not None and not self.trainer.is_global_zero:  # FSDP: rank zero writes
            return None
        if real is not None:  # frame prediction: each real clip beside its continuation
            tiles = torch.stack([v for pair in zip(real, videos, strict=True) for v in pair])
            ncols = 2
        else:
            tiles, ncols = videos, min(len(videos), 4)
        step = int(self.step)
        suffix = ".png" if videos.shape[2] == 1 else ".mp4"
        out = self.stage_dir / "previews" / f"step-{step:07d}{suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(out, tile_videos(tiles, ncols=ncols), fps=self.fps)
        if spec.mode == "class":
            shows = [
                {"label": lab, **({"class": name} if name else {})}
                for lab, name in zip(
                    spec.labels, spec.names or [""] * len(spec.labels), strict=True
                )
            ]
        elif spec.mode == "unconditional":
            shows = [{} for _ in range(len(videos))]
        else:
            shows = [{"caption": c} for c in spec.batch["caption"]]
        about = {
            "step": step,
            "mode": spec.mode,
            "weights": "ema" if self.ema is not None else "raw",
            "ddim_steps": self.preview_steps,
            "guidance_scale": self.guidance_scale,
            "layout": "pairs: real clip | continuation"
            if real is not None
            else "tiles in row-major order",
            "cond_latent_frames": spec.cond_frames if real is not None else 0,
            "tiles": shows,
        }
        out.with_suffix(".json").write_text(json.dumps(about, indent=2) + "\n")
        log.info("step %d: preview %s", step, out)
        return out

    def export_extra(self) -> dict[str, Any]:
        # What the pipeline needs to know of training: frame conditioning feeds the [m * z, m]
        # channels only to a model that learned them.
        return {
            "p_frame_pred": self.p_frame_pred,
            "num_cond_frames": list(self.num_cond_frames),
            "p_cond_drop": self.p_cond_drop,
        }


# ---------------------------------------------------------------------------------------------
# Building from a recipe


def latent_root(recipe) -> Path:
    """`base.latents` or runs/<name>/latents (holding train/ and val/)."""
    return Path(recipe.base.latents) if recipe.base.latents else Path(recipe.run_dir) / "latents"


def init_weights(net: WALT, path: Path) -> None:
    """Load a trained base's weights into `net`, moving them to its latent grid and windows
    first (`resize_grid`: position embeddings and relative bias tables interpolated) [P §5.3]."""
    from walt_cli.models.checkpoint import load_state_strict

    if not path.is_file():
        raise WaltError(
            f"base.init_from: file not found: {path} (train the model it names first, or set "
            "base.init_from=null)"
        )
    source = WALT.from_checkpoint(path)
    source.resize_grid(
        tuple(net.config["latent_size"]),
        spatial_window=tuple(net.config["spatial_window"]),
        st_window=tuple(net.config["st_window"]),
    )
    source_config = {k: v for k, v in source.config.items()}
    if source_config != net.config:
        differ = sorted(k for k in net.config if source_config.get(k) != net.config[k])
        raise WaltError(f"base.init_from: {path} is another architecture (differs in {differ})")
    load_state_strict(net, source.state_dict(), path)


def check_latent_size(recipe, latent_size: tuple[int, ...], folder: Path) -> None:
    """The shards' latent grid (T, h, w) is what the recipe's clips encode to."""
    from walt_cli.config import SPATIAL_FACTOR, TEMPORAL_FACTOR

    d = recipe.data
    want = (
        1 + (d.num_frames - 1) // TEMPORAL_FACTOR,
        d.resolution[0] // SPATIAL_FACTOR,
        d.resolution[1] // SPATIAL_FACTOR,
    )
    if tuple(latent_size) != want:
        raise WaltError(
            f"{folder}: latents of {tuple(latent_size)} (T, h, w), but data.num_frames="
            f"{d.num_frames} and data.resolution={list(d.resolution)} give {want}; re-encode or "
            "set the data section to what was encoded"
        )


def measure_stats(tok, loader, batches: int, tokenizer_hash: str, device) -> dict:
    """Per-channel latent mean/std over the first `batches` batches (online encoding)."""
    from walt_cli.data.latents import channel_moments, combine_stats
    from walt_cli.systems.encode import encode_batch

    infos = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        with torch.no_grad():
            z = encode_batch(
                tok, batch["video"].to(device), batch["is_image"].to(device), batch["frames"]
            )
        infos.append(channel_moments(z, rows=[{}] * z.shape[0], tokenizer=tokenizer_hash))
    return combine_stats(infos)


def _preview_spec(recipe, items: list[dict], collate, num_classes: int) -> PreviewSpec | None:
    b = recipe.base
    if not b.preview_every:
        return None
    mode = preview_mode(num_classes, b.text_dim, b.p_frame_pred)
    videos = [it for it in items if not it.get("is_image")] or items
    batch = collate(videos[: b.preview_samples])
    spec = PreviewSpec(mode=mode, batch=batch, seed=recipe.trainer.seed)
    if mode == "class":
        n = min(b.preview_samples, num_classes)
        spec.batch = collate((videos * n)[:n])
        spec.labels = torch.linspace(0, num_classes - 1, n).round().long().tolist()
        if recipe.data.source == "shapes":
            from walt_cli.data.shapes import class_names

            names = class_names()
            spec.names = [names[k] if k < len(names) else "" for k in spec.labels]
    elif mode == "frames":
        frames = batch["latent"].shape[2] if "latent" in batch else None
        k = max(b.num_cond_frames)
        spec.cond_frames = k if frames is None else min(k, frames - 1)
    return spec


def shard_loader(recipe, train_set, batch_size: int):
    """(DataLoader over latent shards, a one-line description): shuffled, or drawing packs of
    images at `data.image_ratio` (`joint_sampler`), batched by `collate_latents`."""
    from torch.utils.data import DataLoader

    from walt_cli.systems.rng import ResumableSampler

    t, d = recipe.trainer, recipe.data
    is_image = [bool(r.get("is_image", False)) for r in train_set.rows]
    sampler = joint_sampler(
        is_image, d.image_ratio, num_samples=len(train_set), seed=t.seed
    ) or ResumableSampler(len(train_set), seed=t.seed)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(t.seed),
        drop_last=len(train_set) >= batch_size,
        num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0,
        collate_fn=collate_latents,
    )
    n_img = sum(is_image)
    source = (
        f"{train_set.folder}: {len(train_set) - n_img} videos + {n_img} image packs"
        f", image share {d.image_ratio:g}"
    )
    return loader, source


def preview_source(root: Path, train_set):
    """The encoded val split under `root` when there is one, else the training shards."""
    from walt_cli.data.latents import LatentShards

    val_dir = root / "val"
    return LatentShards(val_dir) if (val_dir / "index.jsonl").is_file() else train_set


def _first_items(dataset, n: int) -> list[dict]:
    items = []
    for i in range(min(len(dataset), 4 * n)):
        item = dataset[i]
        if item is not None:
            items.append(item)
        if sum(not it.get("is_image") for it in items) >= n:
            break
    return items


def train_base(
    recipe,
    *,
    progress: bool = True,
    callbacks: list | None = None,
    console=None,
) -> dict[str, Any]:
    """Train (or resume) the recipe's base model; returns a summary dict.

    Rerunning resumes from `runs/<name>/base/last.ckpt` (weights, EMA, optimizer, scheduler,
    step counter, guard state, latent statistics).
    """

    from walt_cli.config import save_recipe
    from walt_cli.console import resolve_device
    from walt_cli.data.latents import LatentShards, encoder_key, encoder_keys, load_stats
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.systems.common import data_loaders, last_checkpoint, run_stage
    from walt_cli.systems.encode import tokenizer_path

    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    b, d, t = recipe.base, recipe.data, recipe.trainer
    stage_dir = Path(recipe.run_dir) / "base"
    online = b.latents == ONLINE
    if online and b.text_dim:
        raise WaltError(
            "base.latents=online encodes pixels and has no text embeddings; text conditioning "
            "reads them from latent shards"
        )
    resume = last_checkpoint(stage_dir)
    batch_size = b.batch_size or d.batch_size

    tok = None
    if online or b.preview_every:
        try:
            tok_file = tokenizer_path(recipe)
        except WaltError as err:
            hint = (
                "" if online else " (previews decode with it; base.preview_every=0 turns them off)"
            )
            raise WaltError(f"{err}{hint}") from None
        tok = CausalVideoTokenizer.from_checkpoint(tok_file).eval()

    if online:
        tok_hash = encoder_key(tok_file)
        train_loader, _, train_set, val_set = data_loaders(
            recipe, shuffle_seed=t.seed, batch_size=batch_size
        )
        stats_file = stage_dir / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
        if stats is None or stats.get("tokenizer") != tok_hash:
            if console is not None:
                console.print(f"measuring latent statistics on {b.stats_batches} batches ...")
            dev = resolve_device("cpu" if t.accelerator == "cpu" else "auto")
            stats = measure_stats(tok.to(dev), train_loader, b.stats_batches, tok_hash, dev)
            tok = tok.cpu()
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_text(stats_file, json.dumps(stats, indent=2) + "\n")
        latent_size = (
            tok.num_latent_frames(d.num_frames),
            d.resolution[0] // tok.spatial_factor,
            d.resolution[1] // tok.spatial_factor,
        )
        channels = tok.latent_channels
        source = f"{d.source} pixels, encoded online ({len(train_set)} clips)"
        from walt_cli.data.datasets import collate as collate_items

        preview_items = _first_items(
            val_set if val_set is not None else train_set, b.preview_samples
        )
    else:
        root = latent_root(recipe)
        train_set = LatentShards(root / "train")
        keys = encoder_keys(tok_file) if tok is not None else None
        stats = load_stats(root / "train", tokenizer=keys)
        tok_hash = stats["tokenizer"]
        first = train_set[0]["latent"]
        channels, latent_size = first.shape[0], tuple(first.shape[1:])
        check_latent_size(recipe, latent_size, root / "train")
        train_loader, source = shard_loader(recipe, train_set, batch_size)
        preview_items = _first_items(preview_source(root, train_set), b.preview_samples)
        collate_items = collate_latents
        if b.num_classes:
            top = max(
                max(r["label"]) if isinstance(r["label"], list) else r["label"]
                for r in train_set.rows
            )
            if top >= b.num_classes:
                raise WaltError(
                    f"the latents have class label {top} but base.num_classes is {b.num_classes}"
                )

    text_encoder = check_text_states(recipe, b, stats, "base")
    net = build_network(b, latent_size, channels)
    if b.init_from and resume is None:
        init_weights(net, Path(b.init_from))
    spec = _preview_spec(recipe, preview_items, collate_items, b.num_classes)
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe)
    system = BaseSystem(
        net,
        stage_dir=str(stage_dir),
        latent_mean=stats["mean"],
        latent_std=stats["std"],
        tokenizer_hash=tok_hash,
        **section_kwargs(b, BaseSystem),
        **section_kwargs(b, DiffusionSystem),
        log_every=t.log_every,
        preview=spec,
        tokenizer=tok,
        online=online,
        fps=stage_fps(d),
        text_encoder=text_encoder,
    )
    return run_stage(
        recipe,
        system,
        train_loader,
        stage_dir=stage_dir,
        resume=resume,
        title=f"walt train-base: {recipe.name}",
        section=b,
        table=_table(recipe, latent_size, channels, stats, source, resume, spec),
        callbacks=callbacks,
        progress=progress,
        console=console,
    )


def _table(recipe, latent_size, channels, stats, source, resume, spec) -> dict:
    """What the start-up table says about this base run (`common.denoiser_rows`)."""
    b = recipe.base
    conditions = [
        f"{b.num_classes} classes" if b.num_classes else "",
        f"text (D={b.text_dim})" if b.text_dim else "",
        f"frame prediction p={b.p_frame_pred:g} on {list(b.num_cond_frames)} latent frames"
        if b.p_frame_pred
        else "",
        f"condition dropout {b.p_cond_drop:g}" if b.p_cond_drop else "",
        f"self-conditioning {b.p_self_cond:g}",
    ]
    previews = (
        f"every {b.preview_every} steps: {spec.mode}, {b.preview_steps} DDIM steps"
        if spec
        else "off"
    )
    return dict(
        latent_size=latent_size,
        channels=channels,
        stats=stats,
        source=source,
        conditions=conditions,
        resume=resume,
        previews=previews,
        output=Path(recipe.run_dir) / "base",
    )
