"""Adversarial losses for tokenizer training (SPEC_WALT.md §1; MAGVIT v1/v2, StyleGAN2).

- non-saturating GAN loss: D minimises softplus(-D(real)) + softplus(D(fake)); G minimises
  softplus(-D(fake));
- r1 gradient penalty: E ||grad_x D(x_real)||^2 (the caller weights it, e.g. cost 10);
- LeCam regularisation (Tseng et al., 2021): keeps D's outputs near the exponential moving
  averages of its outputs on the other side, relu(D_real - ema_fake)^2 + relu(ema_real - D_fake)^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared gradient norm of D at the real inputs.

    `real_inputs` must have requires_grad=True and `real_logits` must come from them.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class LeCam(nn.Module):
    """LeCam regulariser with its two EMAs kept as buffers (so they are checkpointed)."""

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        self.ema_real.lerp_(real_logits.detach().float().mean(), 1 - self.decay)
        self.ema_fake.lerp_(fake_logits.detach().float().mean(), 1 - self.decay)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.relu(real_logits.mean() - self.ema_fake).pow(2) + F.relu(
            self.ema_real - fake_logits.mean()
        ).pow(2)
