"""`walt tokenize train`: the tokenizer's training system (SPEC_WALT.md §1, the MAGVIT-v2 recipe).

The LightningModule only wires: the causal autoencoder (models/tokenizer.py), the 3D
discriminator (models/discriminator.py), the losses (losses/perceptual.py, losses/gan.py), an EMA
of the generator, two Adam optimizers with warmup + cosine, and the non-finite-loss guard.

One training step (manual optimisation, the system's own `step` counter):

    G: recon_weight * L1/L2(x_hat, x) + perceptual_weight * P(x_hat, x)
       [+ gan_weight * softplus(-D(x_hat)) once step >= disc_start]
    D (once step >= disc_start): softplus(-D(x)) + softplus(D(x_hat))
       + lecam_weight * LeCam + r1_weight * r1_every * r1 (every r1_every D steps, lazy)

Packed images (is_image and T > 1) are encoded frame by frame as 1-frame videos, so joint
image-video batches train one latent space (paper §4.1). A step whose loss is NaN or Inf is
skipped and counted; `nan_patience` in a row stop the run with a message.

Decoder fine-tuning (`walt tokenize train --decoder`, `train_tokenizer(decoder=True)`): the run's
trained tokenizer is the starting point and its encoder is frozen, so its latents, and every
stage already trained on them, stay valid while the decoder learns on (the practice behind
Stable Diffusion's fine-tuned VAE decoders). It writes `runs/<name>/decoder/`, which the run's
bundle then uses (pipelines/bundle.py checks that its encoder is the run's).

Outputs in `runs/<name>/tokenizer/` (`decoder/` for a decoder fine-tune): last.ckpt (Lightning
state: weights, EMA, discriminator, optimizers, schedulers, step), tokenizer.safetensors (EMA
weights + config, exported at every checkpoint and validation), metrics.csv,
previews/step-XXXXXXX.gif (original | reconstruction).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from einops import rearrange

from walt_cli.errors import WaltError
from walt_cli.losses.gan import LeCam, d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty
from walt_cli.losses.perceptual import build_perceptual, psnr, reconstruction_loss
from walt_cli.models.discriminator import Discriminator3D
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.systems.common import (
    NonFiniteGuard,
    clip_grad_norm,
    ema_model,
    precision_row,
    section_kwargs,
    warmup_cosine,
    write_metrics,
)
from walt_cli.systems.parallel import SeparateDDP, ddp_unit, outside_system_ddp

log = logging.getLogger("walt.tokenizer")

TOKENIZER_FILE = "tokenizer.safetensors"
DECODER_STAGE = "decoder"  # runs/<name>/decoder/: a decoder fine-tuned on the run's frozen encoder


def split_batch(
    video: torch.Tensor, is_image: torch.Tensor, frames: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The clips of a batch as groups the tokenizer can take whole.

    video (B, 3, T, H, W), is_image (B,), frames (B,) real frame counts (packs are padded) ->
    [videos (Bv, 3, T, H, W), images (Bi * N, 3, 1, H, W)] (empty groups left out). A pack of N
    independent images becomes N 1-frame clips.
    """
    from walt_cli.data.datasets import pack_frames

    groups = []
    vids = video[~is_image]
    if vids.shape[0]:
        groups.append(vids)
    imgs = video[is_image][:, :, : pack_frames(is_image, frames, video.shape[2])]
    if imgs.shape[0]:
        groups.append(rearrange(imgs, "b c t h w -> (b t) c 1 h w"))
    return groups


