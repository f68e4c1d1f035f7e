"""The W.A.L.T denoiser: parameter counts of the paper's sizes, window/full attention equivalence,
image-sample independence end to end, conditioning paths, checkpoints and grid resizing."""

from __future__ import annotations

import time

import pytest
import torch

from walt_cli.errors import WaltError
from walt_cli.models.embeddings import sincos_table
from walt_cli.models.transformer import (
    PRESETS,
    WALT,
    Conditioning,
    describe_windows,
    locality_slopes,
)

C_IN = 25  # 3c + 1 with c = 8


def _count(name: str, **overrides) -> int:
    with torch.device("meta"):
        return WALT.from_preset(name, **overrides).num_parameters


# Class-conditional, 101 classes, p = 1, no cross-attention (DESIGN §5; SPEC §2.3-2.4).
@pytest.mark.parametrize(
    "name,overrides,paper",
    [
        ("walt-l", {}, 313e6),  # Table 1
        ("walt-xl", {}, 460e6),  # Tables 1, 4
        ("walt-l", {"adaln_lora_rank": 0}, 458e6),  # Table 4 "separate" AdaLN
        ("walt-l", {"adaln_lora_rank": 4}, 314e6),  # Table 3d rank ablation
        ("walt-l", {"adaln_lora_rank": 64}, 324e6),
        ("walt-l", {"adaln_lora_rank": 256}, 357e6),
    ],
)
def test_parameter_counts_match_the_paper(name, overrides, paper):
    n = _count(name, num_classes=101, patch_size=1, **overrides)
    assert abs(n / paper - 1) < 0.02, f"{name} {overrides}: {n / 1e6:.1f}M vs {paper / 1e6:.0f}M"


def test_3b_and_tiny_sizes():
    assert 2.9e9 < _count("walt-3b", text_dim=2048) < 3.2e9  # T5-XL states, cross-attn in SW
    net = WALT.from_preset("tiny")
    assert net.num_parameters < 2_000_000
    assert net.text_dim and net.num_classes and net.adaln_lora_rank > 0  # every path present
    assert describe_windows(net) == "SW 1x8x8, STW 5x4x4"


