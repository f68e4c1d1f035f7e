"""Sampling: DDIM [Song et al. 2021] with "trailing" timesteps, self-conditioning and
classifier-free guidance [P §3, §4.4; SPEC §3]. Pure functions; progress is reported through a
callback, never printed here.

    model_fn(x_t, t, x0_prev) -> v      x_t (B, c, T, h, w), t (B,), x0_prev the previous step's
                                        x0 estimate (None at the first step) for self-conditioning
    ddim(model_fn, noise, timesteps, schedule=...) -> x0

The last DDIM step goes to alpha_bar = 1, i.e. returns the model's final x0 estimate (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from walt_cli.diffusion.inputs import model_input
from walt_cli.diffusion.schedules import NoiseSchedule, v_to_eps, v_to_x0
from walt_cli.errors import WaltError
from walt_cli.models.transformer import Conditioning

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
Condition = Literal["labels", "text", "frames"]


@dataclass
class DDIMStep:
    """What a progress callback receives after each step."""

    index: int  # 0-based step number
    total: int  # number of steps
    t: float  # the time just denoised
    x: Tensor  # the new latent (x at the next time; x0 after the last step)
    x0: Tensor  # the model's x0 estimate at this step


def ddim_timesteps(
    num_steps: int,
    num_train_steps: int = 1000,
    spacing: Literal["trailing", "leading", "linspace"] = "trailing",
) -> Tensor:
    """Descending times t in [0, 1] for `num_steps` DDIM steps over a `num_train_steps` table.

    "trailing" (Lin et al. 2023, Table 2) starts at the last step (t = 1, pure noise under zero
    terminal SNR): 50 of 1000 gives steps 999, 979, ..., 19."""
    if not 1 <= num_steps <= num_train_steps:
        raise WaltError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    n = num_train_steps
    if spacing == "trailing":
        steps = torch.round(torch.arange(n, 0, -n / num_steps, dtype=torch.float64)) - 1
    elif spacing == "leading":
        steps = torch.arange(0, num_steps, dtype=torch.float64).flip(0) * (n // num_steps)
    elif spacing == "linspace":
        steps = torch.linspace(n - 1, 0, num_steps, dtype=torch.float64).round()
    else:
        raise WaltError(f"unknown timestep spacing {spacing!r}")
    return (steps / (n - 1)).float()


@torch.no_grad()
def ddim(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor | Sequence[float],
    *,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[DDIMStep], None] | None = None,
) -> Tensor:
    """Run DDIM from x (B, c, T, h, w) at timesteps[0] down through `timesteps` (descending t);
    the step after the last goes to alpha_bar = 1 and returns x0.

    x_{s} = sqrt(a_s) x0^ + sqrt(1 - a_s - sigma^2) eps^ + sigma z, with
    sigma = eta * sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).
    """
    timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=x.device)
    total = timesteps.numel()
    b = x.shape[0]
    x0_prev: Tensor | None = None
    for i in range(total):
        t = timesteps[i]
        a_t = schedule.at(t)
        a_s = schedule.at(timesteps[i + 1]) if i + 1 < total else torch.ones_like(a_t)
        v = model_fn(x, t.expand(b), x0_prev)
        x0 = v_to_x0(x, v, a_t)
        eps = v_to_eps(x, v, a_t)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < total:
            x = x + sigma * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
        x0_prev = x0
        if callback is not None:
            callback(DDIMStep(index=i, total=total, t=float(t), x=x, x0=x0))
    return x


def guided(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in v: v_u + s (v_c - v_u) (s = 1 is the conditional model)."""
    return v_uncond + scale * (v_cond - v_uncond)


