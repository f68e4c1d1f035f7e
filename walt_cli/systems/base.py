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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from walt_cli.diffusion.inputs import first_frames_mask
from walt_cli.diffusion.losses import diffusion_loss
from walt_cli.diffusion.samplers import sample
from walt_cli.diffusion.schedules import make_schedule
from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.runio import write_text
from walt_cli.systems.common import NonFiniteGuard, ema_model, section_kwargs, warmup_cosine

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


class BaseSystem(L.LightningModule):
    """Trains a `WALT` denoiser on normalised latents (see the module docstring).

    Args mirror the recipe's `base` section (walt_cli.config.BaseConfig). `latent_mean` and
    `latent_std` (c,) normalise the latents (z - mean) / std and travel in the checkpoint;
    `tokenizer` (frozen, not saved) encodes pixel batches online and decodes previews.
    """

    def __init__(
        self,
        net: WALT,
        *,
        stage_dir: str,
        latent_mean: list[float],
        latent_std: list[float],
        tokenizer_hash: str,
        max_steps: int,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        warmup_steps: int = 5000,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        ema: bool = True,
        ema_decay: float = 0.9999,
        grad_clip: float = 1.0,
        p_self_cond: float = 0.9,
        p_frame_pred: float = 0.0,
        num_cond_frames: tuple[int, ...] = (1, 2),
        p_cond_drop: float = 0.0,
        nan_patience: int = 10,
        log_every: int = 50,
        preview: PreviewSpec | None = None,
        preview_every: int = 0,
        preview_steps: int = 50,
        guidance_scale: float | None = None,
        tokenizer=None,
        online: bool = False,
        fps: float = 8.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.ema = ema_model(net, ema_decay) if ema else None
        self.schedule = make_schedule()  # 1000 linear betas, zero terminal SNR [P Table 8]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        std = torch.tensor(latent_std, dtype=torch.float32)
        if bool((std <= 0).any()):
            raise WaltError(f"latent std {latent_std} has a zero channel; the latents are constant")
        self.register_buffer("latent_mean", torch.tensor(latent_mean, dtype=torch.float32))
        self.register_buffer("latent_std", std)
        self.tokenizer_hash = tokenizer_hash
        self.guard = NonFiniteGuard(nan_patience)
        self.stage_dir = Path(stage_dir)
        self.max_steps, self.optimizer_name = max_steps, optimizer
        self.lr, self.warmup_steps, self.min_lr_ratio = lr, warmup_steps, min_lr_ratio
        self.betas, self.weight_decay = (float(betas[0]), float(betas[1])), weight_decay
        self.grad_clip = grad_clip
        self.p_self_cond, self.p_frame_pred = p_self_cond, p_frame_pred
        self.num_cond_frames = tuple(int(k) for k in num_cond_frames)
        self.p_cond_drop = p_cond_drop
        self.log_every = log_every
        self.preview, self.preview_every, self.preview_steps = preview, preview_every, preview_steps
        self.guidance_scale = guidance_scale
        # The frozen tokenizer is not a submodule: it stays out of checkpoints and optimizers.
        self._tokenizer = [tokenizer.eval().requires_grad_(False) if tokenizer else None]
        self.online = online
        if online and tokenizer is None:
            raise WaltError("online encoding needs the tokenizer")
        self.fps = fps
        self._clock: tuple[int, float] | None = None

    @property
    def tokenizer(self):
        return self._tokenizer[0]

    @property
    def model(self) -> WALT:
        """The weights to sample and export: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.net

    # ---------------------------------------------------------------------------------------
    # Optimizer

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.optimizer_name == "adafactor":  # without parameter scaling (systems/optim.py)
            from walt_cli.systems.optim import adafactor

            opt = adafactor(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(
                params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
            )
        sched = warmup_cosine(self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, sched)]

    # ---------------------------------------------------------------------------------------
    # Batches -> normalised latents and conditioning

    def normalize(self, z: Tensor) -> Tensor:
        """(B, c, T, h, w) tokenizer latents -> zero-mean unit-std per channel."""
        return (z.float() - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(
            1, -1, 1, 1, 1
        )

    def denormalize(self, z: Tensor) -> Tensor:
        return z.float() * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(
            1, -1, 1, 1, 1
        )

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
        z0 = self.normalize(z)
        net = self.net
        labels = None
        if net.num_classes:
            labels = batch["label"].long()
            if bool((labels >= net.num_classes).any()):
                raise WaltError(
                    f"the data has class label {int(labels.max())} but base.num_classes is "
                    f"{net.num_classes}"
                )
            labels = labels.clamp(min=Conditioning.NULL_LABEL)  # unlabelled (-1): the null class
        text = text_mask = None
        if net.text_dim:
            if "text" not in batch:
                raise WaltError(
                    "base.text_dim is set but the latents hold no text embeddings; encode "
                    "captions into the shards (or set base.text_dim=null)"
                )
            text, text_mask = batch["text"], batch["text_mask"]
        return z0, Conditioning(
            labels=labels, text=text, text_mask=text_mask, is_image=batch["is_image"]
        )

    # ---------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = int(self.step)
        if step >= self.max_steps:
            self.trainer.should_stop = True
            return None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        z0, cond = self.prepare(batch)
        out = diffusion_loss(
            self.net,
            z0,
            cond,
            self.schedule,
            p_self_cond=self.p_self_cond,
            p_frame_pred=self.p_frame_pred,
            num_cond_frames=self.num_cond_frames,
            p_cond_drop=self.p_cond_drop,
        )
        # Every rank skips together, or DDP would wait on a gradient that never comes.
        finite = self.trainer.strategy.reduce_boolean_decision(
            bool(torch.isfinite(out.loss)), all=True
        )
        if not self.guard.check(finite, step=step):
            log.warning(
                "step %d: non-finite loss, step skipped (%d in a row)", step, self.guard.in_a_row
            )
            self._write_metrics({"train/skipped": float(self.guard.skipped)}, step)
            return None
        opt.zero_grad(set_to_none=True)
        self.manual_backward(out.loss)
        step += 1
        logging_step = step % self.log_every == 0 or step == 1 or step >= self.max_steps
        grad_norm = None
        # This rank's gradient norm before clipping (not under a 16-mixed loss scaler, whose
        # gradients are still scaled here).
        if logging_step and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.net.parameters() if p.grad is not None]
            )
        if self.grad_clip > 0:
            self.clip_gradients(
                opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
        opt.step()
        sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.step += 1
        if step >= self.max_steps:
            self.trainer.should_stop = True

        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)
        self.log("step", float(step), prog_bar=True, logger=False)
        if logging_step:
            metrics = {
                "train/loss": float(out.loss.detach()),
                "train/lr": sched.get_last_lr()[0],
                "train/skipped": float(self.guard.skipped),
                "train/video_clips": float((~cond.is_image).sum()),
                "train/image_packs": float(cond.is_image.sum()),
                "train/frame_pred": float(out.frame_mask.any(1).sum()),
                "train/cond_dropped": float(out.dropped.sum()),
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            now = time.perf_counter()
            if self._clock is not None and step > self._clock[0]:
                metrics["train/steps_per_s"] = (step - self._clock[0]) / (now - self._clock[1])
            self._clock = (step, now)
            self._write_metrics(metrics, step)
        if (
            self.preview is not None
            and self.preview_every
            and (step % self.preview_every == 0 or step >= self.max_steps)
            and self.trainer.is_global_zero
        ):
            self.write_preview()
            self._clock = None  # the preview's time is not training time
        return None

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        """metrics.csv rows keyed by the system's step, flushed at once (a killed run keeps them)."""
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)
            self.logger.save()

    # ---------------------------------------------------------------------------------------
    # Previews and export

    @torch.no_grad()
    def generate(self, spec: PreviewSpec) -> tuple[Tensor, Tensor | None]:
        """DDIM samples of the preview spec, decoded: (videos (N, 3, T, H, W) in [-1, 1], the
        real clips they continue (frames mode) or None)."""
        net = self.model
        was_training = net.training
        net.eval()
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in spec.batch.items()}
        z0, cond = self.prepare(batch)
        n, _, frames = z0.shape[:3]
        cond.is_image = torch.zeros(n, dtype=torch.bool, device=self.device)
        frame_latents = frame_mask = None
        if spec.mode == "class":
            cond.labels = torch.tensor(spec.labels, device=self.device)
        elif spec.mode == "frames":
            frame_latents = z0
            frame_mask = first_frames_mask(n, frames, spec.cond_frames, device=self.device)
        elif spec.mode == "unconditional":
            cond = Conditioning(is_image=cond.is_image)
        g = torch.Generator().manual_seed(spec.seed)
        noise = torch.randn(z0.shape, generator=g).to(self.device)  # the same noise every time
        z = sample(
            net,
            noise,
            cond,
            self.schedule,
            num_steps=self.preview_steps,
            frame_latents=frame_latents,
            frame_mask=frame_mask,
            guidance_scale=self.guidance_scale,
        )
        net.train(was_training)
        decode = self.tokenizer.decode
        videos = decode(self.denormalize(z)).float().clamp(-1, 1).cpu()
        real = (
            decode(self.denormalize(z0)).float().clamp(-1, 1).cpu()
            if frame_mask is not None
            else None
        )
        return videos, real

    def write_preview(self) -> Path:
        """previews/step-XXXXXXX.mp4 (.png for images) and a .json saying what each tile is."""
        from walt_cli.data.video import tile_videos, write_video

        spec = self.preview
        videos, real = self.generate(spec)
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

    def export(self) -> Path:
        """base.safetensors: the EMA (or raw) weights, their config, and the latent statistics."""
        return self.model.save(
            self.stage_dir / BASE_FILE,
            extra={
                "step": int(self.step),
                "ema": self.ema is not None,
                "latent_stats": {
                    "mean": self.latent_mean.tolist(),
                    "std": self.latent_std.tolist(),
                    "tokenizer": self.tokenizer_hash,
                },
            },
        )

    # ---------------------------------------------------------------------------------------
    # Checkpoint extras (primitives only, so resuming loads with weights_only=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["walt_guard"] = self.guard.state_dict()
        checkpoint["walt_tokenizer"] = self.tokenizer_hash

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("walt_tokenizer")
        if saved is not None and saved != self.tokenizer_hash:
            raise WaltError(
                f"this run was trained on latents of tokenizer {saved}, these are from "
                f"{self.tokenizer_hash}; start a new run (run_dir=...) or re-encode with the old one"
            )
        if "walt_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["walt_guard"])

    def on_fit_start(self) -> None:
        if self.tokenizer is not None:
            self._tokenizer[0] = self.tokenizer.to(self.device)


