"""Diffusion maths: zero-terminal-SNR schedule, v/eps/x0 conversions, the input channels, the
training loss (self-conditioning, frame prediction, condition dropout), DDIM and guidance."""

from __future__ import annotations

import pytest
import torch

from walt_cli.diffusion.inputs import (
    build_model_input,
    first_frames_mask,
    frame_prediction_mask,
    input_channels,
    noise_augment,
)
from walt_cli.diffusion.losses import diffusion_loss, shift_time
from walt_cli.diffusion.samplers import DDIMStep, ddim, ddim_timesteps, denoiser, sample
from walt_cli.diffusion.schedules import (
    eps_to_v,
    linear_betas,
    make_schedule,
    q_sample,
    v_from_x0_eps,
    v_to_eps,
    v_to_x0,
    x0_to_v,
)
from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT, Conditioning

SCHEDULE = make_schedule()


# ---------------------------------------------------------------- schedules


def test_zero_terminal_snr_schedule():
    plain = torch.cumprod(1 - linear_betas(), 0)
    ab = SCHEDULE.alpha_bar
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    assert ab[-1] == 0.0  # zero terminal SNR
    assert plain[-1] > 1e-5  # the plain linear schedule leaks signal at t = 1
    torch.testing.assert_close(ab[0], plain[0])  # first step unchanged
    torch.testing.assert_close(ab[0], torch.tensor(1 - 1e-4, dtype=torch.float64))
    assert bool((ab[1:] < ab[:-1]).all())
    cosine = make_schedule("cosine").alpha_bar
    assert cosine[-1] == 0.0 and bool((cosine[1:] < cosine[:-1]).all())
    assert make_schedule(zero_terminal_snr=False).alpha_bar[-1] == plain[-1]
    with pytest.raises(WaltError, match="schedule"):
        make_schedule("sigmoid")


def test_schedule_lookup_by_time():
    steps = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(SCHEDULE.at(steps / 999), SCHEDULE.alpha_bar[steps].float())
    assert SCHEDULE.at(torch.tensor(1.0)) == 0
    mid = SCHEDULE.at(torch.tensor(0.5 / 999))  # halfway between steps 0 and 1
    torch.testing.assert_close(mid, SCHEDULE.alpha_bar[:2].mean().float())
    torch.testing.assert_close(SCHEDULE.step_time(999), torch.tensor(1.0))