def denoiser(
    net: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning | None = None,
    *,
    frame_latents: Tensor | None = None,
    frame_mask: Tensor | None = None,
    lowres: Tensor | None = None,
    guidance_scale: float | None = None,
    guide: Sequence[Condition] = ("labels", "text", "frames"),
    self_condition: bool = True,
    schedule: NoiseSchedule | None = None,
    frame_noise: Tensor | None = None,
    frame_channels: bool = True,
) -> ModelFn:
    """Wrap the network as a `model_fn` for `ddim`: builds the input channels with
    `inputs.model_input` (self-conditioning estimate, conditioning frames, low-res latent) and
    applies classifier-free guidance.

    Conditioning frames (`frame_latents`, `frame_mask`) need the `schedule` and their
    `frame_noise` (B, c, T, h, w): at each step their z_t is q_sample(frame_latents, frame_noise,
    alpha_bar(t)), as in training. `frame_channels` False keeps them out of the [m * z, m]
    channels (a stage not trained on frame conditioning: the frames then act through z_t alone).

    `guidance_scale` None runs the conditional model alone. A number runs the conditional and
    the unconditional branch in one batch, the latter with the conditions in `guide` dropped
    (null class, no caption, no frame channels), and mixes them; scale 1 is the conditional
    model alone (the unconditional branch is skipped: the result is bitwise the unguided one).
    """
    cond = cond if cond is not None else Conditioning()
    unknown = set(guide) - {"labels", "text", "frames"}
    if unknown:
        raise WaltError(f"unknown guidance condition {sorted(unknown)[0]!r}")
    if frame_mask is not None and schedule is None:
        raise WaltError("frame conditioning needs the noise schedule (schedule=...)")

    def model_fn(x: Tensor, t: Tensor, x0_prev: Tensor | None) -> Tensor:
        sc = x0_prev if (self_condition and x0_prev is not None) else None
        alpha_bar = schedule.at(t) if schedule is not None else None

        def inputs(channels: bool) -> Tensor:
            return model_input(
                x,
                alpha_bar,
                self_cond=sc,
                frame_latents=frame_latents,
                frame_mask=frame_mask,
                frame_noise=frame_noise,
                frame_channels=channels,
                lowres=lowres,
            )

        x_in = inputs(frame_channels)
        if guidance_scale is None or guidance_scale == 1.0:  # v_u + 1 (v_c - v_u) = v_c exactly
            return net(x_in, t, cond)
        b = x.shape[0]
        drop = torch.ones(b, dtype=torch.bool, device=x.device)
        uncond = cond.dropped(drop, labels="labels" in guide, text="text" in guide)
        if "frames" in guide and frame_mask is not None and frame_channels:
            x_un = inputs(False)
        else:
            x_un = x_in
        v = net(torch.cat([x_in, x_un]), torch.cat([t, t]), cond.cat(uncond))
        return guided(v[:b], v[b:], guidance_scale)

    return model_fn


def sample(
    net: Callable[[Tensor, Tensor, Conditioning], Tensor],
    noise: Tensor,
    cond: Conditioning | None,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: Literal["trailing", "leading", "linspace"] = "trailing",
    frame_latents: Tensor | None = None,
    frame_mask: Tensor | None = None,
    lowres: Tensor | None = None,
    guidance_scale: float | None = None,
    guide: Sequence[Condition] = ("labels", "text", "frames"),
    self_condition: bool = True,
    frame_channels: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[DDIMStep], None] | None = None,
) -> Tensor:
    """Generate latents from `noise` (B, c, T, h, w) with DDIM (50 trailing steps by default, as
    in the paper). Conditioning frames (`frame_mask` (B, T)) enter every step noised with their
    part of `noise` (as in training) and are returned as given."""
    model_fn = denoiser(
        net,
        cond,
        frame_latents=frame_latents,
        frame_mask=frame_mask,
        lowres=lowres,
        guidance_scale=guidance_scale,
        guide=guide,
        self_condition=self_condition,
        schedule=schedule,
        frame_noise=noise,
        frame_channels=frame_channels,
    )
    timesteps = ddim_timesteps(num_steps, schedule.num_steps, spacing)
    z = ddim(
        model_fn,
        noise,
        timesteps,
        schedule=schedule,
        eta=eta,
        generator=generator,
        callback=callback,
    )
    if frame_latents is not None and frame_mask is not None:
        keep = frame_mask.to(z.device)[:, None, :, None, None]
        z = torch.where(keep, frame_latents.to(z.dtype), z)
    return z