# ---------------------------------------------------------------------------------------------
# Building from a recipe


def latent_root(recipe) -> Path:
    """`base.latents` or runs/<name>/latents (holding train/ and val/)."""
    return Path(recipe.base.latents) if recipe.base.latents else Path(recipe.run_dir) / "latents"


def build_network(recipe, latent_size: tuple[int, int, int], latent_channels: int) -> WALT:
    """The recipe's transformer on a latent grid (T, h, w): SW windows default to the whole
    frame and STW windows to half of it (the paper's 1x16x16 / 5x8x8 on 16x16 latents)."""
    from walt_cli.models.transformer import PRESETS

    b = recipe.base
    keys = ("depth", "width", "heads", "patch_size", "adaln_lora_rank")
    overrides: dict[str, Any] = {k: getattr(b, k) for k in keys if getattr(b, k) is not None}
    p = overrides.get("patch_size", PRESETS[b.preset].get("patch_size", 1))
    frames, h, w = latent_size
    if h % p or w % p:
        raise WaltError(f"base.patch_size {p} does not divide the {h}x{w} latent grid")
    grid = (h // p, w // p)
    spatial = tuple(b.spatial_window) if b.spatial_window else grid
    st = tuple(b.st_window) if b.st_window else (max(1, grid[0] // 2), max(1, grid[1] // 2))
    net = WALT.from_preset(
        b.preset,
        **overrides,
        latent_channels=latent_channels,
        latent_size=latent_size,
        spatial_window=spatial,
        st_window=st,
        num_classes=b.num_classes,
        text_dim=b.text_dim,
    )
    net.gradient_checkpointing = b.gradient_checkpointing
    return net


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
    from torch.utils.data import DataLoader

    from walt_cli.config import save_recipe
    from walt_cli.console import resolve_device
    from walt_cli.data.latents import LatentShards, file_hash, load_stats
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.systems.common import (
        StepCheckpoint,
        build_trainer,
        data_loaders,
        fit,
        last_checkpoint,
        startup_table,
    )
    from walt_cli.systems.encode import tokenizer_path
    from walt_cli.systems.parallel import base_needs_unused_search, find_unused_parameters
    from walt_cli.systems.rng import ResumableSampler

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

    tok = tok_hash = None
    if online or b.preview_every:
        try:
            tok_file = tokenizer_path(recipe)
        except WaltError as err:
            hint = (
                "" if online else " (previews decode with it; base.preview_every=0 turns them off)"
            )
            raise WaltError(f"{err}{hint}") from None
        tok_hash = file_hash(tok_file)
        tok = CausalVideoTokenizer.from_checkpoint(tok_file).eval()

    if online:
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
        stats = load_stats(root / "train", tokenizer=tok_hash)
        tok_hash = stats["tokenizer"]
        first = train_set[0]["latent"]
        channels, latent_size = first.shape[0], tuple(first.shape[1:])
        check_latent_size(recipe, latent_size, root / "train")
        is_image = [bool(r.get("is_image", False)) for r in train_set.rows]
        sampler = joint_sampler(
            is_image, d.image_ratio, num_samples=len(train_set), seed=t.seed
        ) or ResumableSampler(len(train_set), seed=t.seed)
        train_loader = DataLoader(
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
            f"{root / 'train'}: {len(train_set) - n_img} videos + {n_img} image packs"
            f", image share {d.image_ratio:g}"
        )
        val_dir = root / "val"
        preview_src = LatentShards(val_dir) if (val_dir / "index.jsonl").is_file() else train_set
        preview_items = _first_items(preview_src, b.preview_samples)
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

    net = build_network(recipe, latent_size, channels)
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
        log_every=t.log_every,
        preview=spec,
        tokenizer=tok,
        online=online,
        fps=float(d.fps or d.shapes.fps or 8.0),
    )
    checkpoint = StepCheckpoint(
        stage_dir,
        t.checkpoint_every,
        on_save=BaseSystem.export,  # not a lambda: `ddp_spawn` pickles callbacks
        weights=BASE_FILE,
    )
    trainer = build_trainer(
        recipe,
        stage_dir,
        val_every=None,
        val_batches=0,
        callbacks=[checkpoint, *(callbacks or [])],
        progress=progress,
    )
    find_unused_parameters(trainer, base_needs_unused_search(recipe))
    from lightning.pytorch.utilities import rank_zero_only

    main_process = rank_zero_only.rank == 0  # DDP launches one process per device: one table
    if console is not None and main_process:
        console.print(
            startup_table(
                f"walt train-base: {recipe.name}",
                _table_rows(
                    recipe, net, trainer, latent_size, channels, stats, source, resume, spec
                ),
            )
        )
    fit(trainer, system, train_loader, resume=resume)
    return {
        "step": int(system.step),
        "skipped_steps": system.guard.skipped,
        "checkpoint": str(stage_dir / "last.ckpt"),
        "weights": str(stage_dir / BASE_FILE),
        "metrics": str(stage_dir / "metrics.csv"),
        "previews": str(stage_dir / "previews"),
        "resumed": resume is not None,
        "main_process": main_process,
        "parameters": net.num_parameters,
    }


def _table_rows(recipe, net: WALT, trainer, latent_size, channels, stats, source, resume, spec):
    from walt_cli.models.transformer import describe_windows
    from walt_cli.systems.common import human_count

    b, d, t = recipe.base, recipe.data, recipe.trainer
    frames, h, w = latent_size
    p = net.patch_size
    tokens = frames * (h // p) * (w // p)
    world = trainer.world_size
    batch = b.batch_size or d.batch_size
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(t.precision).split("-")[0])
    device = trainer.strategy.root_device
    try:
        backends = net.attention_backends(training=True, device=device, dtype=dtype)
        sdpa = ", ".join(f"{k} {v}" for k, v in backends.items()) + f" (training, {device})"
    except Exception as err:  # a device the probe cannot reach before the strategy starts
        sdpa = f"decided at start-up ({type(err).__name__})"
    conditions = [
        f"{b.num_classes} classes" if b.num_classes else "",
        f"text (D={b.text_dim})" if b.text_dim else "",
        f"frame prediction p={b.p_frame_pred:g} on {list(b.num_cond_frames)} latent frames"
        if b.p_frame_pred
        else "",
        f"condition dropout {b.p_cond_drop:g}" if b.p_cond_drop else "",
        f"self-conditioning {b.p_self_cond:g}",
    ]
    mean, std = stats["mean"], stats["std"]
    opt = (
        f"AdamW lr {b.lr:g} betas {tuple(b.betas)} wd {b.weight_decay:g}"
        if b.optimizer == "adamw"
        else f"Adafactor lr {b.lr:g} wd {b.weight_decay:g}"
    )
    return [
        (
            "model",
            f"{b.preset}: {human_count(net.num_parameters)} parameters, depth {net.depth}, width {net.width}, {net.heads} heads, p={p}, AdaLN-LoRA r={net.adaln_lora_rank}",
        ),
        ("latent", f"({channels}, {frames}, {h}, {w}): {tokens} tokens per sample"),
        ("windows", describe_windows(net)),
        ("conditioning", ", ".join(c for c in conditions if c)),
        ("data", source),
        (
            "latent stats",
            f"mean {min(mean):.3f}..{max(mean):.3f}, std {min(std):.3f}..{max(std):.3f} (tokenizer {stats['tokenizer']})",
        ),
        (
            "optimizer",
            f"{opt}, warmup {b.warmup_steps} + cosine, clip {b.grad_clip:g}, "
            + (f"EMA {b.ema_decay}" if b.ema else "no EMA"),
        ),
        ("steps", f"{b.max_steps}" + (f" (resuming from {resume})" if resume else "")),
        ("batch", f"{batch} per device x {world} = {batch * world}"),
        ("precision", str(t.precision)),
        ("devices", f"{t.accelerator}: {t.devices} x {t.num_nodes} node(s), {t.strategy}"),
        ("SDPA", sdpa),
        (
            "previews",
            f"every {b.preview_every} steps: {spec.mode}, {b.preview_steps} DDIM steps"
            if spec
            else "off",
        ),
        ("output", str(Path(recipe.run_dir) / "base")),
    ]
