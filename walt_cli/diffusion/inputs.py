"""The network's input channels and the frame-prediction masks [P §4.3-4.4, SPEC §2.1].

Channel order of x_in (B, C_in, T, h, w), documented once here and relied on by the network:

    [ z_t (c) | self-conditioning estimate x0~ (c) | m * z (c) | m (1) | low-res latent (c, SR) ]

- z_t: the noisy latent;
- x0~: the self-conditioning estimate (zeros when there is none);
- [m * z, m]: the frame-prediction condition c_fp, clean latents of the conditioning frames
  (m = 1 on them, 0 elsewhere) and the mask itself;
- low-res latent (SR stages only): the previous stage's latent repeated f x f (nearest) to the
  grid; the network reads one value per cell and upsamples it with its depth-to-space conv.

With c = 8: 25 channels for a base model, 33 for an SR stage.

`model_input` is the one place that turns a noisy latent and its conditions into x_in, for the
training loss and for every sampling step alike (DESIGN §5): the conditioning frames of z_t are
their clean latents noised to the current time with their own fixed noise (what `q_sample` gives
in training), never the sampler's drifting estimate of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from walt_cli.diffusion.schedules import NoiseSchedule, q_sample
from walt_cli.errors import WaltError


def input_channels(latent_channels: int, *, lowres: bool = False) -> int:
    """C_in for latent width c: 3c + 1 (+ c for an SR stage)."""
    return 3 * latent_channels + 1 + (latent_channels if lowres else 0)


def frame_mask_channel(mask: Tensor | None, like: Tensor) -> Tensor:
    """m as a channel (B, 1, T, h, w) from a per-frame mask (B, T) (None = no conditioning)."""
    b, _, t, h, w = like.shape
    if mask is None:
        return like.new_zeros(b, 1, t, h, w)
    if mask.shape != (b, t):
        raise WaltError(f"frame mask must have shape ({b}, {t}), got {tuple(mask.shape)}")
    return mask.to(like.dtype)[:, None, :, None, None].expand(b, 1, t, h, w)


def upsample_lowres(lowres: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, c, T, h/f, w/f) -> (B, c, T, h, w) by repeating each value f x f (nearest)."""
    h, w = grid
    lh, lw = lowres.shape[-2:]
    if h % lh or w % lw or h // lh != w // lw:
        raise WaltError(f"low-res latent {lh}x{lw} does not divide the latent grid {h}x{w} evenly")
    f = h // lh
    return lowres.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def build_model_input(
    z_t: Tensor,
    *,
    self_cond: Tensor | None = None,
    frame_latents: Tensor | None = None,
    frame_mask: Tensor | None = None,
    lowres: Tensor | None = None,
) -> Tensor:
    """Concatenate the channels in the documented order: (B, C_in, T, h, w).

    z_t (B, c, T, h, w); self_cond (B, c, T, h, w) or None (zeros); frame_latents (B, c, T, h, w)
    clean latents (only the masked frames are read); frame_mask (B, T) bool; lowres
    (B, c, T, h/f, w/f) or None (base models: no channels added).
    """
    if z_t.ndim != 5:
        raise WaltError(f"latents must be (B, c, T, h, w), got shape {tuple(z_t.shape)}")
    self_cond = torch.zeros_like(z_t) if self_cond is None else self_cond
    m = frame_mask_channel(frame_mask, z_t)  # (B, 1, T, h, w)
    frames = torch.zeros_like(z_t) if frame_latents is None else frame_latents * m
    parts = [z_t, self_cond, frames, m]
    if lowres is not None:
        parts.append(upsample_lowres(lowres, z_t.shape[-2:]).to(z_t.dtype))
    return torch.cat(parts, dim=1)


def model_input(
    z_t: Tensor,
    alpha_bar: Tensor,
    *,
    self_cond: Tensor | None = None,
    frame_latents: Tensor | None = None,
    frame_mask: Tensor | None = None,
    frame_noise: Tensor | None = None,
    frame_channels: bool = True,
    lowres: Tensor | None = None,
) -> Tensor:
    """x_in (B, C_in, T, h, w) at one diffusion time, shared by the loss and the sampler.

    z_t (B, c, T, h, w) the noisy latent at alpha_bar (B,); frame_latents (B, c, T, h, w) clean
    latents of the conditioning frames `frame_mask` (B, T) and frame_noise (B, c, T, h, w) their
    noise: on those frames z_t becomes q_sample(frame_latents, frame_noise, alpha_bar), as in
    training, where it is that already. `frame_channels` False keeps the frames out of the
    [m * z, m] channels (the unconditional branch of guidance on frames, condition dropout, or a
    stage not trained on frame conditioning: the frames then act through z_t alone).
    """
    if frame_latents is not None and frame_mask is not None:
        if frame_noise is None:
            raise WaltError("conditioning frames need their noise (frame_noise) to enter z_t")
        m = frame_mask_channel(frame_mask, z_t).bool()  # (B, 1, T, h, w)
        noised = q_sample(frame_latents.to(z_t.dtype), frame_noise.to(z_t.dtype), alpha_bar)
        z_t = torch.where(m, noised, z_t)
    keep = frame_channels and frame_mask is not None
    return build_model_input(
        z_t,
        self_cond=self_cond,
        frame_latents=frame_latents if keep else None,
        frame_mask=frame_mask if keep else None,
        lowres=lowres,
    )


def frame_prediction_mask(
    batch: int,
    frames: int,
    p: float,
    *,
    num_cond_frames: tuple[int, ...] = (1, 2),
    is_image: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(B, T) bool: with probability `p` a sample conditions on its first k latent frames, k drawn
    uniformly from `num_cond_frames` (1 = image-to-video, 2 = prediction from 5 pixel frames,
    the K600 task) [P §4.4]. Image samples (independent frames) never condition."""
    if batch == 0:
        return torch.zeros(0, frames, dtype=torch.bool, device=device)
    ks = torch.tensor([min(k, frames - 1) for k in num_cond_frames], device=device)
    use = torch.rand(batch, generator=generator, device=device) < p
    pick = torch.randint(len(ks), (batch,), generator=generator, device=device)
    k = torch.where(use, ks[pick], torch.zeros_like(ks[pick]))  # (B,)
    if is_image is not None:
        k = torch.where(is_image.to(device).bool(), torch.zeros_like(k), k)
    return torch.arange(frames, device=device)[None] < k[:, None]


def first_frames_mask(
    batch: int, frames: int, k: int, device: torch.device | str = "cpu"
) -> Tensor:
    """(B, T) bool conditioning on the first k latent frames (sampling-time frame prediction)."""
    if not 0 <= k <= frames:
        raise WaltError(f"cannot condition on {k} latent frames of a {frames}-frame clip")
    return (torch.arange(frames, device=device) < k)[None].expand(batch, frames)


def noise_augment(
    lowres: Tensor,
    schedule: NoiseSchedule,
    max_level: float,
    *,
    level: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """SR noise-conditioning augmentation [P §5.3]: noise the low-res latent (B, c, T, h', w') to
    a level t_sr ~ U(0, max_level) (or the given `level` (B,), e.g. a fixed value at sampling)
    along the same schedule. Returns (noisy latent, t_sr); pass t_sr as
    `Conditioning.noise_level`."""
    b = lowres.shape[0]
    if level is None:
        level = torch.rand(b, generator=generator, device=lowres.device) * max_level
    eps = torch.randn(lowres.shape, generator=generator, device=lowres.device, dtype=lowres.dtype)
    return q_sample(lowres, eps, schedule.at(level)), level
