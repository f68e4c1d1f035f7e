"""Adafactor trains W.A.L.T's zero-initialised layers (AdaLN-Zero, the final layer) at a pace
comparable to AdamW, and its step reads nothing back from the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from walt_cli.diffusion.losses import diffusion_loss
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.systems.base import BaseSystem


def tiny_system(tmp_path: Path, optimizer: str) -> BaseSystem:
    torch.manual_seed(0)
    net = WALT.from_preset("tiny", num_classes=4, latent_size=(3, 4, 4))
    return BaseSystem(
        net, stage_dir=str(tmp_path), latent_mean=[0.0] * 8, latent_std=[1.0] * 8,
        tokenizer_hash="test", max_steps=100, optimizer=optimizer, lr=1e-3, warmup_steps=0,
        ema=False,
    )  # fmt: skip


def train_zero_init_rms(system: BaseSystem, make_opt=None, steps: int = 100) -> dict[str, float]:
    """RMS of the zero-initialised A_1 and final layer after `steps` steps on one batch."""
    net = system.net
    opt = make_opt(net) if make_opt else system.configure_optimizers()[0][0]
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 8, 3, 4, 4, generator=g)
    cond = Conditioning(labels=torch.tensor([0, 1, 2, 3]))
    for _ in range(steps):
        loss = diffusion_loss(net, z0, cond, system.schedule, p_self_cond=0.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = {"A_1": net.adaln_shared[-1].weight, "final": net.final.linear.weight}
    return {k: float(w.detach().pow(2).mean().sqrt()) for k, w in layers.items()}


@pytest.mark.slow  # 3 x 100 steps of the tiny model (about a minute on 2 loaded cores)
def test_adafactor_moves_zero_initialised_layers_like_adamw(tmp_path: Path):
    adam = train_zero_init_rms(tiny_system(tmp_path, "adamw"))
    ada = train_zero_init_rms(tiny_system(tmp_path, "adafactor"))
    for k in adam:
        assert adam[k] > 0 and 0.1 < ada[k] / adam[k] < 10, (k, ada[k], adam[k])
    # torch's Adafactor (steps scaled by the parameter's RMS, floored at 1e-3) does not.
    scaled = train_zero_init_rms(
        tiny_system(tmp_path, "adafactor"),
        lambda net: torch.optim.Adafactor(net.parameters(), lr=1e-3),
    )
    assert scaled["A_1"] < 0.1 * adam["A_1"]


def test_adafactor_step_reads_nothing_back_from_the_device(tmp_path: Path, monkeypatch):
    system = tiny_system(tmp_path, "adafactor")
    opt = system.configure_optimizers()[0][0]
    net = system.net
    for _ in range(2):  # the first step creates the state
        loss = diffusion_loss(net, torch.randn(2, 8, 3, 4, 4), Conditioning(labels=torch.tensor([0, 1])),
                              system.schedule, p_self_cond=0.0).loss  # fmt: skip
        opt.zero_grad()
        loss.backward()
        reads: list[str] = []
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, _counting(name, reads))
            opt.step()
        assert reads == []


def _counting(name: str, reads: list[str]):
    """torch.Tensor.<name>, recording each call (a read of a value back from the device)."""
    original = getattr(torch.Tensor, name)

    def read(self, *a, **k):
        reads.append(name)
        return original(self, *a, **k)

    return read


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_refused(tmp_path: Path, precision: str):
    from training_helpers import tiny

    from walt_cli.errors import WaltError

    with pytest.raises(WaltError, match="trainer.precision.*bf16-mixed"):
        tiny(tmp_path, f"trainer.precision={precision}")