class TokenizerSystem(L.LightningModule):
    """Trains a `CausalVideoTokenizer` with the MAGVIT-v2 loss recipe (see the module docstring).

    Args mirror the recipe's `tokenizer` section (walt_cli.config.TokenizerConfig); `tokenizer`
    is the generator to train, `run_dir` where previews and EMA weights are written.
    """

    def __init__(
        self,
        tokenizer: CausalVideoTokenizer,
        *,
        stage_dir: str,
        max_steps: int,
        lr: float = 1e-4,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.0, 0.99),
        ema_decay: float = 0.999,
        grad_clip: float = 1.0,
        recon_loss: str = "l2",
        recon_weight: float = 5.0,
        perceptual: str = "none",
        perceptual_weight: float = 0.1,
        perceptual_path: str | None = None,
        disc_start: int = 2000,
        disc_channels: int = 128,
        disc_multipliers: tuple[int, ...] = (2, 4, 4, 4, 4),
        disc_lr: float | None = None,
        gan_weight: float = 0.1,
        r1_weight: float = 10.0,
        r1_every: int = 4,
        lecam_weight: float = 0.001,
        lecam_decay: float = 0.999,
        nan_patience: int = 10,
        log_every: int = 50,
        fps: float = 8.0,
        freeze_encoder: bool = False,
        encoder_of: str | None = None,
        encoder_files: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.freeze_encoder = freeze_encoder
        self.encoder_of = encoder_of  # the file whose encoder this one keeps (its latents' key)
        self.encoder_files = tuple(encoder_files)  # the fine-tunes between it and this one
        if freeze_encoder:
            # Out of the optimizer and out of autograd: the encoder is never updated, and its
            # EMA copy stays bit-equal (a lerp between equal tensors returns them exactly).
            tokenizer.encoder.requires_grad_(False)
        self.ema = ema_model(tokenizer, ema_decay)
        self.discriminator = Discriminator3D(
            in_channels=tokenizer.in_channels,
            base_channels=disc_channels,
            channel_multipliers=tuple(disc_multipliers),
        )
        self.lecam = LeCam(lecam_decay)
        # The frozen perceptual network is not a submodule: it stays out of checkpoints.
        self._perceptual = [build_perceptual(perceptual, perceptual_path)]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.long))
        self.guard = NonFiniteGuard(nan_patience)
        self.stage_dir = Path(stage_dir)
        self.max_steps = max_steps
        self.lr, self.disc_lr = lr, disc_lr if disc_lr is not None else lr
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.betas = (float(betas[0]), float(betas[1]))
        self.grad_clip = grad_clip
        self.recon_loss, self.recon_weight = recon_loss, recon_weight
        self.perceptual_weight = perceptual_weight
        self.disc_start = disc_start
        self.gan_weight, self.r1_weight, self.r1_every = gan_weight, r1_weight, r1_every
        self.lecam_weight = lecam_weight
        self.log_every = log_every
        self.fps = fps
        self._val: dict[str, list[float]] = {}

    # ---------------------------------------------------------------------------------------
    # Optimizers

    def configure_optimizers(self):
        trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(trainable, lr=self.lr, betas=self.betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.disc_lr, betas=self.betas)
        g_sched = warmup_cosine(self.warmup_steps, self.max_steps, self.min_lr_ratio)
        d_steps = max(1, self.max_steps - self.disc_start)
        d_sched = warmup_cosine(min(self.warmup_steps, d_steps), d_steps, self.min_lr_ratio)
        return [opt_g, opt_d], [
            torch.optim.lr_scheduler.LambdaLR(opt_g, g_sched),
            torch.optim.lr_scheduler.LambdaLR(opt_d, d_sched),
        ]

    # ---------------------------------------------------------------------------------------
    # Losses (overridable pieces; tests inject faults here)

    @property
    def perceptual(self):
        return self._perceptual[0]

    def generator_losses(
        self, groups: list[torch.Tensor], adversarial: bool
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Loss terms of the generator and the reconstructions, one per group."""
        recons = [self.tokenizer(x) for x in groups]  # each like its group (N, 3, T, H, W)
        sizes = [x.numel() for x in groups]
        total = sum(sizes)
        terms: dict[str, torch.Tensor] = {}
        terms["recon"] = sum(
            reconstruction_loss(r, x, self.recon_loss) * (n / total)
            for r, x, n in zip(recons, groups, sizes, strict=True)
        )
        loss = self.recon_weight * terms["recon"]
        if self.perceptual is not None and self.perceptual_weight > 0:
            terms["perceptual"] = sum(
                self.perceptual(r, x) * (n / total)
                for r, x, n in zip(recons, groups, sizes, strict=True)
            )
            loss = loss + self.perceptual_weight * terms["perceptual"]
        if adversarial and self.gan_weight > 0:
            terms["g_adv"] = sum(g_loss_nonsaturating(self.discriminator(r)) for r in recons) / len(
                recons
            )
            loss = loss + self.gan_weight * terms["g_adv"]
        terms["g_loss"] = loss
        return terms, recons

    def discriminator_losses(
        self, groups: list[torch.Tensor], recons: list[torch.Tensor], with_r1: bool
    ) -> dict[str, torch.Tensor]:
        """Loss terms of the discriminator (non-saturating, LeCam, lazy r1)."""
        terms: dict[str, torch.Tensor] = {"d_adv": 0.0, "lecam": 0.0, "r1": 0.0}  # type: ignore[dict-item]
        disc = ddp_unit(self, "discriminator")  # its own DDP under data parallelism
        for x, r in zip(groups, recons, strict=True):
            real = x.detach().requires_grad_(with_r1)
            real_logits = disc(real)  # (N,)
            fake_logits = disc(r.detach())  # (N,)
            terms["d_adv"] = terms["d_adv"] + d_loss_nonsaturating(real_logits, fake_logits)
            terms["lecam"] = terms["lecam"] + self.lecam(real_logits, fake_logits)
            if with_r1:
                terms["r1"] = terms["r1"] + r1_penalty(real_logits, real)
            self.lecam.update(real_logits, fake_logits)
        n = len(groups)
        terms = {
            k: (v / n if torch.is_tensor(v) else torch.zeros((), device=x.device))
            for k, v in terms.items()
        }
        terms["d_loss"] = (
            terms["d_adv"]
            + self.lecam_weight * terms["lecam"]
            + self.r1_weight * self.r1_every * terms["r1"]
        )
        return terms

    # ---------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = int(self.step)
        if step >= self.max_steps:
            self.trainer.should_stop = True
            return None
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        groups = split_batch(batch["video"], batch["is_image"], batch.get("frames"))
        adversarial = step >= self.disc_start

        self.toggle_optimizer(opt_g)
        g_terms, recons = self.generator_losses(groups, adversarial)
        if not self.guard.ok(g_terms["g_loss"], step=step):
            self.untoggle_optimizer(opt_g)
            log.warning(
                "step %d: non-finite generator loss, step skipped (%d in a row)",
                step,
                self.guard.in_a_row,
            )
            self._log_skip(step)
            return None
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_terms["g_loss"])
        if self.grad_clip > 0:
            clip_grad_norm(self, opt_g, self.grad_clip)
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)
        self.ema.update_parameters(self.tokenizer)

        d_terms: dict[str, torch.Tensor] = {}
        if adversarial:
            self.toggle_optimizer(opt_d)
            with_r1 = self.r1_weight > 0 and int(self.d_steps) % self.r1_every == 0
            d_terms = self.discriminator_losses(groups, recons, with_r1)
            if self.guard.ok(d_terms["d_loss"], step=step):
                opt_d.zero_grad(set_to_none=True)
                with outside_system_ddp(self):  # synchronised by the discriminator's own DDP
                    self.manual_backward(d_terms["d_loss"])
                if self.grad_clip > 0:
                    clip_grad_norm(self, opt_d, self.grad_clip)
                opt_d.step()
                sched_d.step()
                self.d_steps += 1
            else:
                log.warning("step %d: non-finite discriminator loss, D step skipped", step)
            self.untoggle_optimizer(opt_d)

        self.step += 1
        step += 1
        if step >= self.max_steps:
            self.trainer.should_stop = True
        self.log("recon", g_terms["recon"].detach(), prog_bar=True, logger=False)
        if step % self.log_every == 0 or step == 1 or step >= self.max_steps:
            with torch.no_grad():
                metrics = {f"train/{k}": float(v) for k, v in {**g_terms, **d_terms}.items()}
                metrics["train/psnr"] = float(
                    torch.cat([psnr(r, x) for r, x in zip(recons, groups, strict=True)]).mean()
                )
            metrics["train/lr"] = sched_g.get_last_lr()[0]
            metrics["train/skipped"] = float(self.guard.skipped)
            metrics["train/video_clips"] = float((~batch["is_image"]).sum())
            metrics["train/image_packs"] = float(batch["is_image"].sum())
            write_metrics(self, metrics, step)
        return None

    def _log_skip(self, step: int) -> None:
        write_metrics(self, {"train/skipped": float(self.guard.skipped)}, step)

    # ---------------------------------------------------------------------------------------
    # Validation: PSNR of the EMA model, a side-by-side preview, EMA weights exported

    def on_validation_epoch_start(self) -> None:
        self._val = {"psnr": [], "recon": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ema = self.ema.module
        groups = split_batch(batch["video"], batch["is_image"], batch.get("frames"))
        recons = [ema(x) for x in groups]
        for r, x in zip(recons, groups, strict=True):
            self._val["psnr"] += psnr(r, x).tolist()
            self._val["recon"].append(float(reconstruction_loss(r, x, self.recon_loss)))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self.write_preview(groups[0][:4], recons[0][:4])

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("psnr"):
            return
        step = int(self.step)
        metrics = {
            "val/psnr": sum(self._val["psnr"]) / len(self._val["psnr"]),
            "val/recon": sum(self._val["recon"]) / len(self._val["recon"]),
        }
        self.log("val_psnr", metrics["val/psnr"], prog_bar=True, logger=False, sync_dist=True)
        write_metrics(self, metrics, step)
        if self.trainer.is_global_zero:
            self.export_ema()

    def write_preview(self, x: torch.Tensor, r: torch.Tensor) -> Path:
        """previews/step-XXXXXXX.gif: each clip beside its EMA reconstruction."""
        from walt_cli.data.video import tile_videos, write_video

        out = self.stage_dir / "previews" / f"step-{int(self.step):07d}.gif"
        out.parent.mkdir(parents=True, exist_ok=True)
        pairs = (
            torch.stack([v for pair in zip(x, r.clamp(-1, 1), strict=True) for v in pair])
            .float()
            .cpu()
        )
        return write_video(out, tile_videos(pairs, ncols=2), fps=self.fps)

    def export_ema(self) -> Path:
        """tokenizer.safetensors: the EMA generator with its config and the step it is from."""
        extra: dict[str, Any] = {"step": int(self.step), "ema": True}
        if self.encoder_of:
            extra["encoder_of"] = self.encoder_of
        if self.encoder_files:
            extra["encoder_files"] = list(self.encoder_files)
        return self.ema.module.save(self.stage_dir / TOKENIZER_FILE, extra=extra)

    # ---------------------------------------------------------------------------------------
    # Checkpoint extras (primitives only, so resuming loads with weights_only=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["walt_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "walt_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["walt_guard"])

    def on_fit_start(self) -> None:
        if self.perceptual is not None:
            self._perceptual[0] = self.perceptual.to(self.device)


def init_tokenizer(preset: str, path: Path) -> CausalVideoTokenizer:
    """`tokenizer.init_from`: a trained tokenizer of the recipe's preset, to train on (both
    halves). A missing file or another architecture is a one-line error."""
    if not path.is_file():
        raise WaltError(
            f"tokenizer.init_from: file not found: {path} (train the tokenizer it names first, "
            "or set tokenizer.init_from=null)"
        )
    tok = CausalVideoTokenizer.from_checkpoint(path).train()
    with torch.device("meta"):  # the preset's config, without allocating its weights
        want = CausalVideoTokenizer.from_preset(preset).config
    differ = sorted(k for k in want if tok.config.get(k) != want[k])
    if differ:
        raise WaltError(
            f"tokenizer.init_from: {path} is not the {preset!r} preset (differs in {differ})"
        )
    return tok


def build_system(recipe, *, decoder: bool = False, fresh: bool = True) -> TokenizerSystem:
    """The training system a recipe describes: a fresh tokenizer from the preset (or, for a
    `fresh` run with `tokenizer.init_from`, those weights), or with `decoder` the run's trained
    tokenizer (`tokenizer.checkpoint` or its own) with the encoder frozen."""
    from walt_cli.data.latents import encoder_key, encoder_keys
    from walt_cli.systems.encode import tokenizer_path

    k = recipe.tokenizer
    encoder_of, encoder_files = None, ()
    if decoder:
        source = tokenizer_path(recipe)
        tok = CausalVideoTokenizer.from_checkpoint(source).train()
        # Latents are keyed by the file that encoded them: a fine-tune of a fine-tune keeps
        # naming the first, and names the fine-tunes in between (`encoder_keys`).
        encoder_of = encoder_key(source)
        encoder_files = tuple(sorted(encoder_keys(source) - {encoder_of}))
    elif k.init_from and fresh:
        tok = init_tokenizer(k.preset, Path(k.init_from))
    else:
        tok = CausalVideoTokenizer.from_preset(k.preset)
    return TokenizerSystem(
        tok,
        stage_dir=str(Path(recipe.run_dir) / (DECODER_STAGE if decoder else "tokenizer")),
        **section_kwargs(k, TokenizerSystem),
        log_every=recipe.trainer.log_every,
        fps=float(recipe.data.fps or recipe.data.shapes.fps or 8.0),
        freeze_encoder=decoder,
        encoder_of=encoder_of,
        encoder_files=encoder_files,
    )


def train_tokenizer(
    recipe,
    *,
    progress: bool = True,
    callbacks: list | None = None,
    console=None,
    decoder: bool = False,
) -> dict[str, Any]:
    """Train (or resume) the recipe's tokenizer; returns a summary dict. `decoder`: fine-tune
    the decoder of the run's trained tokenizer, encoder frozen, in `runs/<name>/decoder/`.

    Rerunning resumes from `runs/<name>/tokenizer/last.ckpt` (`decoder/last.ckpt`): weights,
    EMA, discriminator, optimizers, schedulers, step counter and guard state.
    """
    from walt_cli.config import save_recipe
    from walt_cli.plan import startup_rows
    from walt_cli.systems.common import (
        StepCheckpoint,
        build_trainer,
        data_loaders,
        fit,
        human_count,
        last_checkpoint,
        startup_table,
    )
    from walt_cli.systems.encode import tokenizer_path
    from walt_cli.systems.parallel import strategy_for

    strategy_for(recipe)  # refuses trainer.strategy=fsdp before any work
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    stage_dir = Path(recipe.run_dir) / (DECODER_STAGE if decoder else "tokenizer")
    if decoder:
        tokenizer_path(recipe)  # no trained tokenizer to start from: one line, nothing written
        if recipe.tokenizer.init_from:
            raise WaltError(
                "tokenizer.init_from starts a training of the whole tokenizer; --decoder "
                "fine-tunes tokenizer.checkpoint (or the run's own tokenizer): set that instead"
            )
    resume = last_checkpoint(stage_dir)
    train_loader, val_loader, train_set, val_set = data_loaders(
        recipe, shuffle_seed=recipe.trainer.seed
    )
    # A resumed run restores its own weights: the init_from file is read (and checked) only
    # for a fresh one, before anything is written.
    system = build_system(recipe, decoder=decoder, fresh=resume is None)
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe)
    k, d = recipe.tokenizer, recipe.data

    tok = system.tokenizer
    trained = sum(p.numel() for p in tok.parameters() if p.requires_grad)
    frozen = tok.num_parameters() - trained
    t, (h, w) = d.num_frames, d.resolution
    latent = (
        tok.latent_channels,
        tok.num_latent_frames(t),
        h // tok.spatial_factor,
        w // tok.spatial_factor,
    )
    if console is not None:
        console.print(
            startup_table(
                f"walt tokenize train{' --decoder' if decoder else ''}: {recipe.name}",
                [
                    (
                        "tokenizer",
                        f"{k.preset}: {human_count(tok.num_parameters())} parameters"
                        + (f", from {k.init_from}" if k.init_from and resume is None else "")
                        if not decoder
                        else f"{tokenizer_path(recipe)}: decoder {human_count(trained)} "
                        f"parameters trained, encoder {human_count(frozen)} frozen",
                    ),
                    (
                        "discriminator",
                        f"{human_count(sum(p.numel() for p in system.discriminator.parameters()))} parameters, from step {k.disc_start}",
                    ),
                    ("input", f"(B, 3, {t}, {h}, {w})"),
                    ("latent", f"(B, {', '.join(map(str, latent))})"),
                    ("batch", f"{d.batch_size} per device"),
                    (
                        "data",
                        f"{d.source}: {len(train_set)} train / {len(val_set) if val_set is not None else 0} val",
                    ),
                    (
                        "losses",
                        f"{k.recon_loss} x{k.recon_weight}, perceptual {k.perceptual}"
                        f"{f' x{k.perceptual_weight}' if k.perceptual != 'none' else ''}, "
                        f"GAN x{k.gan_weight}, r1 x{k.r1_weight}, LeCam x{k.lecam_weight}",
                    ),
                    (
                        "optimizer",
                        f"Adam lr {k.lr:g} betas {tuple(k.betas)}, warmup {k.warmup_steps} + cosine, EMA {k.ema_decay}",
                    ),
                    ("steps", f"{k.max_steps}" + (f" (resuming from {resume})" if resume else "")),
                    ("precision", precision_row(recipe.trainer)),
                    (
                        "devices",
                        f"{recipe.trainer.accelerator}: {recipe.trainer.devices} x {recipe.trainer.num_nodes} node(s), {recipe.trainer.strategy}",
                    ),
                    ("output", str(stage_dir)),
                    *startup_rows(recipe, DECODER_STAGE if decoder else "tokenizer"),
                ],
            )
        )
    checkpoint = StepCheckpoint(
        stage_dir,
        recipe.trainer.checkpoint_every,
        on_save=TokenizerSystem.export_ema,  # not a lambda: `ddp_spawn` pickles callbacks
        weights=TOKENIZER_FILE,
    )
    trainer = build_trainer(
        recipe,
        stage_dir,
        val_every=k.val_every if val_loader is not None else None,
        val_batches=k.val_batches,
        callbacks=[checkpoint, SeparateDDP("discriminator"), *(callbacks or [])],
        progress=progress,
    )
    fit(trainer, system, train_loader, val_loader=val_loader, resume=resume)
    skipped_files = len(getattr(train_set, "skipped", {}) or {})
    return {
        "step": int(system.step),
        "skipped_steps": system.guard.skipped,
        "skipped_files": skipped_files,
        "checkpoint": str(stage_dir / "last.ckpt"),
        "weights": str(stage_dir / TOKENIZER_FILE),
        "metrics": str(stage_dir / "metrics.csv"),
        "resumed": resume is not None,
        "steps_per_epoch": math.ceil(len(train_set) / d.batch_size),
    }