def _randomize(net: WALT, std: float = 0.05) -> WALT:
    """Perturb every parameter so that zero-initialised paths (adaLN-Zero) carry signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def _tiny(**overrides) -> WALT:
    return _randomize(WALT.from_preset("tiny", **overrides))


def _inputs(b: int = 2, t: int = 5, hw: tuple[int, int] = (8, 8), c_in: int = C_IN):
    return torch.randn(b, c_in, t, *hw), torch.rand(b)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_forward_shapes_for_each_patch_size(p):
    net = WALT.from_preset("tiny", patch_size=p, st_window=(2, 2))
    x, t = _inputs()
    cond = Conditioning(labels=torch.tensor([1, 2]), text=torch.randn(2, 3, 32))
    assert net(x, t, cond).shape == (2, 8, 5, 8, 8)
    assert net(x[:, :, :1], t, cond).shape == (2, 8, 1, 8, 8)  # a single frame (an image)


def test_adaln_zero_initialisation():
    """Each block is the identity at initialisation and the output is zero."""
    net = WALT.from_preset("tiny").eval()
    x, t = _inputs()
    assert torch.count_nonzero(net(x, t)) == 0
    tokens = torch.randn(2, 5, 8, 8, 64)
    e = torch.randn(2, 5, 64)
    shared = net.adaln_shared(e)
    text, mask = torch.randn(2, 5, 3, 64), torch.ones(2, 5, 3, dtype=torch.bool)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, e, shared, None, text, mask), tokens)
    # but gradients reach the zero-initialised layers
    out = net.train()(x, t)
    (out - torch.randn_like(out)).square().mean().backward()
    assert net.final.linear.weight.grad.abs().sum() > 0


def test_input_errors_are_one_line_walt_errors():
    net = WALT.from_preset("tiny")
    x, t = _inputs()
    bad = [
        (lambda: net(torch.randn(2, 24, 5, 8, 8), t), "channels"),
        (lambda: net(torch.randn(2, C_IN, 6, 8, 8), t), "latent frames"),
        (lambda: net(torch.randn(2, C_IN, 5, 8, 12), t), "resize_grid"),
        (lambda: net(x, torch.rand(3)), "t must have shape"),
        (lambda: net(x, t, Conditioning(labels=torch.tensor([1, 10]))), "labels"),
        (
            lambda: WALT.from_preset("tiny", text_dim=None)(
                x, t, Conditioning(text=torch.randn(2, 3, 32))
            ),
            "text_dim",
        ),
        (lambda: WALT.from_preset("tiny", patch_size=3), "patch size"),
        (lambda: WALT.from_preset("tiny", st_window=(0, 4)), "st_window"),
        (lambda: WALT.from_preset("walt-m"), "unknown transformer preset"),
        (lambda: WALT.from_preset("tiny", widht=32), "unknown transformer option"),
    ]
    for call, words in bad:
        with pytest.raises(WaltError, match=words) as err:
            call()
        assert "\n" not in str(err.value)


def test_image_tokens_depend_only_on_their_own_frame():
    """Packed images (is_image): an output frame is a function of its own input frame, label and
    caption only, end to end; video frames do interact through the STW layers."""
    net = _tiny()
    x, t = _inputs(b=1)
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    text = torch.randn(1, 5, 3, 32)
    image = Conditioning(labels=labels, text=text, is_image=torch.tensor([True]))
    video = Conditioning(labels=labels, text=text, is_image=torch.tensor([False]))
    out_img, out_vid = net(x, t, image), net(x, t, video)

    others = [0, 1, 3, 4]
    x2 = x.clone()
    x2[:, :, 2] = torch.randn_like(x2[:, :, 2])
    changed = net(x2, t, image)
    torch.testing.assert_close(changed[:, :, others], out_img[:, :, others], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[:, :, 2], out_img[:, :, 2])

    labels2 = labels.clone()
    labels2[0, 2] = 9
    changed = net(x, t, Conditioning(labels=labels2, text=text, is_image=image.is_image))
    torch.testing.assert_close(changed[:, :, others], out_img[:, :, others], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[:, :, 2], out_img[:, :, 2])

    text2 = text.clone()
    text2[0, 2] = torch.randn(3, 32)
    changed = net(x, t, Conditioning(labels=labels, text=text2, is_image=image.is_image))
    torch.testing.assert_close(changed[:, :, others], out_img[:, :, others], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[:, :, 2], out_img[:, :, 2])

    # images are an unordered stack: permuting the frames permutes the outputs
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = net(
        x[:, :, perm],
        t,
        Conditioning(labels=labels[:, perm], text=text[:, perm], is_image=image.is_image),
    )
    torch.testing.assert_close(permuted, out_img[:, :, perm], atol=1e-5, rtol=1e-4)

    # the same change in a video reaches the other frames
    changed = net(x2, t, video)
    assert not torch.allclose(changed[:, :, 0], out_vid[:, :, 0], atol=1e-4)
    assert not torch.allclose(out_img, out_vid)


def test_mixed_batch_equals_separate_samples():
    net = _tiny()
    x, t = _inputs(b=3)
    cond = Conditioning(
        labels=torch.tensor([[1, 2, 3, 4, 5], [6, 6, 6, 6, 6], [0, 1, 0, 1, 0]]),
        text=torch.randn(3, 4, 32),
        text_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool(),
        is_image=torch.tensor([True, False, True]),
    )
    out = net(x, t, cond)
    for i in range(3):
        one = net(x[i : i + 1], t[i : i + 1], cond.select(slice(i, i + 1)))
        torch.testing.assert_close(one, out[i : i + 1], atol=1e-5, rtol=1e-4)


def test_conditioning_paths_change_the_output():
    net = _tiny()
    x, t = _inputs()
    base = net(x, t)
    assert not torch.allclose(net(x, t, Conditioning(labels=torch.tensor([3, 3]))), base)
    assert not torch.allclose(net(x, t.flip(0)), base)
    # no label = the null class; a fully masked caption = no caption
    torch.testing.assert_close(net(x, t, Conditioning(labels=torch.tensor([-1, -1]))), base)
    text = torch.randn(2, 3, 32)
    masked = Conditioning(text=text, text_mask=torch.zeros(2, 3, dtype=torch.bool))
    with_text = net(x, t, Conditioning(text=text))
    assert not torch.allclose(with_text, base)
    assert not torch.allclose(net(x, t, masked), with_text)
    # per-frame times equal to the per-sample time give the same result
    torch.testing.assert_close(net(x, t[:, None].expand(2, 5)), base)


def test_full_attention_equals_windows_covering_the_grid():
    windowed = _tiny(spatial_window=(8, 8), st_window=(8, 8))
    full = WALT.from_preset("tiny", full_attention=True, st_window=(2, 2)).eval()
    full.load_state_dict(windowed.state_dict())
    x, t = _inputs()
    cond = Conditioning(labels=torch.tensor([1, 2]), text=torch.randn(2, 3, 32))
    torch.testing.assert_close(full(x, t, cond), windowed(x, t, cond))
    assert describe_windows(full) == "SW 1x8x8, STW 5x8x8"
    small = _tiny()  # STW windows 5x4x4 are not full attention
    small_out = small(x, t, cond)
    assert not torch.allclose(small_out, windowed(x, t, cond))


def test_locality_and_sincos_inits_change_only_their_tables():
    """The recipe's `bias_init: locality` and `pos_init: sincos` move the bias and position
    tables to their priors and leave every other weight as the same seed draws it; neither is
    part of the config, so weights trained from either load into (and init_from) plain nets."""
    assert locality_slopes(5) == [2.0, 1.0, 0.5, 0.25, 0.0]
    assert locality_slopes(1) == [1.0]
    torch.manual_seed(0)
    plain = WALT.from_preset("tiny", heads=4)
    torch.manual_seed(0)
    prior = WALT.from_preset("tiny", heads=4, bias_init="locality", pos_init="sincos")
    assert prior.config == plain.config
    a, b = plain.state_dict(), prior.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    tables = {k for k in a if k.endswith(".bias.table")}
    assert moved == tables | {"pos_embed.spatial", "pos_embed.temporal"}

    # Bias: head h loses slope_h per token of spatial distance, whatever the temporal offset.
    for key in tables:
        diff = b[key] - a[key]  # (heads, 2wt-1, 2wh-1, 2ww-1)
        wh, ww = (diff.shape[2] + 1) // 2, (diff.shape[3] + 1) // 2
        dh = torch.arange(1 - wh, wh)[:, None].float()
        dw = torch.arange(1 - ww, ww)[None, :].float()
        want = -torch.tensor([2.0, 1.0, 0.5, 0.0])[:, None, None] * (dh**2 + dw**2).sqrt()
        torch.testing.assert_close(diff, want[:, None].expand_as(diff))
    # One step right costs head 0 two logits, the last (global) head nothing.
    bias = prior.blocks[0].attn.bias((1, 8, 8)) - plain.blocks[0].attn.bias((1, 8, 8))
    torch.testing.assert_close(bias[:, 0, 1], torch.tensor([-2.0, -1.0, -0.5, 0.0]))

    # Positions: rows in the first half of the channels, columns in the second, frames in all.
    spatial, temporal = b["pos_embed.spatial"], b["pos_embed.temporal"]  # (8, 8, 64), (5, 64)
    torch.testing.assert_close(spatial[:, 3, :32], sincos_table(8, 32))
    torch.testing.assert_close(spatial[5, :, 32:], sincos_table(8, 32))
    torch.testing.assert_close(temporal, sincos_table(5, 64))
    row1 = torch.tensor([1.0, 0.01])  # sincos_table(2, 5): angles 1 and 1/100 at position 1
    want = torch.stack([row1.sin(), row1.cos()], -1).flatten()
    torch.testing.assert_close(sincos_table(2, 5)[1], torch.cat([want, torch.zeros(1)]))
    x, t = _inputs()
    assert torch.isfinite(prior(x, t)).all()
    with pytest.raises(WaltError, match="bias_init"):
        WALT.from_preset("tiny", bias_init="alibi")


def test_recipe_inits_reach_the_stage_network():
    from pathlib import Path

    from walt_cli.config import load_recipe
    from walt_cli.systems.common import build_network

    recipe_path = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    keys = ["base.bias_init=locality", "base.pos_init=sincos"]
    net = build_network(load_recipe(recipe_path, keys).base, (5, 8, 8), 8)
    torch.testing.assert_close(net.pos_embed.temporal, sincos_table(5, net.width))
    table = net.blocks[0].attn.bias.table  # (4 heads, 1, 15, 15), centre (0, 7, 7)
    step = table[:, 0, 7, 8] - table[:, 0, 7, 7]  # one token right, minus N(0, 0.02) noise
    torch.testing.assert_close(step, torch.tensor([-2.0, -1.0, -0.5, 0.0]), atol=0.2, rtol=0)
    plain = build_network(load_recipe(recipe_path).base, (5, 8, 8), 8)
    assert not torch.allclose(plain.pos_embed.temporal, sincos_table(5, net.width))


def test_save_and_load_round_trip(tmp_path):
    net = _tiny(patch_size=2, adaln_lora_rank=0, noise_level_cond=True)
    path = tmp_path / "base.safetensors"
    net.save(path, extra={"latent_mean": [0.0] * 8})
    loaded = WALT.from_checkpoint(path).eval()
    assert loaded.config == net.config
    assert loaded.checkpoint_extra == {"latent_mean": [0.0] * 8}
    x, t = _inputs()
    torch.testing.assert_close(loaded(x, t), net(x, t))
    with pytest.raises(WaltError, match="not found"):
        WALT.from_checkpoint(tmp_path / "missing.safetensors")


def test_resize_grid_for_the_widescreen_fine_tune(tmp_path):
    """128x128 -> 128x224 (latent 16x16 -> 16x28) scales windows 16x16 -> 16x28 and 8x8 -> 8x14;
    here at tiny scale 8x8 -> 8x14 with windows (8, 8) -> (8, 14) and (4, 4) -> (4, 7)."""
    net = _tiny()
    x, t = _inputs()
    before = net(x, t)
    net.resize_grid((5, 8, 8))
    torch.testing.assert_close(net(x, t), before)  # same grid: nothing moves

    net.resize_grid((5, 8, 14))
    assert net.config["spatial_window"] == [8, 14] and net.config["st_window"] == [4, 7]
    assert net.token_grid == (8, 14)
    assert describe_windows(net) == "SW 1x8x14, STW 5x4x7"
    wide, _ = _inputs(hw=(8, 14))
    assert net(wide, t).shape == (2, 8, 5, 8, 14)
    path = tmp_path / "wide.safetensors"
    net.save(path)
    torch.testing.assert_close(WALT.from_checkpoint(path).eval()(wide, t), net(wide, t))

    with torch.device("meta"):
        preset = WALT.from_preset("walt-l", latent_size=(5, 16, 16))
        preset.resize_grid((5, 16, 28))
    assert describe_windows(preset) == "SW 1x16x28, STW 5x8x14"  # SPEC Table 6


def test_super_resolution_inputs():
    """SR stage: 33 input channels, the last 8 the nearest-repeated low-res latent; the learned
    depth-to-space conv starts as nearest upsampling; the noise level enters AdaLN."""
    net = _tiny(lowres_factor=2, noise_level_cond=True)
    assert net.in_channels == 33
    fresh = WALT.from_preset("tiny", lowres_factor=2)
    low = torch.randn(2, 8, 5, 4, 4)
    up = low.repeat_interleave(2, -2).repeat_interleave(2, -1)
    x = torch.cat([torch.randn(2, 25, 5, 8, 8), up], 1)
    torch.testing.assert_close(fresh._upsample_lowres(x), x)
    t = torch.rand(2)
    base = net(x, t, Conditioning(noise_level=torch.zeros(2)))
    torch.testing.assert_close(net(x, t), base)
    assert not torch.allclose(net(x, t, Conditioning(noise_level=torch.full((2,), 0.3))), base)
    x2 = x.clone()
    x2[:, 25:] = torch.randn(2, 8, 5, 4, 4).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert not torch.allclose(net(x2, t), base)


def test_gradient_checkpointing_gives_the_same_gradients():
    net = _tiny().train()
    x, t = _inputs()
    cond = Conditioning(labels=torch.tensor([1, 2]), text=torch.randn(2, 3, 32))
    net(x, t, cond).square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.gradient_checkpointing = True
    net(x, t, cond).square().mean().backward()
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_tiny_step_is_fast_and_backends_are_reported():
    net = WALT.from_preset("tiny").train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, t = _inputs(b=4)
    cond = Conditioning(labels=torch.randint(10, (4,)), text=torch.randn(4, 6, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: immune to thread contention on a shared machine
    try:
        times = []
        for _ in range(3):  # the first is a warm-up; keep the best
            start = time.perf_counter()
            opt.zero_grad()
            net(x, t, cond).square().mean().backward()
            opt.step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 1.0, f"tiny training step took {min(times):.2f}s"
    backends = net.attention_backends()
    assert set(backends) == {"spatial", "spatiotemporal"}
    assert all(isinstance(v, str) and v for v in backends.values())
    assert set(PRESETS) == {"walt-l", "walt-xl", "walt-3b", "tiny"}
