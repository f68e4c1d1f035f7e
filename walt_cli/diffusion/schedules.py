"""Noise schedules and the conversions between v, eps and x0 [P §3, SPEC §3].

Forward process: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alpha_bar(t) decreasing from ~1
(t = 0) to 0 (t = 1, zero terminal SNR). Target: v = sqrt(a) eps - sqrt(1 - a) x0
(Salimans & Ho 2022). Every conversion goes through v with the identities
    x0  = sqrt(a) x_t - sqrt(1 - a) v
    eps = sqrt(1 - a) x_t + sqrt(a) v
which never divide, so t = 1 (a = 0, pure noise) is as valid as any other time.

Time: t in [0, 1] indexes the discrete table by step = t * (N - 1) (N = 1000 training steps);
between steps alpha_bar is interpolated linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from walt_cli.errors import WaltError

ScheduleKind = Literal["linear", "cosine"]


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear beta schedule (float64)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_alpha_bar(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule as an alpha_bar table (betas clipped at `max_beta`)."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last step is 0
    (zero terminal SNR) and the first is unchanged."""
    root = alpha_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete alpha_bar table, step 0 (least noise) to N - 1 (pure noise when rescaled)."""

    alpha_bar: Tensor  # (N,) float64, decreasing
    # the table on each device it was asked on: one host-to-device copy, not one per call
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.shape[0]

    def table(self, device: torch.device) -> Tensor:
        """The alpha_bar table (float64) on `device`, copied there once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.alpha_bar.to(device)
        return self._on_device[key]

    def at(self, t: Tensor) -> Tensor:
        """alpha_bar at continuous times t in [0, 1] (any shape), float32 on t's device."""
        table = self.table(t.device)
        pos = t.double().clamp(0, 1) * (self.num_steps - 1)
        lo = pos.floor().long().clamp(max=self.num_steps - 1)
        hi = (lo + 1).clamp(max=self.num_steps - 1)
        frac = pos - lo
        return (table[lo] * (1 - frac) + table[hi] * frac).float()

    def step_time(self, step: Tensor | int) -> Tensor:
        """t of a discrete step index (step / (N - 1))."""
        return torch.as_tensor(step, dtype=torch.float32) / (self.num_steps - 1)


def make_schedule(
    kind: ScheduleKind = "linear",
    num_steps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_terminal_snr: bool = True,
) -> NoiseSchedule:
    """The paper's schedule by default: 1000 linear betas 1e-4 -> 0.02, rescaled to zero
    terminal SNR [P Table 8]; `cosine` is selectable."""
    if kind == "linear":
        alpha_bar = torch.cumprod(1 - linear_betas(num_steps, beta_start, beta_end), dim=0)
    elif kind == "cosine":
        alpha_bar = cosine_alpha_bar(num_steps)
    else:
        raise WaltError(f"unknown noise schedule {kind!r}; choose 'linear' or 'cosine'")
    if zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
    return NoiseSchedule(alpha_bar)


# ---------------------------------------------------------------- conversions (all through v)


def expand_like(alpha_bar: Tensor, x: Tensor) -> Tensor:
    """Broadcast alpha_bar (B,) or per-frame (B, T) to x (B, C, T, H, W)."""
    if alpha_bar.ndim == 0:
        return alpha_bar.to(x.dtype)
    if alpha_bar.ndim == 1:
        return alpha_bar.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    if alpha_bar.ndim == 2 and x.ndim == 5:
        return alpha_bar[:, None, :, None, None].to(x.dtype)
    raise WaltError(f"alpha_bar of shape {tuple(alpha_bar.shape)} does not fit x {tuple(x.shape)}")


def _coefficients(alpha_bar: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    a = expand_like(alpha_bar, x).clamp(0, 1)
    return a.sqrt(), (1 - a).sqrt()


def q_sample(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    alpha, sigma = _coefficients(alpha_bar, x0)
    return alpha * x0 + sigma * eps


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v target: sqrt(a) eps - sqrt(1 - a) x0."""
    alpha, sigma = _coefficients(alpha_bar, x0)
    return alpha * eps - sigma * x0


def v_to_x0(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    alpha, sigma = _coefficients(alpha_bar, x_t)
    return alpha * x_t - sigma * v


def v_to_eps(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = sqrt(1 - a) x_t + sqrt(a) v."""
    alpha, sigma = _coefficients(alpha_bar, x_t)
    return sigma * x_t + alpha * v


def x0_to_v(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v that `v_to_x0` maps to x0: (sqrt(a) x_t - x0) / sqrt(1 - a). Defined wherever there is
    noise (a < 1), t = 1 included."""
    alpha, sigma = _coefficients(alpha_bar, x_t)
    return (alpha * x_t - x0) / sigma


def eps_to_v(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The v that `v_to_eps` maps to eps: (eps - sqrt(1 - a) x_t) / sqrt(a). Undefined at a = 0
    (t = 1), where x_t is the noise itself and eps says nothing of x0; prefer v or x0 there."""
    alpha, sigma = _coefficients(alpha_bar, x_t)
    if bool((alpha == 0).any()):
        raise WaltError("eps_to_v is undefined at alpha_bar = 0 (t = 1): eps carries no x0 there")
    return (eps - sigma * x_t) / alpha
