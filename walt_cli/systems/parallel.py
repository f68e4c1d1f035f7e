"""Data-parallel structure of the training systems under DDP (and what FSDP needs).

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


def strategy_for(recipe):
    """`trainer.strategy` as Lightning takes it (a registered name, or a strategy object for
    the keys walt adds to it)."""
    return str(recipe.trainer.strategy)


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
