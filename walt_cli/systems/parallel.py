"""Data-parallel structure of the training systems under DDP, and FSDP for the diffusion stages.

Lightning wraps a whole LightningModule in one `DistributedDataParallel`, whose reducer expects
every trainable parameter to receive a gradient in every backward pass that follows a forward.
Two of walt's systems break that rule, and each gets the structure that fits it:

- The tokenizer's discriminator is idle before `disc_start` and frozen during the generator's
  step, and its own backward pass gives the generator no gradient. `SeparateDDP` takes it out of
  the system's DDP and wraps it in a DDP of its own, used for the discriminator's step only; its
  backward runs outside the system's reducer (`block_backward_sync`). Each DDP unit then sees a
  forward and backward over exactly its own parameters, and no graph has to be searched for
  unused parameters (`find_unused_parameters=True` would do that search on every step).
- The base model's spatiotemporal layers skip attention for packs of independent images
  (identity attention: their queries, keys, qk-norms and position bias take no part), so which
  parameters are used depends on the batch. `base_needs_unused_search` says when a run can
  draw such a batch, and only then is DDP asked to find unused parameters. (The structural fix
  is identity attention written as attention restricted to the token itself, where those
  parameters take part with an exact zero gradient; it belongs in models/attention.py.)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from lightning.pytorch.callbacks import Callback

from walt_cli.errors import WaltError

log = logging.getLogger("walt.parallel")

DDP_NAMES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def is_ddp(strategy) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def find_unused_parameters(trainer, enabled: bool) -> None:
    """Ask the trainer's DDP (when it is one) to search for unused parameters.

    Set on the resolved strategy, so `strategy: auto` on several devices (DDP) gets it and a
    single device (no DDP) pays nothing.
    """
    if enabled and is_ddp(trainer.strategy):
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = True  # read in _setup_model


def base_needs_unused_search(recipe) -> bool:
    """A base run can draw batches of image packs only (see the module docstring)."""
    return recipe.data.image_ratio > 0


class SeparateDDP(Callback):
    """Gives the named submodules of a system their own DDP wrapper (see the module docstring).

    The system reads the wrapper with `ddp_unit(system, name)` for the steps that train that
    submodule; elsewhere it calls the plain submodule (no reducer is prepared, so a frozen
    forward costs nothing extra).
    """

    def __init__(self, *names: str) -> None:
        self.names = names

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not is_ddp(trainer.strategy):
            return
        from torch.nn.parallel import DistributedDataParallel

        ignore = [
            f"{name}.{key}"
            for name in self.names
            for key, _ in [
                *getattr(pl_module, name).named_parameters(),
                *getattr(pl_module, name).named_buffers(),
            ]
        ]
        # Read by DistributedDataParallel when Lightning wraps the system (after `setup`).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pl_module, ignore)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not is_ddp(trainer.strategy):
            return
        from torch.nn.parallel import DistributedDataParallel

        units: dict[str, Any] = {}
        for name in self.names:
            units[name] = DistributedDataParallel(
                getattr(pl_module, name),
                device_ids=trainer.strategy.determine_ddp_device_ids(),
            )
        pl_module.__dict__["_ddp_units"] = units  # not a submodule: stays out of the state dict

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pl_module.__dict__.pop("_ddp_units", None)


def ddp_unit(module, name: str):
    """The DDP wrapper `SeparateDDP` made for `module.<name>`, or the submodule itself."""
    return module.__dict__.get("_ddp_units", {}).get(name, getattr(module, name))


def outside_system_ddp(module):
    """A context in which a backward pass leaves the system's own DDP reducer alone."""
    from contextlib import nullcontext

    trainer = module._trainer
    if trainer is None or not is_ddp(trainer.strategy):
        return nullcontext()
    return trainer.strategy.block_backward_sync()


# ---------------------------------------------------------------------------------------------
# The trainer section -> Lightning


def strategy_for(recipe, section=None):
    """`trainer.strategy` as Lightning takes it: a registered name, or for `fsdp` the FSDP
    strategy of a diffusion stage (`section`: base or sr[N-1], whose transformer it shards)."""
    t = recipe.trainer
    if str(t.strategy) != "fsdp":
        return str(t.strategy)
    if section is None:
        raise WaltError(
            "trainer.strategy=fsdp shards the diffusion transformers (train-base, train-sr); "
            "the tokenizer trains with ddp (trainer.strategy=ddp)"
        )
    return fsdp_strategy(t, section)


def is_sharded(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


# ---------------------------------------------------------------------------------------------
# FSDP
#
# Why Lightning's `FSDPStrategy` (FSDP1) with `use_orig_params=True`, and not FSDP2
# (`fully_shard` under Lightning's `ModelParallelStrategy`): `trainer.strategy: fsdp` is the name
# Lightning registers for this strategy, so the recipe key means what Lightning's docs say; it
# runs on CPU with gloo (the tests) as on GPUs with NCCL; and Lightning 2.6 marks
# `ModelParallelStrategy` experimental.
#
# Which modules are FSDP roots. Lightning wraps the whole LightningModule in one root unit unless
# `configure_model` wrapped something already. walt's diffusion step optimises by hand, so its
# backward runs inside the training step; were the LightningModule the root, that backward would
# run inside the root's forward, before the root's output exists, and FSDP's end-of-backward
# callback (queued by the root's output) would never run: the units stay in their post-backward
# state and the checkpoint that follows fails. So `DiffusionSystem.configure_model` makes the
# trained transformer a root of its own (one unit per block inside it) and its EMA copy another;
# the training step's loss comes out of the transformer's forward, as FSDP expects.
#
# With `use_orig_params=True` every parameter outside forward/backward is a view of this rank's
# piece of its unit's flat shard. The network and its EMA copy are wrapped alike, so their flat
# layouts and their per-rank pieces coincide element for element: the EMA update (a lerp over
# `zip(ema.parameters(), net.parameters())`) runs on the local shards, with no communication and
# no full copy of the weights on any rank, and equals the unsharded update.


def fsdp_strategy(t, section):
    """Lightning's FSDPStrategy for a diffusion stage: activation checkpointing per block where
    `section.gradient_checkpointing`, `trainer.fsdp_checkpoint` (full | sharded) checkpoints,
    float32 gradient reduction under mixed precision. The units are made by `wrap_fsdp`."""
    import torch
    from torch.distributed.fsdp import MixedPrecision

    from walt_cli.models.transformer import WALTBlock

    mixed = None
    low = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(t.precision))
    if low is not None:
        # Lightning's default casts the buffers too (the latent statistics, position tables)
        # and sums gradients in half precision; walt keeps both in float32, as DDP does.
        mixed = MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=None)
    return CrashSafeFSDP(
        activation_checkpointing_policy={WALTBlock} if section.gradient_checkpointing else None,
        state_dict_type=t.fsdp_checkpoint,
        mixed_precision=mixed,
        use_orig_params=True,
    )