def test_conversions_invert_each_other_everywhere_including_t1():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 3, 5, 5, generator=g), torch.randn(6, 4, 3, 5, 5, generator=g)
    t = torch.tensor([0.0, 1e-3, 0.3, 0.7, 0.999, 1.0])
    ab = SCHEDULE.at(t)
    assert ab[-1] == 0
    x_t = q_sample(x0, eps, ab)
    v = v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(v_to_x0(x_t, v, ab), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_to_eps(x_t, v, ab), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_to_v(x_t, x0, ab), v, atol=1e-4, rtol=1e-4)
    # at t = 1 the noisy latent is the noise and v = -x0
    torch.testing.assert_close(x_t[-1], eps[-1])
    torch.testing.assert_close(v[-1], -x0[-1])
    # any v is consistent with the x0 and eps it implies, t = 1 included
    w = torch.randn_like(v)
    back = v_from_x0_eps(v_to_x0(x_t, w, ab), v_to_eps(x_t, w, ab), ab)
    torch.testing.assert_close(back, w, atol=1e-5, rtol=1e-5)
    # eps -> v divides by sqrt(a): fine away from t = 1 (ill-conditioned near it), undefined at it
    torch.testing.assert_close(eps_to_v(x_t[:4], eps[:4], ab[:4]), v[:4], atol=1e-4, rtol=1e-4)
    with pytest.raises(WaltError, match="undefined"):
        eps_to_v(x_t, eps, ab)
    # per-frame times (B, T) broadcast over (B, C, T, H, W)
    ab_frames = SCHEDULE.at(torch.rand(6, 3))
    x_t = q_sample(x0, eps, ab_frames)
    torch.testing.assert_close(
        v_to_x0(x_t, v_from_x0_eps(x0, eps, ab_frames), ab_frames), x0, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(x_t[:, :, 1], q_sample(x0[:, :, 1], eps[:, :, 1], ab_frames[:, 1]))


# ---------------------------------------------------------------- inputs


def test_input_channel_order():
    b, c, t, h, w = 2, 8, 5, 8, 8
    z_t, sc, z = torch.randn(b, c, t, h, w), torch.randn(b, c, t, h, w), torch.randn(b, c, t, h, w)
    mask = first_frames_mask(b, t, 2)
    low = torch.randn(b, c, t, 4, 4)
    x = build_model_input(z_t, self_cond=sc, frame_latents=z, frame_mask=mask, lowres=low)
    assert x.shape[1] == input_channels(c, lowres=True) == 33
    torch.testing.assert_close(x[:, :c], z_t)
    torch.testing.assert_close(x[:, c : 2 * c], sc)
    torch.testing.assert_close(x[:, 2 * c : 3 * c, :2], z[:, :, :2])  # m * z: conditioning frames
    assert torch.count_nonzero(x[:, 2 * c : 3 * c, 2:]) == 0
    assert bool((x[:, 3 * c, :2] == 1).all()) and bool((x[:, 3 * c, 2:] == 0).all())
    torch.testing.assert_close(x[:, 3 * c + 1 :, :, ::2, ::2], low)
    torch.testing.assert_close(x[:, 3 * c + 1 :, :, 1::2, 1::2], low)
    plain = build_model_input(z_t)
    assert plain.shape[1] == input_channels(c) == 25
    assert torch.count_nonzero(plain[:, c:]) == 0
    with pytest.raises(WaltError, match="low-res"):
        build_model_input(z_t, lowres=torch.randn(b, c, t, 3, 3))


def test_frame_prediction_masks():
    g = torch.Generator().manual_seed(0)
    assert not frame_prediction_mask(64, 5, 0.0, generator=g).any()
    mask = frame_prediction_mask(400, 5, 1.0, generator=g)
    k = mask.sum(1)
    assert set(k.tolist()) == {1, 2}  # 1 latent frame (image-to-video) or 2 (5 pixel frames)
    assert bool((mask == (torch.arange(5) < k[:, None])).all())  # always the first k frames
    half = frame_prediction_mask(4000, 5, 0.25, generator=g).any(1).float().mean()
    assert 0.2 < half < 0.3
    images = torch.ones(50, dtype=torch.bool)
    assert not frame_prediction_mask(50, 5, 1.0, is_image=images, generator=g).any()


# ---------------------------------------------------------------- loss


class SpyNet(torch.nn.Module):
    """Records its inputs; returns `fn(x_in)` (default zeros) plus a learnable 0 for a graph."""

    def __init__(self, fn=None):
        super().__init__()
        self.zero = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Conditioning, bool]] = []
        self.fn = fn or (lambda x: torch.zeros_like(x[:, :8]))

    def forward(self, x_in, t, cond):
        self.calls.append((x_in.detach().clone(), t, cond, torch.is_grad_enabled()))
        return self.fn(x_in) + self.zero


def test_self_conditioning_feeds_back_x0_without_gradient():
    z0 = torch.randn(3, 8, 5, 4, 4)
    net = SpyNet(lambda x: 0.5 * x[:, :8])
    out = diffusion_loss(net, z0, None, SCHEDULE, p_self_cond=1.0)
    assert len(net.calls) == 2
    (first, t, _, grad1), (second, _, _, grad2) = net.calls
    assert not grad1 and grad2
    assert torch.count_nonzero(first[:, 8:16]) == 0  # first pass: no estimate
    z_t = first[:, :8]
    expected = v_to_x0(z_t, 0.5 * z_t, SCHEDULE.at(t))
    torch.testing.assert_close(second[:, 8:16], expected)  # its x0 is fed back
    assert bool(out.self_cond.all())

    net = SpyNet()
    diffusion_loss(net, z0, None, SCHEDULE, p_self_cond=0.0)
    assert len(net.calls) == 1 and torch.count_nonzero(net.calls[0][0][:, 8:16]) == 0


