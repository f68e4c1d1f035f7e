"""Discriminator and adversarial losses: shapes for videos and images, blur pooling, r1, LeCam."""

from __future__ import annotations

import math

import pytest
import torch

from walt_cli.losses.gan import LeCam, d_loss_nonsaturating, g_loss_nonsaturating, r1_penalty
from walt_cli.models.discriminator import BlurPool3d, Discriminator3D


@pytest.mark.parametrize("shape", [(2, 3, 17, 32, 32), (3, 3, 1, 32, 32), (1, 3, 5, 24, 40)])
def test_discriminator_takes_videos_and_images(shape):
    d = Discriminator3D(base_channels=8, channel_multipliers=(1, 2, 2))
    out = d(torch.randn(*shape))
    assert out.shape == (shape[0],) and torch.isfinite(out).all()


def test_blurpool_halves_sizes_and_keeps_constants():
    pool = BlurPool3d(2)
    x = torch.full((1, 2, 9, 16, 16), 0.7)
    y = pool(x)
    assert y.shape == (1, 2, 5, 8, 8)
    # away from the zero-padded borders a constant stays that constant (the filter sums to 1)
    assert torch.allclose(
        y[:, :, 1:-1, 1:-1, 1:-1], torch.full_like(y[:, :, 1:-1, 1:-1, 1:-1], 0.7)
    )
    assert pool(torch.ones(1, 2, 1, 8, 8)).shape == (1, 2, 1, 4, 4)  # images: time untouched


def test_blurpool_is_antialiased():
    """A pixel-wide checkerboard (the Nyquist frequency) is removed, not aliased into DC."""
    pool = BlurPool3d(1)
    idx = torch.arange(16)
    board = ((idx.view(16, 1) + idx.view(1, 16)) % 2).float() * 2 - 1
    y = pool(board.view(1, 1, 1, 16, 16))[..., 1:-1, 1:-1]
    assert y.abs().max() < 1e-6
    naive = board[::2, ::2]
    assert naive.abs().min() == 1  # plain striding would keep a full-amplitude pattern


def test_nonsaturating_losses_values():
    zero = torch.zeros(4)
    assert d_loss_nonsaturating(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert g_loss_nonsaturating(zero).item() == pytest.approx(math.log(2))
    assert d_loss_nonsaturating(torch.full((4,), 20.0), torch.full((4,), -20.0)).item() < 1e-6


def test_r1_penalty_matches_analytic_gradient():
    w = torch.randn(3 * 2 * 4 * 4)
    x = torch.randn(5, 3, 2, 4, 4, requires_grad=True)
    logits = x.flatten(1) @ w  # D(x) = w.x: gradient w, squared norm |w|^2 for every sample
    assert r1_penalty(logits, x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_lecam_tracks_emas_and_penalises_drift():
    reg = LeCam(decay=0.5)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    reg.update(real, fake)
    assert reg.ema_real.item() == pytest.approx(1.0) and reg.ema_fake.item() == pytest.approx(-1.0)
    # D(real) = 2 above ema_fake = -1 by 3; ema_real = 1 above D(fake) = -2 by 3: 9 + 9
    assert reg(real, fake).item() == pytest.approx(18.0)
    assert reg(torch.full((4,), -1.0), torch.full((4,), 1.0)).item() == 0.0
    assert set(dict(reg.named_buffers())) == {"ema_real", "ema_fake"}
