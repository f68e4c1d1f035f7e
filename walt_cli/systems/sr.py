"""`walt train-sr RECIPE --stage N`: a super-resolution stage of the cascade [P §4.5, §5.3].

The denoiser learns the latent z of a clip at the stage's resolution, conditioned on z_lr, the
latent of the same clip downsampled by the stage's factor (both from the same tokenizer, pairs
written by `walt tokenize encode --sr N`). Noise-conditioning augmentation [P §5.3]: z_lr is
noised along the diffusion schedule to t_sr ~ U(0, t_max), and t_sr reaches AdaLN through
`Conditioning.noise_level`; the network upsamples z_lr with its depth-to-space convolution and
reads it as extra input channels. Text cross-attention with condition dropout (guidance),
self-conditioning, EMA and the rest of the plumbing are the base model's (systems/common.py).

Outputs in `runs/<name>/sr<N>/`: last.ckpt, sr<N>.safetensors (EMA weights + config + both
latent statistics + stage metadata, the contract the generation pipeline reads), metrics.csv,
previews/step-XXXXXXX.mp4 (low-res input upsampled | SR output | ground truth).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from walt_cli.diffusion.inputs import noise_augment
from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.systems.common import (
    DiffusionSystem,
    build_network,
    check_text_states,
    normalize,
    section_kwargs,
    stage_fps,
)

log = logging.getLogger("walt.sr")


def sr_file(stage: int) -> str:
    return f"sr{stage}.safetensors"


class SRSystem(DiffusionSystem):
    """Trains one SR stage on (z, z_lr) latent pairs (see the module docstring).

    `lowres_mean` / `lowres_std` (c,) normalise z_lr as `latent_mean` / `latent_std` do z;
    `preview_batch` holds a few real pairs (collated, CPU) for the previews.
    """

    def __init__(
        self,
        net: WALT,
        *,
        stage: int,
        factor: int,
        resolution: list[int],
        lowres_mean: list[float],
        lowres_std: list[float],
        t_max: float = 0.25,
        sample_noise_level: float = 0.1,
        preview_batch: dict | None = None,
        **shared: Any,
    ) -> None:
        super().__init__(net, section=f"sr[{int(stage) - 1}]", **shared)
        if not net.lowres_factor or net.noise_embed is None:
            raise WaltError("an SR stage needs a network built with lowres_factor and noise level")
        self.stage, self.factor = int(stage), int(factor)
        self.export_file = sr_file(self.stage)
        self.resolution = [int(s) for s in resolution]
        self.register_buffer("lowres_mean", torch.tensor(lowres_mean, dtype=torch.float32))
        self.register_buffer("lowres_std", torch.tensor(lowres_std, dtype=torch.float32))
        if bool((self.lowres_std <= 0).any()):
            raise WaltError(f"low-res latent std {lowres_std} has a zero channel")
        self.t_max, self.sample_noise_level = float(t_max), float(sample_noise_level)
        self.preview_batch = preview_batch

    # ---------------------------------------------------------------------------------------
    # Batches -> (z, noised z_lr, conditioning)

    def prepare(
        self, batch: dict, *, level: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Conditioning]:
        """Normalised z0 (B, c, T, h, w), the normalised low-res latent noised to t_sr
        (B, c, T, h/f, w/f) (t_sr ~ U(0, t_max), or `level` for sampling) and the conditioning
        (text, is_image, noise_level = t_sr)."""
        z0 = self.normalize(batch["latent"])
        z_lr = normalize(batch["lowres"], self.lowres_mean, self.lowres_std)
        fixed = None if level is None else torch.full((z0.shape[0],), level, device=z0.device)
        z_lr, t_sr = noise_augment(
            z_lr, self.schedule, self.t_max, level=fixed, generator=generator
        )
        cond = self.conditioning(batch)
        cond.noise_level = t_sr
        return z0, z_lr, cond

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None):
        z0, z_lr, cond = self.prepare(batch, generator=generator)
        out = self.diffusion_loss(
            z0,
            cond,
            cond_drop=("labels", "text"),  # guidance drops the caption, never the low-res input
            lowres=z_lr,
            generator=generator,
        )
        return out, {
            "train/noise_level": float(cond.noise_level.mean()),
            "train/image_packs": float(cond.is_image.sum()),
        }

    # ---------------------------------------------------------------------------------------
    # Previews and export

    def wants_preview(self) -> bool:
        return (
            self.preview_batch is not None
            and bool(self.preview_every)
            and self.tokenizer is not None
        )

    @torch.no_grad()
    def generate(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(low-res input decoded and upsampled, SR output, ground truth), each
        (N, 3, T, H, W) in [-1, 1]. The SR output comes from the generation pipeline
        (`Pipeline.super_resolve`, the path of `walt sample`) over the EMA model, from the same
        seeds at every preview, with z_lr noised to `sample_noise_level`."""
        from walt_cli.pipelines import Pipeline, Stage
        from walt_cli.systems.common import denormalize

        net = self.model
        was_training = net.training
        net.eval()
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        # The pipeline noises the low-res input itself (to `noise_level`): only the target latent
        # (for the ground truth) and the caption or labels are needed here.
        z0, cond = self.normalize(batch["latent"]), self.conditioning(batch)
        stage = Stage(
            name=f"sr{self.stage}",
            net=net,
            mean=self.latent_mean,
            std=self.latent_std,
            resolution=tuple(self.resolution),
            lowres_mean=self.lowres_mean,
            lowres_std=self.lowres_std,
            noise_level=self.sample_noise_level,
        )
        pipe = Pipeline(
            self.tokenizer, [stage], schedule=self.schedule, batch_invariant=False, refine_only=True
        )
        n = z0.shape[0]
        out = pipe.super_resolve(
            batch["lowres"].float(),
            seeds=list(range(n)),  # the same noise at every preview
            labels=cond.labels.reshape(n, -1)[:, 0].tolist() if net.num_classes else None,
            text=(cond.text, cond.text_mask) if net.text_dim else None,
            steps=self.preview_steps,
            guidance=1.0 if self.guidance_scale is None else self.guidance_scale,
            output="float",
        ).clamp(-1, 1)
        net.train(was_training)
        decode = self.tokenizer.decode
        low = decode(batch["lowres"].float()).float().clamp(-1, 1)
        b, c, t, h, w = low.shape
        low = F.interpolate(low.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=self.factor)
        low = low.reshape(b, t, c, h * self.factor, w * self.factor).transpose(1, 2)
        truth = decode(denormalize(z0, self.latent_mean, self.latent_std)).float().clamp(-1, 1)
        return low.cpu(), out, truth.cpu()

    def write_preview(self) -> Path | None:
        """previews/step-XXXXXXX.mp4 (.png for images): one row per clip, low-res input
        (nearest-upsampled) | SR output | ground truth, and a .json saying so."""
        from walt_cli.data.video import tile_videos, write_video

        low, out, truth = self.generate(self.preview_batch)
        if self._trainer is not None and not self.trainer.is_global_zero:  # FSDP: rank zero writes
            return None
        tiles = torch.stack([v for row in zip(low, out, truth, strict=True) for v in row])
        step = int(self.step)
        suffix = ".png" if out.shape[2] == 1 else ".mp4"
        path = self.stage_dir / "previews" / f"step-{step:07d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, tile_videos(tiles, ncols=3), fps=self.fps)
        about = {
            "step": step,
            "stage": self.stage,
            "weights": "ema" if self.ema is not None else "raw",
            "ddim_steps": self.preview_steps,
            "guidance_scale": self.guidance_scale,
            "noise_level": self.sample_noise_level,
            "layout": "rows: low-res input (upsampled) | SR output | ground truth",
            "tiles": [{"caption": c} for c in self.preview_batch["caption"]],
        }
        path.with_suffix(".json").write_text(json.dumps(about, indent=2) + "\n")
        log.info("step %d: preview %s", step, path)
        return path

    def export_extra(self) -> dict[str, Any]:
        h, w = self.resolution
        return {
            "stage": self.stage,
            "factor": self.factor,
            "resolution": [h, w],
            "lowres_resolution": [h // self.factor, w // self.factor],
            "t_max": self.t_max,
            "noise_level": self.sample_noise_level,
            "lowres_latent_stats": {
                "mean": self.lowres_mean.tolist(),
                "std": self.lowres_std.tolist(),
                "tokenizer": self.tokenizer_hash,
            },
        }


# ---------------------------------------------------------------------------------------------
# Building from a recipe


def sr_latent_root(recipe, stage: int) -> Path:
    """`sr[N-1].latents` or runs/<name>/latents/sr<N> (holding train/ and val/)."""
    from walt_cli.systems.encode import latent_folder

    section = recipe.sr[stage - 1]
    return Path(section.latents) if section.latents else latent_folder(recipe, stage)


def train_sr(
    recipe,
    stage: int,
    *,
    progress: bool = True,
    callbacks: list | None = None,
    console=None,
) -> dict[str, Any]:
    """Train (or resume) SR stage `stage` (1-based) of the recipe; returns a summary dict."""
    import lightning as L

    from walt_cli.config import save_recipe
    from walt_cli.data.latents import LatentShards, encoder_keys, load_stats
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.systems.base import _first_items, collate_latents, preview_source, shard_loader
    from walt_cli.systems.common import last_checkpoint, run_stage
    from walt_cli.systems.encode import check_stage, tokenizer_path

    check_stage(recipe, stage)
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    s, d, t = recipe.sr[stage - 1], recipe.data, recipe.trainer
    key = f"sr[{stage - 1}]"
    stage_dir = Path(recipe.run_dir) / f"sr{stage}"
    resume = last_checkpoint(stage_dir)

    tok = keys = None
    if s.preview_every:
        try:
            tok_file = tokenizer_path(recipe)
        except WaltError as err:
            raise WaltError(
                f"{err} (previews decode with it; {key}.preview_every=0 turns them off)"
            ) from None
        tok = CausalVideoTokenizer.from_checkpoint(tok_file).eval()
        keys = encoder_keys(tok_file)  # any key of its encoder (a fine-tuned decoder's too)
    root = sr_latent_root(recipe, stage)
    if not (root / "train" / "index.jsonl").is_file():
        raise WaltError(
            f"no SR training pairs in {root / 'train'}: run `walt tokenize encode RECIPE --sr "
            f"{stage}` first"
        )
    train_set = LatentShards(root / "train")
    stats = load_stats(root / "train", tokenizer=keys)
    if "lowres" not in stats or "lowres" not in train_set[0]:
        raise WaltError(
            f"{root / 'train'} holds no low-res pairs; encode them with `walt tokenize encode "
            f"RECIPE --sr {stage}`"
        )
    tok_hash = stats["tokenizer"]
    first = train_set[0]
    channels, latent_size = first["latent"].shape[0], tuple(first["latent"].shape[1:])
    low_size = tuple(first["lowres"].shape[1:])
    want = (latent_size[0], latent_size[1] // s.factor, latent_size[2] // s.factor)
    if low_size != want:
        raise WaltError(
            f"{root}: low-res latents {low_size} are not the latents {latent_size} / factor "
            f"{s.factor}; re-encode with `walt tokenize encode RECIPE --sr {stage}`"
        )
    train_loader, source = shard_loader(recipe, train_set, s.batch_size or d.batch_size)
    preview_batch = None
    if s.preview_every:
        src = preview_source(root, train_set)
        items = [it for it in _first_items(src, s.preview_samples) if not it.get("is_image")]
        preview_batch = collate_latents(items[: s.preview_samples]) if items else None

    text_encoder = check_text_states(recipe, s, stats, key)
    net = build_network(s, latent_size, channels, lowres_factor=s.factor, noise_level_cond=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe)
    system = SRSystem(
        net,
        stage=stage,
        factor=s.factor,
        resolution=list(s.resolution),
        lowres_mean=stats["lowres"]["mean"],
        lowres_std=stats["lowres"]["std"],
        t_max=s.t_max,
        sample_noise_level=s.sample_noise_level,
        preview_batch=preview_batch,
        stage_dir=str(stage_dir),
        latent_mean=stats["mean"],
        latent_std=stats["std"],
        tokenizer_hash=tok_hash,
        **section_kwargs(s, DiffusionSystem),
        log_every=t.log_every,
        tokenizer=tok,
        fps=stage_fps(d),
        text_encoder=text_encoder,
    )
    conditions = [
        f"low-res latent {low_size} x{s.factor} (depth-to-space)",
        f"noise augmentation t_sr ~ U(0, {s.t_max:g}) (sampling {s.sample_noise_level:g})",
        f"{s.num_classes} classes" if s.num_classes else "",
        f"text (D={s.text_dim}, {s.cross_attention} layers)" if s.text_dim else "",
        f"condition dropout {s.p_cond_drop:g}" if s.p_cond_drop else "",
        f"self-conditioning {s.p_self_cond:g}",
    ]
    previews = (
        f"every {s.preview_every} steps: low-res | SR | truth, {s.preview_steps} DDIM steps"
        if preview_batch is not None
        else "off"
    )
    return run_stage(
        recipe,
        system,
        train_loader,
        stage_dir=stage_dir,
        resume=resume,
        title=f"walt train-sr: {recipe.name} stage {stage}",
        section=s,
        table=dict(
            latent_size=latent_size,
            channels=channels,
            stats=stats,
            source=source,
            conditions=conditions,
            resume=resume,
            previews=previews,
            output=stage_dir,
        ),
        callbacks=callbacks,
        progress=progress,
        console=console,
    )
