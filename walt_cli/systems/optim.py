"""Optimisers of the training systems.

Adafactor (the paper's optimiser for the text-to-video base) is transformers' implementation
with parameter scaling and relative steps off (`scale_parameter=False, relative_step=False`):
the step is `lr` times the factored second-moment update, clipped by its RMS, and the learning
rate schedule is the system's warmup + cosine. Two things rule out `torch.optim.Adafactor`:

- it scales every step by the parameter's RMS (floored at 1e-3), so the zero-initialised
  layers of W.A.L.T (AdaLN-Zero modulation, AdaLN-LoRA's up-projection, the final layer) move at
  about lr x 1e-3: on the tiny model A_1's RMS was 1.5e-7 after 200 steps against 7e-3 with
  AdamW;
- it reads the parameter's and the update's norms with `.item()` for every tensor, a host
  synchronisation per tensor on a GPU.

transformers' loop keeps those norms as tensors (no `.item()`), so a step never waits on the
device.
"""

from __future__ import annotations

import torch


def adafactor(params, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(
        params,
        lr=lr,
        scale_parameter=False,  # no RMS(param) factor: zero-initialised layers train
        relative_step=False,  # the lr (and its schedule) is the step size
        warmup_init=False,
        weight_decay=weight_decay,
    )