def test_loss_is_v_mse_and_skips_conditioning_frames():
    z0 = torch.randn(4, 8, 5, 4, 4)
    g = torch.Generator().manual_seed(3)
    out = diffusion_loss(SpyNet(), z0, None, SCHEDULE, p_self_cond=0.0, generator=g)
    # recompute the target from the same draws: a zero prediction costs mean(v^2)
    g = torch.Generator().manual_seed(3)
    step = torch.randint(1000, (4,), generator=g)
    ab = SCHEDULE.at(step / 999)
    eps = torch.randn(z0.shape, generator=g)
    torch.testing.assert_close(out.loss, v_from_x0_eps(z0, eps, ab).square().mean())

    # a prediction that is wildly wrong only on conditioning frames costs nothing extra
    wild = SpyNet(lambda x: 1e6 * x[:, 24:25].expand(-1, 8, -1, -1, -1))
    out = diffusion_loss(wild, z0, None, SCHEDULE, p_self_cond=0.0, p_frame_pred=1.0)
    assert out.frame_mask.any(1).all() and out.loss < 10
    x_in = wild.calls[0][0]
    m = out.frame_mask[:, None, :, None, None]
    torch.testing.assert_close(x_in[:, 16:24], z0 * m)  # clean latents of conditioning frames


def test_a_fixed_step_keeps_the_noise_and_masks_of_the_seed():
    """`step` fixes the diffusion step and changes nothing else a seed draws: the same noise,
    so that losses at chosen noise levels are paired across conditions."""
    z0 = torch.randn(3, 8, 5, 4, 4)
    fixed = torch.tensor([0, 500, 999])
    out = diffusion_loss(
        SpyNet(), z0, None, SCHEDULE, p_self_cond=0.0, p_frame_pred=0.5,
        generator=torch.Generator().manual_seed(3), step=fixed,
    )  # fmt: skip
    free = diffusion_loss(
        SpyNet(), z0, None, SCHEDULE, p_self_cond=0.0, p_frame_pred=0.5,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    torch.testing.assert_close(out.t, fixed / 999)
    assert torch.equal(out.frame_mask, free.frame_mask)
    g = torch.Generator().manual_seed(3)
    torch.randint(1000, (3,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    weight = (~out.frame_mask).float()[:, None, :, None, None]
    v = v_from_x0_eps(z0, eps, SCHEDULE.at(fixed / 999))
    want = (v.square() * weight).sum() / (weight.sum() * 8 * 16)
    torch.testing.assert_close(out.loss, want)


def test_time_shift_moves_the_drawn_times_toward_noise_and_nothing_else():
    """`time_shift` s maps each drawn t to s t / (1 + (s - 1) t): the noise-to-signal odds
    t / (1 - t) times s, the ends fixed, the order kept. s = 1 is the uniform draw bit for bit;
    a seed draws the same times (shifted) and masks whatever s; a fixed `step` is never shifted."""
    t = torch.linspace(0, 1, 11)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    inner = slice(1, -1)
    odds = shifted[inner] / (1 - shifted[inner])
    torch.testing.assert_close(odds, 3 * t[inner] / (1 - t[inner]))
    assert shift_time(t, 1.0) is t
    torch.testing.assert_close(shift_time(shift_time(t, 3.0), 1 / 3), t)

    z0 = torch.randn(64, 8, 5, 4, 4)

    def run(shift, **kw):
        g = torch.Generator().manual_seed(3)
        kw = dict(p_self_cond=0.0, p_frame_pred=0.5, generator=g, time_shift=shift, **kw)
        return diffusion_loss(SpyNet(), z0, None, SCHEDULE, **kw)

    plain, shifted_run = run(1.0), run(4.0)
    torch.testing.assert_close(shifted_run.t, shift_time(plain.t, 4.0))
    assert shifted_run.t.median() > 0.7 > plain.t.median()
    assert torch.equal(shifted_run.frame_mask, plain.frame_mask)
    fixed = torch.full((64,), 500)
    torch.testing.assert_close(run(4.0, step=fixed).t, fixed / 999)


def test_condition_dropout():
    z0 = torch.randn(3, 8, 5, 4, 4)
    cond = Conditioning(labels=torch.tensor([1, 2, 3]), text=torch.randn(3, 4, 16))
    net = SpyNet()
    out = diffusion_loss(
        net, z0, cond, SCHEDULE, p_self_cond=0.0, p_frame_pred=1.0, p_cond_drop=1.0
    )
    seen = net.calls[0][2]
    assert bool((seen.labels == Conditioning.NULL_LABEL).all())
    assert not seen.text_mask.any()
    assert not out.frame_mask.any()  # the frame condition is dropped too
    net = SpyNet()
    diffusion_loss(net, z0, cond, SCHEDULE, p_self_cond=0.0, p_cond_drop=0.0)
    assert net.calls[0][2] is cond
    net = SpyNet()  # drop only the label: caption and frame condition stay
    out = diffusion_loss(
        net, z0, cond, SCHEDULE, p_self_cond=0.0, p_frame_pred=1.0, p_cond_drop=1.0,
        cond_drop=("labels",),
    )  # fmt: skip
    seen = net.calls[0][2]
    assert bool((seen.labels == -1).all()) and seen.text_mask is None and out.frame_mask.any()


def test_noise_augmentation_of_the_low_res_latent():
    low = torch.randn(4, 8, 5, 4, 4)
    g = torch.Generator().manual_seed(0)
    noisy, level = noise_augment(low, SCHEDULE, 0.25, generator=g)
    assert noisy.shape == low.shape and bool((level >= 0).all()) and bool((level <= 0.25).all())
    same, zero = noise_augment(low, SCHEDULE, 0.25, level=torch.zeros(4))
    assert bool((zero == 0).all())
    assert (same - low).abs().max() < 0.05  # level 0: sqrt(1 - 0.9999) = 1% noise
    pure, _ = noise_augment(low, SCHEDULE, 1.0, level=torch.ones(4))
    assert torch.corrcoef(torch.stack([pure.flatten(), low.flatten()]))[0, 1].abs() < 0.1


def test_tiny_model_overfits_one_batch():
    """Fixed latents, noise and times: the loss falls by a large factor in a few dozen steps."""
    torch.manual_seed(0)
    net = WALT.from_preset("tiny")
    z0 = torch.randn(2, 8, 3, 8, 8)
    cond = Conditioning(labels=torch.tensor([1, 2]), text=torch.randn(2, 4, 32))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and contention-proof
    losses = []
    try:
        for _ in range(60):
            g = torch.Generator().manual_seed(123)  # same draws every step
            out = diffusion_loss(net, z0, cond, SCHEDULE, p_frame_pred=0.5, generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0] / 10, f"{losses[0]:.3f} -> {losses[-1]:.3f}"


# ---------------------------------------------------------------- sampling


def test_trailing_timesteps():
    ts = ddim_timesteps(50)
    steps = (ts * 999).round().long()
    assert steps[0] == 999 and steps[1] == 979 and steps[-1] == 19 and len(steps) == 50
    assert bool((steps[1:] < steps[:-1]).all())
    assert ddim_timesteps(1).tolist() == [1.0]
    assert (ddim_timesteps(10, spacing="leading") * 999).round().long().tolist()[0] == 900
    with pytest.raises(WaltError):
        ddim_timesteps(0)


@pytest.mark.parametrize("num_steps,eta", [(1, 0.0), (10, 0.0), (50, 0.0), (25, 1.0)])
def test_ddim_with_an_oracle_returns_x0(num_steps, eta):
    x0 = torch.randn(2, 8, 3, 4, 4)
    seen: list[DDIMStep] = []

    def oracle(x, t, x0_prev):
        return x0_to_v(x, x0, SCHEDULE.at(t))

    g = torch.Generator().manual_seed(0)
    out = ddim(
        oracle,
        torch.randn(x0.shape, generator=g),
        ddim_timesteps(num_steps),
        schedule=SCHEDULE,
        eta=eta,
        generator=g,
        callback=seen.append,
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert [s.index for s in seen] == list(range(num_steps))
    assert seen[0].t == 1.0 and seen[-1].x is out


def test_ddim_feeds_back_x0_for_self_conditioning():
    prevs = []

    def model(x, t, x0_prev):
        prevs.append(x0_prev)
        return torch.ones_like(x)

    ddim(model, torch.randn(1, 8, 2, 4, 4), ddim_timesteps(3), schedule=SCHEDULE)
    assert prevs[0] is None and all(p is not None for p in prevs[1:])


def _tiny_net() -> WALT:
    net = WALT.from_preset("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def test_sampling_is_deterministic_under_a_seed_and_guidance_one_is_unguided():
    net = _tiny_net()
    cond = Conditioning(labels=torch.tensor([1, 4]), text=torch.randn(2, 3, 32))
    frames = torch.randn(2, 8, 5, 8, 8)
    mask = first_frames_mask(2, 5, 1)

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(2, 8, 5, 8, 8, generator=g)
        return sample(
            net, noise, cond, SCHEDULE, num_steps=4, eta=0.5, generator=g,
            frame_latents=frames, frame_mask=mask, **kw,
        )  # fmt: skip

    a, b, c = run(7), run(7), run(8)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a[:, :, :1], frames[:, :, :1])  # conditioning frame kept
    torch.testing.assert_close(run(7, guidance_scale=1.0), a, atol=0, rtol=0)
    assert not torch.allclose(run(7, guidance_scale=3.0), a, atol=1e-3)
    assert not torch.allclose(
        run(7, guidance_scale=3.0, guide=("labels",)), run(7, guidance_scale=3.0)
    )


def test_loss_and_sampler_build_the_same_model_input_for_conditioning_frames():
    """The sampler's input at time t equals the loss's for the same clean conditioning frames,
    noise and t, even when the sampler's own estimate of those frames has drifted."""
    net = _tiny_net()
    seen = []

    def spy(x_in, t, cond):
        seen.append((x_in.clone(), t.clone()))
        return net(x_in, t, cond)

    z0 = torch.randn(2, 8, 5, 8, 8)
    cond = Conditioning(labels=torch.tensor([1, 4]))
    g = torch.Generator().manual_seed(3)
    out = diffusion_loss(spy, z0, cond, SCHEDULE, p_self_cond=0.0, p_frame_pred=1.0, generator=g)
    assert out.frame_mask.any(1).all()  # every sample conditions on its first frames
    x_loss, t = seen[-1]
    # Replay the loss's draws: t, then eps (same generator, same order).
    g = torch.Generator().manual_seed(3)
    step = torch.randint(SCHEDULE.num_steps, (2,), generator=g)
    torch.testing.assert_close(step.float() / (SCHEDULE.num_steps - 1), t, atol=0, rtol=0)
    eps = torch.randn(z0.shape, generator=g)
    z_t = q_sample(z0, eps, SCHEDULE.at(t))
    m = out.frame_mask[:, None, :, None, None]
    drifted = torch.where(m, torch.randn_like(z_t) * 3, z_t)  # the sampler's state on those frames
    model_fn = denoiser(
        spy, cond, frame_latents=z0, frame_mask=out.frame_mask, schedule=SCHEDULE, frame_noise=eps
    )
    model_fn(drifted, t, None)
    x_sampler, _ = seen[-1]
    torch.testing.assert_close(x_sampler, x_loss, atol=0, rtol=0)
    # and the conditioning frames are their noised clean latents, not the drifted values
    assert not torch.equal(x_sampler[:, :8], drifted)


def test_conditioning_frames_enter_every_sampling_step_noised_to_its_time():
    seen = []

    def model(x_in, t, cond):
        seen.append((x_in[:, :8].clone(), t[0].item()))
        return torch.zeros_like(x_in[:, :8])

    frames = torch.randn(1, 8, 3, 4, 4)
    mask = first_frames_mask(1, 3, 1)
    noise = torch.randn(1, 8, 3, 4, 4)
    z = sample(model, noise, None, SCHEDULE, num_steps=4, frame_latents=frames, frame_mask=mask)
    assert len(seen) == 4
    for z_t, t in seen:
        expected = q_sample(frames[:, :, :1], noise[:, :, :1], SCHEDULE.at(torch.tensor([t])))
        torch.testing.assert_close(z_t[:, :, :1], expected)
    torch.testing.assert_close(z[:, :, :1], frames[:, :, :1], atol=0, rtol=0)
