"""Training plumbing shared by the stages: Lightning trainer from a recipe, resume, schedules,
the non-finite-loss guard and the start-up table."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from walt_cli.errors import WaltError
from walt_cli.systems.parallel import is_sharded

log = logging.getLogger("walt.train")


class NonFiniteGuard:
    """Skips steps whose loss is NaN or Inf, counts them, and stops after `patience` in a row.

    bf16 GAN training is where peers lose runs to NaN (PEERS.md §5); one bad batch should cost one
    step, a diverged run should stop with a message instead of writing NaN weights.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.in_a_row = 0
        self.skipped = 0

    def ok(self, *losses: torch.Tensor, step: int) -> bool:
        return self.check(all(bool(torch.isfinite(x).all()) for x in losses), step=step)

    def check(self, finite: bool, *, step: int) -> bool:
        """Count one step whose losses were (all ranks agreeing) `finite` or not."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.patience:
            raise WaltError(
                f"training diverged: {self.in_a_row} non-finite losses in a row at step {step} "
                f"({self.skipped} skipped in all); lower the learning rate or use 32-true precision, "
                "then rerun to resume from the last checkpoint"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state["in_a_row"]), int(state["skipped"])


def data_loaders(recipe, *, shuffle_seed: int, batch_size: int | None = None):
    """(train loader, val loader or None, train set, val set or None) for the recipe's data
    (`batch_size` per device, default data.batch_size)."""
    from torch.utils.data import DataLoader

    from walt_cli.data.datasets import build_dataset, collate

    d, t = recipe.data, recipe.trainer
    batch_size = batch_size or d.batch_size
    train = build_dataset(d, "train")
    try:
        val = build_dataset(d, "val") if d.val_fraction > 0 or d.source == "folder" else None
    except WaltError as err:
        log.warning("no validation split (%s): validation and previews are off", err)
        val = None
    common = dict(
        batch_size=batch_size,
        num_workers=t.num_workers,
        collate_fn=collate,
        persistent_workers=t.num_workers > 0,
    )
    from walt_cli.systems.rng import ResumableSampler

    train_loader = DataLoader(
        train,
        sampler=ResumableSampler(len(train), seed=shuffle_seed),
        drop_last=len(train) >= batch_size,
        generator=torch.Generator().manual_seed(shuffle_seed),
        **common,
    )
    val_loader = DataLoader(val, shuffle=False, **common) if val is not None else None
    return train_loader, val_loader, train, val


def ema_model(module: torch.nn.Module, decay: float):
    """An EMA copy of `module` (`torch.optim.swa_utils.AveragedModel`, buffers averaged too, no
    gradients) whose decay ramps up as min(decay, (1 + n) / (10 + n)) over its first n updates,
    as TensorFlow's ExponentialMovingAverage does with `num_updates`.

    Without the ramp a short run's EMA is mostly its initial weights: after 150 steps at decay
    0.999, 86% of the average is step 0 (a 150-step shapes tokenizer: held-out PSNR 10.3 dB for
    the EMA, 15.7 dB for the raw weights). The ramp reaches 0.99 after 890 updates and 0.999 after
    about 9000, so long runs get the configured average.
    """
    from torch.optim.swa_utils import AveragedModel

    update = _RampedEMA(decay)  # a class, not a closure: `ddp_spawn` pickles the system
    return AveragedModel(module, multi_avg_fn=update, use_buffers=True).requires_grad_(False)


class _RampedEMA:
    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged):
        n = float(n_averaged)
        d = min(self.decay, (1 + n) / (10 + n))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:  # one multi-tensor lerp over every float tensor instead of one call each
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - d)
        for avg, cur in zip(averaged, current, strict=True):
            if not avg.is_floating_point():  # integer buffers: what AveragedModel's EMA does
                avg.copy_(avg * d + cur * (1 - d))


def adamw(params: list[torch.nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with its fused kernel (one kernel per step on CUDA) where
    every parameter is a float tensor on a device that has it; the for-loop version otherwise."""
    # Not on CPU: a CPU run resumed from last.ckpt with the fused kernel drifted from the
    # uninterrupted run (tests/test_distributed.py resume equivalence fails; the for-each path
    # is bitwise), so CPU keeps the for-each implementation until that is understood.
    fusable = {"cuda", "mps", "xpu"}
    fused = bool(params) and all(p.device.type in fusable and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`: linear warmup, then cosine decay.

    Written as one closed-form function (rather than chaining LinearLR and CosineAnnealingLR in
    SequentialLR) because a LambdaLR's state is just its step count, which resumes exactly.
    """

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The stage's last.ckpt: a file, or a folder (FSDP's sharded checkpoints), or None."""
    from walt_cli.runio import recover_dir

    path = Path(stage_dir) / "last.ckpt"
    recover_dir(path)  # a kill between a sharded checkpoint's two renames
    return path if path.is_file() or path.is_dir() else None


def _written_ns(path: Path) -> int:
    """When a checkpoint (file, or sharded folder: its metadata file) was written."""
    meta = path / "meta.pt"
    return (meta if path.is_dir() and meta.is_file() else path).stat().st_mtime_ns


class StepCheckpoint(Callback):
    """Writes `last.ckpt` (full Lightning state) every `every` system steps and when training ends.

    The system's own step counter decides (`module.step`), not Lightning's global_step, which in
    manual optimisation counts each optimizer's steps. `on_save(module)` runs after each save
    (e.g. to export EMA weights): on rank zero only, or under FSDP on every rank (the weights are
    gathered from the shards; rank zero writes them).
    """

    def __init__(
        self,
        stage_dir: Path,
        every: int,
        on_save: Callable | None = None,
        weights: str | None = None,
    ) -> None:
        self.path = Path(stage_dir) / "last.ckpt"
        self.every = every
        self.on_save = on_save
        self.weights = Path(stage_dir) / weights if weights else None  # what on_save writes
        self.saved_step = -1

    def _save(self, trainer, module) -> None:
        step = int(module.step)
        if step == self.saved_step:
            return
        # metrics.csv first: once the checkpoint of a step is on disk, so is every row up to it
        # (flushed after the checkpoint, a kill in between lost the rows since the last flush;
        # rows of steps past the checkpoint are dropped on resume, `truncate_after`).
        for logger in trainer.loggers:
            if hasattr(logger, "flush"):
                logger.flush()
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = step
        if self._exports(trainer):
            self.on_save(module)

    def on_train_start(self, trainer, module) -> None:
        self.saved_step = int(module.step)  # a restored state is already on disk
        for logger in trainer.loggers:  # rows a killed run logged after it
            if hasattr(logger, "truncate_after"):
                logger.truncate_after(self.saved_step)
        if not self._exports(trainer):
            return
        # A kill between the checkpoint and the export left older weights: export again
        # (rank zero decides: under FSDP every rank takes part in the export).
        stale = False
        if trainer.is_global_zero and (self.path.is_file() or self.path.is_dir()):
            weights = self.weights
            stale = (
                weights is None
                or not weights.is_file()
                or weights.stat().st_mtime_ns < _written_ns(self.path)
            )
        if is_sharded(trainer.strategy):
            stale = trainer.strategy.broadcast(stale)
        if stale:
            self.on_save(module)

    def _exports(self, trainer) -> bool:
        return self.on_save is not None and (trainer.is_global_zero or is_sharded(trainer.strategy))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = int(module.step)
        if step > 0 and (step % self.every == 0 or trainer.should_stop):
            self._save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer, module)


def clip_grad_norm(module, opt, max_norm: float) -> None:
    """Clip the gradients of `opt`'s parameters to a total L2 norm of `max_norm`.

    By hand rather than Lightning's `clip_gradients`, which under mixed precision refuses an
    optimizer that unscales inside its own step: fused AdamW, walt's optimizer on CUDA, so every
    CUDA run with `grad_clip` > 0 stopped at its first step (seen on an H200, BENCHMARKS.md).
    Under a 16-mixed loss scaler the gradients are still scaled here (the scaler unscales in
    `opt.step()`), so the threshold is scaled with them: clipping s g to s max_norm is clipping
    g to max_norm (Lightning clipped the scaled gradients to the unscaled threshold)."""
    inner = getattr(opt, "optimizer", opt)  # a LightningOptimizer wraps the torch optimizer
    params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    scale = scaler.get_scale() if scaler is not None else 1.0  # a host sync, under fp16 only
    torch.nn.utils.clip_grad_norm_(params, max_norm * scale)


def _not_a_tip(record) -> bool:
    """A logging filter: drops Lightning's advertisements ("💡 Tip: ... try installing
    litlogger") from every run's log; its other messages (devices, warnings) stay."""
    return not str(record.msg).startswith("💡 Tip")


def build_trainer(
    recipe,
    stage_dir: Path,
    *,
    val_every: int | None,
    val_batches: int,
    callbacks: list | None = None,
    progress: bool = True,
    section=None,
):
    """A Lightning Trainer for one stage: CSV metrics (`metrics.csv`) in `stage_dir` and the
    loggers of `trainer.loggers` (`section`: the diffusion stage's recipe section, which
    `trainer.strategy=fsdp` shards).

    Steps are counted by the system (it stops the trainer at its own max_steps, and a
    `StepCheckpoint` among `callbacks` writes last.ckpt), because in manual optimisation
    Lightning's global_step counts every optimizer's steps.
    """
    import lightning as L

    from walt_cli.systems.progress import StepProgress
    from walt_cli.systems.tensorboard_log import extra_loggers

    t = recipe.trainer
    stage_dir = Path(stage_dir)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in logger.filters:
        logger.addFilter(_not_a_tip)
    extra = extra_loggers(t.loggers, stage_dir)  # a missing package stops us before any write
    stage_dir.mkdir(parents=True, exist_ok=True)
    cbs = [*(callbacks or [])]
    if progress:
        cbs.append(StepProgress())
    from walt_cli.runio import AtomicCheckpointIO
    from walt_cli.systems.csv_log import MetricsCSV
    from walt_cli.systems.parallel import strategy_for, trainer_errors
    from walt_cli.systems.rng import RandomState

    cbs.insert(0, RandomState(t.seed))
    devices = t.devices
    if not isinstance(devices, (int, str)):
        devices = list(devices)
    strategy = strategy_for(recipe, section)
    with trainer_errors(t):
        trainer = L.Trainer(
            default_root_dir=stage_dir,
            logger=[MetricsCSV(stage_dir / "metrics.csv"), *extra],
            accelerator=t.accelerator,
            devices=devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=t.precision,
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,  # walt's samplers shard by rank and resume mid-epoch
            max_epochs=-1,
            max_steps=-1,
            log_every_n_steps=t.log_every,
            callbacks=cbs,
            val_check_interval=val_every if val_every else None,
            check_val_every_n_epoch=None if val_every else 1,
            limit_val_batches=val_batches if val_every else 0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )
    return trainer


def write_metrics(module, metrics: dict[str, float], step: int) -> None:
    """A training system's metrics, keyed by its own step, to each of its loggers: a metrics.csv
    row, flushed at once (a killed run keeps it), and the same to `trainer.loggers`."""
    for logger in module.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def section_kwargs(section, target) -> dict[str, Any]:
    """The keys of a recipe section that `target`'s constructor takes under the same name: one
    mapping from the typed recipe to a system's explicit keyword arguments."""
    import inspect

    from omegaconf import OmegaConf

    params = inspect.signature(target).parameters
    values = OmegaConf.to_container(section) if OmegaConf.is_config(section) else vars(section)
    return {k: v for k, v in values.items() if k in params}


def fit(trainer, system, train_loader, *, val_loader=None, resume: Path | None = None) -> None:
    """`trainer.fit`, resuming from `resume` with `weights_only=True` (nothing is unpickled),
    without the warnings that every resumed step-based run would print."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*(does not have many workers|resuming from a checkpoint|that ended before the epoch).*",
        )
        # Lightning 2.6 using a torch 2.13 deprecation, once a run: not a user's to act on.
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec", category=FutureWarning)
        try:
            trainer.fit(
                system,
                train_dataloaders=train_loader,
                val_dataloaders=val_loader,
                ckpt_path=str(resume) if resume else None,
                weights_only=True,
            )
        except (RuntimeError, KeyError, ValueError) as err:
            if resume is None or not any(
                m in str(err) for m in ("state_dict", "parameter group", "KeyError", "'")
            ):
                raise
            from walt_cli.runio import load_error

            raise WaltError(
                f"{load_error(resume, err, 'checkpoint of this run')}; move it away to start over"
            ) from None


def startup_table(title: str, rows: list[tuple[str, Any]]):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# The diffusion stages' shared system (base and SR)


def normalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, c, T, h, w) tokenizer latents -> zero-mean unit-std per channel."""
    return (z.float() - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def denormalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return z.float() * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)


def _stats_buffer(values: list[float], what: str) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    if what == "std" and bool((t <= 0).any()):
        raise WaltError(f"latent std {values} has a zero channel; the latents are constant")
    return t


class DiffusionSystem(L.LightningModule):
    """What every W.A.L.T diffusion stage's LightningModule shares: the network and its EMA,
    AdamW or Adafactor with warmup + cosine, the step counter, the non-finite-loss guard,
    gradient clipping, metrics.csv rows, previews every `preview_every` steps, checkpoint
    extras and the safetensors export.

    A stage implements `compute_loss(batch) -> (LossOutput, metrics)` and `write_preview()`,
    and names its export file (`export_file`) and extra metadata (`export_extra`).
    """

    export_file = "model.safetensors"

    def __init__(
        self,
        net,
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
        lr_schedule: str = "cosine",
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        ema: bool = True,
        ema_decay: float = 0.9999,
        grad_clip: float = 1.0,
        accumulate_grad_batches: int = 1,
        p_self_cond: float = 0.9,
        p_cond_drop: float = 0.0,
        time_shift: float = 1.0,
        nan_patience: int = 10,
        log_every: int = 50,
        preview_every: int = 0,
        preview_steps: int = 50,
        guidance_scale: float | None = None,
        tokenizer=None,
        fps: float = 8.0,
        text_encoder: dict | None = None,
        section: str = "base",
    ) -> None:
        super().__init__()
        from walt_cli.diffusion.schedules import make_schedule

        self.section = section  # the recipe key this stage reads (for messages)
        self.automatic_optimization = False
        self.net = net
        self.ema = ema_model(net, ema_decay) if ema else None
        self.schedule = make_schedule()  # 1000 linear betas, zero terminal SNR [P Table 8]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("latent_mean", _stats_buffer(latent_mean, "mean"))
        self.register_buffer("latent_std", _stats_buffer(latent_std, "std"))
        self.tokenizer_hash = tokenizer_hash
        self.text_encoder = text_encoder  # spec + hash of the encoder behind the text states
        self.guard = NonFiniteGuard(nan_patience)
        self.stage_dir = Path(stage_dir)
        self.max_steps, self.optimizer_name = max_steps, optimizer
        self.lr, self.warmup_steps, self.min_lr_ratio = lr, warmup_steps, min_lr_ratio
        self.lr_schedule = lr_schedule
        self.betas, self.weight_decay = (float(betas[0]), float(betas[1])), weight_decay
        self.grad_clip = grad_clip
        self.accumulate = int(accumulate_grad_batches)
        self._micro = 0  # micro-batches of the current step done so far
        self._summed: dict[str, Any] = {}  # their loss and counts (the step's metrics)
        self.p_self_cond, self.p_cond_drop = p_self_cond, p_cond_drop
        self.time_shift = time_shift
        self.log_every = log_every
        self.preview_every, self.preview_steps = preview_every, preview_steps
        self.guidance_scale = guidance_scale
        # The frozen tokenizer is not a submodule: it stays out of checkpoints and optimizers.
        self._tokenizer = [tokenizer.eval().requires_grad_(False) if tokenizer else None]
        self.fps = fps
        self._clock: tuple[int, float] | None = None

    @property
    def tokenizer(self):
        return self._tokenizer[0]

    @property
    def model(self):
        """The weights to sample and export: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.net

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return normalize(z, self.latent_mean, self.latent_std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return denormalize(z, self.latent_mean, self.latent_std)

    def conditioning(self, batch: dict):
        """The `Conditioning` of a batch of latents: class labels (unlabelled -1 = the null
        class), text states + mask from the shards, is_image."""
        from walt_cli.models.transformer import Conditioning

        net = self.net
        labels = None
        if net.num_classes:
            labels = batch["label"].long()
            if bool((labels >= net.num_classes).any()):
                raise WaltError(
                    f"the data has class label {int(labels.max())} but {self.section}.num_classes "
                    f"is {net.num_classes}"
                )
            labels = labels.clamp(min=Conditioning.NULL_LABEL)
        text = text_mask = None
        if net.text_dim:
            if "text" not in batch:
                raise WaltError(
                    f"{self.section}.text_dim is set but the latents hold no text embeddings; set "
                    f"text_encoder in the recipe and re-encode (or set {self.section}.text_dim=null)"
                )
            text, text_mask = batch["text"], batch["text_mask"]
        return Conditioning(
            labels=labels, text=text, text_mask=text_mask, is_image=batch["is_image"]
        )

    def configure_model(self) -> None:
        """Under FSDP: the transformer and its EMA copy become FSDP roots (systems/parallel.py
        says why the LightningModule is not the root)."""
        if not self.sharded:
            return
        from walt_cli.systems.parallel import wrap_fsdp

        strategy = self.trainer.strategy
        self.net = wrap_fsdp(self.net, strategy)
        if self.ema is not None:
            self.ema.module = wrap_fsdp(self.ema.module, strategy)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.optimizer_name == "adafactor":  # without parameter scaling (systems/optim.py)
            from walt_cli.systems.optim import adafactor

            opt = adafactor(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = adamw(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        # constant: the cosine's floor at 1 (linear warmup, then the peak lr throughout)
        floor = 1.0 if self.lr_schedule == "constant" else self.min_lr_ratio
        sched = warmup_cosine(self.warmup_steps, self.max_steps, floor)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, sched)]

    # ---------------------------------------------------------------------------------------
    # What a stage provides

    def compute_loss(self, batch: dict) -> tuple[Any, dict[str, float]]:
        """(diffusion LossOutput, per-batch metrics to log beside the loss)."""
        raise NotImplementedError

    def wants_preview(self) -> bool:
        return bool(self.preview_every)

    def write_preview(self) -> Path | None:
        """Sample and write a preview (rank zero writes; None elsewhere)."""
        raise NotImplementedError

    def export_extra(self) -> dict[str, Any]:
        return {}

    # ---------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = int(self.step)
        if step >= self.max_steps:
            self.trainer.should_stop = True
            return None
        opt = self.optimizers()
        sched = self.lr_schedulers()
        k = self.accumulate
        if self._micro == 0:
            opt.zero_grad(set_to_none=True)
            self._summed = {}
        last = self._micro == k - 1
        # Gradient accumulation: k micro-batches, one optimizer step. Under DDP the gradients
        # are all-reduced on the last micro-batch only (Lightning's `toggle_model` blocks the
        # sync on the others); FSDP reduce-scatters each one, so only shards are kept between.
        with opt.toggle_model(sync_grad=last) if k > 1 else contextlib.nullcontext():
            out, extra = self.compute_loss(batch)
            # Every rank skips together, or DDP would wait on a gradient that never comes.
            finite = self.trainer.strategy.reduce_boolean_decision(
                bool(torch.isfinite(out.loss)), all=True
            )
            if finite:
                self.manual_backward(out.loss / k if k > 1 else out.loss)
        if not self.guard.check(finite, step=step):
            log.warning(
                "step %d: non-finite loss, step skipped (%d in a row)", step, self.guard.in_a_row
            )
            self._micro = 0  # the step's micro-batches so far are dropped with it
            write_metrics(self, {"train/skipped": float(self.guard.skipped)}, step)
            return None
        for key, value in {"train/loss": out.loss.detach() / k, **extra}.items():
            self._summed[key] = self._summed.get(key, 0.0) + value
        # A tensor until a logging step reads it (no host sync here).
        dropped = out.dropped.sum()
        self._summed["train/cond_dropped"] = self._summed.get("train/cond_dropped", 0.0) + dropped
        if not last:
            self._micro += 1
            return None
        self._micro = 0
        step += 1
        logging_step = step % self.log_every == 0 or step == 1 or step >= self.max_steps
        grad_norm = self._clip_gradients(opt, logging_step)
        opt.step()
        sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.step += 1
        if step >= self.max_steps:
            self.trainer.should_stop = True

        summed = self._summed  # the step's loss (mean over its micro-batches) and counts (sums)
        self.log("loss", summed["train/loss"], prog_bar=True, logger=False)
        if logging_step:
            metrics = {
                "train/loss": float(summed["train/loss"]),
                "train/lr": sched.get_last_lr()[0],
                "train/skipped": float(self.guard.skipped),
                **{key: float(v) for key, v in summed.items() if key != "train/loss"},
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            now = time.perf_counter()
            if self._clock is not None and step > self._clock[0]:
                metrics["train/steps_per_s"] = (step - self._clock[0]) / (now - self._clock[1])
            self._clock = (step, now)
            write_metrics(self, metrics, step)
        if (
            self.wants_preview()
            and (step % self.preview_every == 0 or step >= self.max_steps)
            and (self.trainer.is_global_zero or self.sharded)
        ):
            # Under FSDP every rank samples (each layer gathers its shards from all ranks) and
            # rank zero writes the files; under DDP rank zero alone samples its full replica.
            self.write_preview()
            self._clock = None  # the preview's time is not training time
        return None

    @property
    def sharded(self) -> bool:
        """Whether the weights are sharded over the ranks (FSDP)."""
        return self._trainer is not None and is_sharded(self.trainer.strategy)

    def diffusion_loss(self, z0: torch.Tensor, cond, **stage):
        """`diffusion.losses.diffusion_loss` with the keys every stage shares (self-conditioning,
        condition dropout, time shift, lockstep under FSDP); `stage` adds the stage's own."""
        from walt_cli.diffusion.losses import diffusion_loss

        return diffusion_loss(
            self.net,
            z0,
            cond,
            self.schedule,
            p_self_cond=self.p_self_cond,
            p_cond_drop=self.p_cond_drop,
            time_shift=self.time_shift,
            lockstep=self.sharded,
            **stage,
        )

    def _clip_gradients(self, opt, logging_step: bool) -> torch.Tensor | None:
        """Clip to `grad_clip` (0: off); returns the norm before clipping on logging steps (not
        under a 16-mixed loss scaler, whose gradients are still scaled here)."""
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if self.sharded:
            if self.grad_clip <= 0 and not (logging_step and not scaled):
                return None
            from walt_cli.systems.parallel import sharded_grad_norm

            params = [p for p in self.net.parameters() if p.grad is not None]
            if scaled:  # unscale in place first (the scaler's step then skips its own unscale)
                self.trainer.precision_plugin.scaler.unscale_(opt.optimizer)
            norm = sharded_grad_norm(params, self.device)  # a collective: every rank calls it
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            return norm if logging_step and not scaled else None
        grad_norm = None
        if logging_step and not scaled:  # this rank's gradient (DDP: already all-reduced)
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.net.parameters() if p.grad is not None]
            )
        if self.grad_clip > 0:
            clip_grad_norm(self, opt, self.grad_clip)
        return grad_norm

    # ---------------------------------------------------------------------------------------
    # Export and checkpoint extras (primitives only, so resuming loads with weights_only=True)

    def export(self) -> Path | None:
        """<stage>.safetensors: the EMA (or raw) weights, their config, the latent statistics,
        the text encoder (text models) and what the stage adds (`export_extra`). Under FSDP
        every rank calls this (the weights are gathered) and rank zero writes (None elsewhere)."""
        from walt_cli.systems.parallel import full_state_dict

        state = full_state_dict(self.model, self._trainer)
        if state is None:
            return None
        extra: dict[str, Any] = {
            "step": int(self.step),
            "ema": self.ema is not None,
            "latent_stats": {
                "mean": self.latent_mean.tolist(),
                "std": self.latent_std.tolist(),
                "tokenizer": self.tokenizer_hash,
            },
        }
        if self.text_encoder is not None and getattr(self.net, "text_dim", None):
            extra["text_encoder"] = dict(self.text_encoder)
        extra.update(self.export_extra())
        path = self.stage_dir / self.export_file
        self.model.save(path, extra=extra, state=state)
        return path

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


def run_stage(
    recipe,
    system: DiffusionSystem,
    train_loader,
    *,
    stage_dir: Path,
    resume: Path | None,
    title: str,
    section,
    table: dict[str, Any],
    callbacks: list | None = None,
    progress: bool = True,
    console=None,
) -> dict[str, Any]:
    """Fit a diffusion stage: last.ckpt every `trainer.checkpoint_every` steps (exporting the
    weights each time), the start-up table (`denoiser_rows(recipe, section, ..., **table)`) on
    the main process, resume from `resume`. Returns the run's summary (`main_process`: whether
    this is the process that reports, DDP running one per device)."""
    from lightning.pytorch.utilities import rank_zero_only

    from walt_cli.systems.parallel import base_needs_unused_search, find_unused_parameters

    checkpoint = StepCheckpoint(
        stage_dir,
        recipe.trainer.checkpoint_every,
        on_save=type(system).export,  # not a lambda: `ddp_spawn` pickles callbacks
        weights=system.export_file,
    )
    trainer = build_trainer(
        recipe,
        stage_dir,
        val_every=None,
        val_batches=0,
        callbacks=[checkpoint, *(callbacks or [])],
        progress=progress,
        section=section,
    )
    find_unused_parameters(trainer, base_needs_unused_search(recipe))
    if is_sharded(trainer.strategy):
        # FSDP checkpoints activations per block itself (`section.gradient_checkpointing`
        # sets its policy, parallel.fsdp_strategy): the network's own checkpointing is off.
        system.net.gradient_checkpointing = False
    parameters = system.net.num_parameters  # before FSDP replaces the weights by shards
    main_process = rank_zero_only.rank == 0  # DDP launches one process per device: one table
    if console is not None and main_process:
        rows = denoiser_rows(recipe, section, system.net, trainer, **table)
        rows += _plan_rows(recipe, system.section, trainer)
        console.print(startup_table(title, rows))
    fit(trainer, system, train_loader, resume=resume)
    return {
        "step": int(system.step),
        "skipped_steps": system.guard.skipped,
        "checkpoint": str(stage_dir / "last.ckpt"),
        "weights": str(stage_dir / system.export_file),
        "metrics": str(stage_dir / "metrics.csv"),
        "previews": str(stage_dir / "previews"),
        "resumed": resume is not None,
        "main_process": main_process,
        "parameters": parameters,
    }


def _plan_rows(recipe, section: str, trainer) -> list[tuple[str, Any]]:
    """`walt plan`'s memory and FLOPs rows for a stage (`section`: tokenizer, base or sr[i])."""
    from walt_cli.plan import startup_rows

    stage = f"sr{int(section[3:-1]) + 1}" if section.startswith("sr[") else section
    fsdp = is_sharded(trainer.strategy)
    return startup_rows(recipe, stage, trainer.world_size, "fsdp" if fsdp else "ddp")


def denoiser_rows(
    recipe,
    section,
    net,
    trainer,
    *,
    latent_size,
    channels: int,
    stats: dict,
    source: str,
    conditions: list[str],
    resume: Path | None,
    previews: str,
    output: Path,
) -> list[tuple[str, Any]]:
    """The start-up table of a diffusion stage (`section`: base or sr[N-1])."""
    from walt_cli.models.transformer import describe_windows

    b, t = section, recipe.trainer
    frames, h, w = latent_size
    p = net.patch_size
    tokens = frames * (h // p) * (w // p)
    world = trainer.world_size
    batch = b.batch_size or recipe.data.batch_size
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(t.precision).split("-")[0])
    device = trainer.strategy.root_device
    try:
        backends = net.attention_backends(training=True, device=device, dtype=dtype)
        sdpa = ", ".join(f"{k} {v}" for k, v in backends.items()) + f" (training, {device})"
    except Exception as err:  # a device the probe cannot reach before the strategy starts
        sdpa = f"decided at start-up ({type(err).__name__})"
    mean, std = stats["mean"], stats["std"]
    opt = (
        f"AdamW lr {b.lr:g} betas {tuple(b.betas)} wd {b.weight_decay:g}"
        if b.optimizer == "adamw"
        else f"Adafactor lr {b.lr:g} wd {b.weight_decay:g}"
    )
    replaced = ""  # what overwrites the network's starting values, if anything
    if resume:
        replaced = "; resumed weights replace both"
    elif getattr(b, "init_from", None):  # only the base stage has init_from
        replaced = "; init_from's weights replace both"
    return [
        (
            "model",
            f"{b.preset}: {human_count(net.num_parameters)} parameters, depth {net.depth}, width {net.width}, {net.heads} heads, p={p}, AdaLN-LoRA r={net.adaln_lora_rank}",
        ),
        ("latent", f"({channels}, {frames}, {h}, {w}): {tokens} tokens per sample"),
        ("windows", describe_windows(net)),
        ("init", f"bias {b.bias_init}, positions {b.pos_init}{replaced}"),
        ("conditioning", ", ".join(c for c in conditions if c)),
        (
            "times",
            "uniform on [0, 1]"
            if b.time_shift == 1
            else f"shifted toward noise, s t / (1 + (s - 1) t) with s = {b.time_shift:g}",
        ),
        ("data", source),
        (
            "latent stats",
            f"mean {min(mean):.3f}..{max(mean):.3f}, std {min(std):.3f}..{max(std):.3f} (tokenizer {stats['tokenizer']})",
        ),
        (
            "optimizer",
            f"{opt}, warmup {b.warmup_steps} + {b.lr_schedule}, clip {b.grad_clip:g}, "
            + (f"EMA {b.ema_decay}" if b.ema else "no EMA"),
        ),
        ("steps", f"{b.max_steps}" + (f" (resuming from {resume})" if resume else "")),
        ("batch", batch_row(batch, world, b.accumulate_grad_batches)),
        ("precision", precision_row(t)),
        ("devices", f"{t.accelerator}: {t.devices} x {t.num_nodes} node(s), {strategy_row(t, b)}"),
        ("SDPA", sdpa),
        ("previews", previews),
        ("output", str(output)),
    ]


def precision_row(t) -> str:
    """The start-up table's precision; a 32-true run on a CPU with native bf16 units (AMX or
    AVX512-BF16) is told that bf16-mixed trains faster there."""
    from walt_cli.runtime import cpu_has_native_bf16

    text = str(t.precision)
    on_cpu = str(t.accelerator) == "cpu" or (
        str(t.accelerator) == "auto" and not torch.cuda.is_available()
    )
    if text == "32-true" and on_cpu and cpu_has_native_bf16():
        text += " (this CPU has native bf16: trainer.precision=bf16-mixed trains faster)"
    return text


def batch_row(batch: int, world: int, accumulate: int) -> str:
    if accumulate == 1:
        return f"{batch} per device x {world} = {batch * world}"
    return f"{batch} per device x {world} x {accumulate} accumulated = {batch * world * accumulate}"


def strategy_row(t, section) -> str:
    if str(t.strategy) != "fsdp":
        return str(t.strategy)
    ckpt = "activation checkpointing per block, " if section.gradient_checkpointing else ""
    return f"fsdp (one shard unit per transformer block, {ckpt}{t.fsdp_checkpoint} checkpoints)"


def build_network(section, latent_size: tuple[int, int, int], latent_channels: int, **extra):
    """A stage's transformer (`section`: base or sr[N-1]) on a latent grid (T, h, w): SW windows
    default to the whole frame and STW windows to half of it (the paper's 1x16x16 / 5x8x8 on
    16x16 latents). `extra`: constructor keywords the stage adds (an SR stage's lowres_factor)."""
    from walt_cli.models.transformer import PRESETS, WALT

    b = section
    keys = ("depth", "width", "heads", "patch_size", "adaln_lora_rank")
    overrides: dict[str, Any] = {k: getattr(b, k) for k in keys if getattr(b, k) is not None}
    p = overrides.get("patch_size", PRESETS[b.preset].get("patch_size", 1))
    frames, h, w = latent_size
    if h % p or w % p:
        raise WaltError(f"patch_size {p} does not divide the {h}x{w} latent grid")
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
        cross_attention=b.cross_attention,
        bias_init=b.bias_init,
        pos_init=b.pos_init,
        **extra,
    )
    net.gradient_checkpointing = b.gradient_checkpointing
    return net


def stage_fps(data) -> float:
    """Frame rate of the previews: data.fps, the shapes' fps, or 8."""
    return float(data.fps or data.shapes.fps or 8.0)


def check_text_states(recipe, section, stats: dict, key: str) -> dict | None:
    """For a text-conditioned stage (`section.text_dim`), the recipe's text encoder as recorded
    in checkpoints (spec + hash), after checking that the shards' text states (their stats.json
    names the encoder) come from it and have its width. None when the stage takes no text or
    the recipe names no encoder (states written by other means are used as they are)."""
    if not section.text_dim or recipe.text_encoder.name == "none":
        return None
    from walt_cli.systems.encode import load_text_encoder

    enc = load_text_encoder(recipe)
    if enc.dim != section.text_dim:
        raise WaltError(
            f"{key}.text_dim is {section.text_dim} but text_encoder {enc.spec.name} gives "
            f"{enc.dim}-wide states"
        )
    written = stats.get("text_encoder")
    if written is not None and written != enc.hash:
        raise WaltError(
            f"the latent shards hold text states of encoder {written}, the recipe's "
            f"text_encoder ({enc.spec.name}) is {enc.hash}; re-encode with `walt tokenize encode`"
        )
    return enc.describe()
