"""The training loss [P §3-4, Eq. 2]: v-prediction MSE with self-conditioning, frame-prediction
conditioning and condition dropout for classifier-free guidance.

One step, for clean latents z0 (B, c, T, h, w):
1. draw a step i ~ U{0..N-1} per sample, t = i / (N - 1), eps ~ N(0, I); z_t = q_sample(z0, eps);
2. with probability `p_frame_pred` a sample conditions on its first 1 or 2 clean latent frames
   (c_fp = [m * z0, m]); the loss skips those frames;
3. condition dropout: with probability `p_cond_drop` a sample loses its class label (null class),
   caption (mask all False) and frame condition (those named in `cond_drop`), which trains the
   unconditional branch of classifier-free guidance;
4. self-conditioning [P §4.3]: with probability `p_self_cond` a sample's estimate
   x0~ = v_to_x0(z_t, f(z_t; 0)) from a first pass without gradient is fed back; the others get
   zeros. The first pass is skipped when no sample is chosen;
5. loss = mean over non-conditioning frames of (f(z_t; x0~, c, t) - v)^2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from walt_cli.diffusion.inputs import frame_prediction_mask, model_input
from walt_cli.diffusion.schedules import NoiseSchedule, q_sample, v_from_x0_eps, v_to_x0
from walt_cli.models.transformer import Conditioning

Network = Callable[[Tensor, Tensor, Conditioning], Tensor]


@dataclass
class LossOutput:
    """The scalar loss and what went into it (for logging)."""

    loss: Tensor  # () scalar
    t: Tensor  # (B,) diffusion times
    frame_mask: Tensor  # (B, T) conditioning frames
    self_cond: Tensor  # (B,) samples that were self-conditioned
    dropped: Tensor  # (B,) samples whose conditions were dropped


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t -> s t / (1 + (s - 1) t): the odds t / (1 - t) times s, 0 and 1 kept, the order kept.
    Under rectified flow (x_t = (1 - t) x0 + t eps) those odds are the noise-to-signal ratio, and
    this is the shift by which SD3 and Open-Sora train larger or longer samples nearer to noise;
    here it moves the times drawn on the paper's schedule the same way. s = 1 returns t itself,
    the paper's uniform draw bit for bit."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _bernoulli(p: float, batch: int, generator, device) -> Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def diffusion_loss(
    net: Network,
    z0: Tensor,
    cond: Conditioning | None,
    schedule: NoiseSchedule,
    *,
    p_self_cond: float = 0.9,
    p_frame_pred: float = 0.0,
    num_cond_frames: tuple[int, ...] = (1, 2),
    p_cond_drop: float = 0.0,
    cond_drop: Sequence[str] = ("labels", "text", "frames"),
    lowres: Tensor | None = None,
    generator: torch.Generator | None = None,
    lockstep: bool = False,
    step: Tensor | None = None,
    time_shift: float = 1.0,
) -> LossOutput:
    """v-prediction MSE of `net(x_in, t, cond)` on clean latents z0 (B, c, T, h, w).

    `lowres` (B, c, T, h/f, w/f) is an SR stage's (already noise-augmented) low-res latent; the
    caller sets `cond.noise_level` to its augmentation level (`inputs.noise_augment`).
    `cond_drop` names the conditions that condition dropout removes (together, with probability
    `p_cond_drop`); guidance at sampling should drop the same ones. `generator` makes every
    random draw (t, noise, masks, dropout) reproducible. `lockstep`: every rank must run the
    same forward passes whatever its draws (FSDP, where each forward gathers weights from all
    ranks), so the self-conditioning pass is never skipped. `step` (B,) fixes each sample's
    diffusion step (0..N-1) instead of drawing it (a probe of the loss at chosen noise levels);
    the draw is still made, so the noise and masks are the same with or without it.
    `time_shift` s > 1 moves the drawn times toward pure noise, t -> s t / (1 + (s - 1) t)
    (`shift_time`); 1 keeps the paper's uniform draw. A fixed `step` is never shifted.
    """
    cond = cond if cond is not None else Conditioning()
    b, _, frames = z0.shape[:3]
    device = z0.device

    drawn = torch.randint(schedule.num_steps, (b,), generator=generator, device=device)
    if step is None:
        t = shift_time(drawn.float() / (schedule.num_steps - 1), time_shift)  # (B,)
    else:
        t = step.to(device=device, dtype=drawn.dtype).float() / (schedule.num_steps - 1)
    alpha_bar = schedule.at(t)
    eps = torch.randn(z0.shape, generator=generator, device=device, dtype=z0.dtype)
    z_t = q_sample(z0, eps, alpha_bar)
    target = v_from_x0_eps(z0, eps, alpha_bar)

    mask = frame_prediction_mask(
        b,
        frames,
        p_frame_pred,
        num_cond_frames=num_cond_frames,
        is_image=cond.is_image,
        generator=generator,
        device=device,
    )
    # No host sync on the step's hot path: dropout goes through `where` (a no-op for samples not
    # dropped), and the self-conditioning pass runs whenever it can be chosen (on the CPU, where
    # reading the draw costs nothing, it is still skipped when no sample is chosen, unless the
    # ranks run in lockstep).
    dropped = _bernoulli(p_cond_drop, b, generator, device)
    if p_cond_drop > 0:
        cond = cond.dropped(dropped, labels="labels" in cond_drop, text="text" in cond_drop)
        if "frames" in cond_drop:
            mask = mask & ~dropped[:, None]

    def inputs(self_cond: Tensor | None) -> Tensor:  # the sampler builds x_in the same way
        return model_input(
            z_t,
            alpha_bar,
            self_cond=self_cond,
            frame_latents=z0,
            frame_mask=mask,
            frame_noise=eps,
            lowres=lowres,
        )

    chosen = _bernoulli(p_self_cond, b, generator, device)
    self_cond = torch.zeros_like(z0)
    if p_self_cond > 0 and (lockstep or device.type != "cpu" or bool(chosen.any())):
        with torch.no_grad():
            x0_hat = v_to_x0(z_t, net(inputs(None), t, cond), alpha_bar)
        self_cond = torch.where(chosen.view(-1, 1, 1, 1, 1), x0_hat.detach(), self_cond)

    v_hat = net(inputs(self_cond), t, cond)

    weight = (~mask).to(z0.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1): generated frames
    per_element = (v_hat.float() - target.float()) ** 2 * weight
    count = weight.sum() * z0.shape[1] * z0.shape[3] * z0.shape[4]
    loss = per_element.sum() / count.clamp(min=1)
    return LossOutput(loss=loss, t=t, frame_mask=mask, self_cond=chosen, dropped=dropped)