def wrap_fsdp(module, strategy):
    """`module` (a WALT) as an FSDP root with one unit per transformer block, under the settings
    of Lightning's FSDP strategy (call inside `configure_model`, where Lightning opens its
    wrapping context). The device is given as a `torch.device`: Lightning passes the root
    device's index, None on the CPU, and FSDP then looks for an accelerator and refuses to run."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, wrap

    from walt_cli.models.transformer import WALTBlock

    if isinstance(module, FullyShardedDataParallel):  # configure_model may run more than once
        return module
    return wrap(
        module, auto_wrap_policy=ModuleWrapPolicy({WALTBlock}), device_id=strategy.root_device
    )


def _strategy_base():
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy


class CrashSafeFSDP(_strategy_base()):
    """FSDPStrategy whose checkpoints are crash safe and read with `weights_only`.

    A full checkpoint is one file written by rank 0 through walt's `AtomicCheckpointIO`.
    A sharded one is a folder (each rank's shard and the metadata): it is written beside the
    target as `<name>.partial/` and swapped in (`runio.replace_dir`), so a kill or a full disk
    leaves the previous checkpoint. Lightning reads a full checkpoint with a lazy unpickler;
    walt reads it with `torch.load(weights_only=True)` first, which refuses anything but
    tensors and primitives and turns a damaged file into one line.
    """

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from pathlib import Path

        from walt_cli.runio import partial_dir, replace_dir

        path = Path(self.broadcast(str(filepath)))
        partial = partial_dir(path)
        if self.is_global_zero:
            replace_dir(None, partial)  # what a killed save left
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()
        if self.is_global_zero:
            replace_dir(partial, path)
        self.barrier()
        return None

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from pathlib import Path

        from walt_cli.runio import torch_load

        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_file():
            torch_load(path)  # weights_only, one-line errors (see the class docstring)
        with self._full_state_dicts_in_place():
            return super().load_checkpoint(path, weights_only=True)

    def lightning_module_state_dict(self):
        with self._full_state_dicts_in_place():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with self._full_state_dicts_in_place():
            return super().optimizer_state(optimizer)

    @contextlib.contextmanager
    def _full_state_dicts_in_place(self):
        """On the CPU, Lightning's full state dicts without `offload_to_cpu`. Lightning always
        asks FSDP to offload them to the CPU; on a CPU device FSDP's offload "moves" the gathered
        weights where they already are and then frees their storage, which the weights still
        view (torch.distributed.fsdp._flat_param `to_cpu`): the copy that follows reads freed
        memory and the process dies (SIGSEGV). Lightning builds the context in one module-level
        function, swapped here for the duration of the call (each rank is one thread)."""
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.pytorch.strategies.fsdp as lightning_fsdp

        original = lightning_fsdp._get_full_state_dict_context
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_in_place
        try:
            yield
        finally:
            lightning_fsdp._get_full_state_dict_context = original


def _full_state_dict_context_in_place(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    del world_size  # the signature of Lightning's function
    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(
            offload_to_cpu=False, rank0_only=rank0_only
        ),
    )


def sharded_grad_norm(params, device):
    """The 2-norm of the whole gradient when each rank holds a shard of it (FSDP with
    `use_orig_params`: `p.grad` is this rank's piece of `p`'s gradient, or None when `p` lies
    on other ranks): the local sums of squares, all-reduced. Not
    `FullyShardedDataParallel.clip_grad_norm_`, which handles one root unit only (walt's EMA is
    a second root) and asserts that its root is idle."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    squares = local.to(device=device, dtype=torch.float32).square()
    dist.all_reduce(squares)
    return squares.sqrt()


def full_state_dict(module, trainer=None) -> dict | None:
    """`module`'s full state dict (float tensors on the CPU). Under FSDP every rank must call
    this (the shards are gathered) and only rank zero gets the dict; the others get None."""
    if trainer is None or not is_sharded(trainer.strategy):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # No offload from a CPU device (see `CrashSafeFSDP._full_state_dicts_in_place`).
    on_cpu = trainer.strategy.root_device.type == "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
    state = get_model_state_dict(module, options=options)
    return state if trainer.is_global_zero else None


@contextlib.contextmanager
def trainer_errors(t):
    """What Lightning raises for a trainer section it cannot run, as one line naming the keys."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WaltError(
            f"trainer: Lightning cannot run accelerator={t.accelerator} devices={t.devices} "
            f"num_nodes={t.num_nodes} strategy={t.strategy} precision={t.precision}: {first}"
        ) from None
