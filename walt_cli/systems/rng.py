"""Random streams of a training run: one seed per rank, RNG states in the checkpoint, and a data
order that resumes mid-epoch (DESIGN.md §5, "Distributed training").

- Each rank draws its noise, timesteps, masks and dropout from its own seed, derived from the
  run seed and the global rank by numpy's `SeedSequence` (a well-kept derivation whose children
  are statistically independent, unlike `seed + rank`, whose streams overlap for some
  generators). N ranks therefore train on N different draws.
- `RandomState`, a Lightning callback, seeds each rank when the strategy has started it, saves
  every rank's torch / CUDA / numpy / python RNG states and the data order's place into
  `last.ckpt` (primitives and tensors only, so a resume loads with `weights_only=True`), and
  restores them when training starts again. A run stopped at step k and resumed draws what an
  uninterrupted run draws.
- `ResumableSampler` shards the data over the ranks itself (the trainer runs with
  `use_distributed_sampler=False`): epoch e's order is a pure function of (run seed, e), the same
  on every rank, and each rank takes every world-th index, as `DistributedSampler` does. Its
  state is (epoch, samples already taken this epoch), so a resumed epoch skips what was
  trained on and the epoch boundaries fall where they would have.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Sampler

log = logging.getLogger("walt.rng")


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """A 31-bit seed for `rank` of a run seeded with `seed` (and optional further keys)."""
    return (
        int(np.random.SeedSequence([int(seed), int(rank), *map(int, extra)]).generate_state(1)[0])
        & 0x7FFFFFFF
    )


def seed_rank(seed: int, rank: int) -> int:
    """Seed python, numpy and torch (every device) for `rank`; returns the seed used."""
    import lightning as L

    s = rank_seed(seed, rank)
    L.seed_everything(s, workers=True, verbose=False)
    return s


def world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# RNG states as checkpoint-safe values


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors, ints and lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("the checkpoint's CUDA RNG states are for another device count: reseeded")


# ---------------------------------------------------------------------------------------------
# Data order


class ResumableSampler(Sampler[int]):
    """Per-rank indices of a shuffled (or weighted, with replacement) epoch that can resume.

    Args:
        num_items: items in the data set.
        seed: the run seed (the same on every rank: all ranks share one order and take
            disjoint slices of it).
        shuffle: False keeps the data set's order (validation).
        weights: per-item draw weights: the epoch draws `num_samples` with replacement
            (`torch.multinomial`, what `WeightedRandomSampler` does).
        num_samples: draws per epoch over all ranks (default num_items).
    """

    def __init__(
        self,
        num_items: int,
        *,
        seed: int,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> None:
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = int(num_samples or num_items)
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples already taken)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = int(epoch)

    def __len__(self) -> int:
        _, size = world()
        return -(-self.num_samples // size)  # ceil: short ranks wrap around, as DistributedSampler

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ranks' indices of `epoch` (before sharding)."""
        g = torch.Generator().manual_seed(rank_seed(self.seed, 0, epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, True, generator=g)
        if not self.shuffle:
            return torch.arange(self.num_items)
        return torch.randperm(self.num_items, generator=g)[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        rank, size = world()
        order = self.epoch_order(self.epoch)
        total = len(self) * size
        if total > len(order):  # pad by wrapping, so every rank takes the same number of steps
            order = torch.cat([order, order[: total - len(order)]])
        mine = order[rank:total:size]
        resume, self.resume_at = self.resume_at, None
        skip = resume[1] if resume is not None and resume[0] == self.epoch else 0
        return iter(mine[skip:].tolist())


def train_sampler(loader) -> ResumableSampler | None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        return sampler
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    return sampler if isinstance(sampler, ResumableSampler) else None


class RandomState(Callback):
    """Seeds each rank from the run seed, and saves and restores every rank's random streams and
    the data order's place with the checkpoint (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch, self.batches = 0, 0  # training batches taken in this epoch
        self._loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "walt_random_state"

    def setup(self, trainer, pl_module, stage: str) -> None:
        seed_rank(self.seed, trainer.global_rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch:
            self.epoch, self.batches = trainer.current_epoch, 0
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        """Every rank's states (gathered; called on all ranks when a checkpoint is written)."""
        import torch.distributed as dist

        mine = capture_rng()
        rank, size = world()
        if size > 1:
            states: list[Any] = [None] * size
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"seed": self.seed, "ranks": states, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def on_train_start(self, trainer, pl_module) -> None:
        """Restore after everything that set-up draws, right before the first resumed step."""
        state, self._loaded = self._loaded, None
        if state is None:
            return
        rank, size = trainer.global_rank, trainer.world_size
        ranks = state["ranks"]
        if len(ranks) == size:
            restore_rng(ranks[rank])
        else:
            seed_rank(self.seed, rank + 1_000_003 * int(pl_module.global_step))
            log.warning(
                "the checkpoint holds random states of %d ranks, this run has %d: each rank is "
                "reseeded from the run seed and the step, so the stream differs from an "
                "uninterrupted run", len(ranks), size,
            )  # fmt: skip
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        loader = trainer.train_dataloader
        sampler = train_sampler(loader)
        if sampler is not None and len(ranks) == size:
            sampler.resume_at = (self.epoch, self.batches * loader.batch_size)
