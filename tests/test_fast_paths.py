"""Every fast path equals its reference path, forward and gradients, on tiny models (CPU).

Tolerances: fp32 throughout; outputs and gradients agree to atol 1e-5 / rtol 1e-4 (the paths
differ only in the order of floating-point sums)."""

from __future__ import annotations

import pytest
import torch

from walt_cli.models import attention
from walt_cli.models.attention import WindowSelfAttention, set_attention_impl
from walt_cli.models.transformer import WALT, Conditioning

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture
def impl():
    """Switch the attention implementation inside a test; restore "auto" afterwards."""
    yield set_attention_impl
    set_attention_impl("auto")


def _grads(module: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "temporal,window,grid,identity",
    [
        (True, (4, 4), (3, 8, 8), None),  # STW windows with the bias
        (True, (4, 4), (2, 6, 10), None),  # padded grid: padded keys masked
        (False, (3, 4), (2, 5, 7), None),  # SW, padded
        (True, (4, 4), (3, 6, 8), [True, False, True]),  # identity packs beside a video
        (True, (4, 4), (3, 8, 8), [True, True, True]),
    ],
)
def test_window_kernel_equals_sdpa(impl, temporal, window, grid, identity):
    torch.manual_seed(0)
    attn = WindowSelfAttention(16, 2, window, temporal=temporal, max_frames=3)
    torch.nn.init.normal_(attn.bias.table, std=0.5)  # a bias that matters
    x = torch.randn(3, *grid, 16, requires_grad=True)
    ident = None if identity is None else torch.tensor(identity)
    target = torch.randn(3, *grid, 16)
    results = {}
    for name in ("sdpa", "window"):
        impl(name)
        out = attn(x, ident)
        grads = _grads(attn, (out * target).sum())
        results[name] = (out.detach(), x.grad.clone(), grads)
        x.grad = None
    (ref, gx_ref, g_ref), (out, gx, g) = results["sdpa"], results["window"]
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    assert g.keys() == g_ref.keys()
    assert ("bias.table" in g) == (identity is None or not all(identity))  # all images: no bias
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_forward(impl):
    """FlexAttention (the CUDA path) against SDPA on CPU: bias as score_mod, padding as a block
    mask, identity packs. PyTorch has no FlexAttention backward on CPU: forward only here."""
    torch.manual_seed(0)
    attn = WindowSelfAttention(16, 2, (4, 4), temporal=True, max_frames=3)
    torch.nn.init.normal_(attn.bias.table, std=0.5)
    x = torch.randn(2, 3, 6, 10, 16)
    ident = torch.tensor([True, False])
    with torch.no_grad():
        impl("sdpa")
        ref = attn(x, ident)
        impl("flex")
        torch.testing.assert_close(attn(x, ident), ref, **TOL)
        torch.testing.assert_close(attn(x[:, :, :4, :8]), (impl("sdpa"), attn(x[:, :, :4, :8]))[1])


def _tiny_net(**overrides) -> WALT:
    torch.manual_seed(0)
    net = WALT.from_preset("tiny", latent_size=(3, 6, 10), **overrides).train()
    # adaLN-Zero starts every block at the identity: give the modulations weight so that every
    # path (attention, cross-attention, MLP) reaches the output and its gradients.
    for p in net.parameters():
        if p.dim() > 1 and not p.abs().any():
            torch.nn.init.normal_(p, std=0.05)
    return net


def _batch(net: WALT):
    g = torch.Generator().manual_seed(1)
    b, (t, h, w) = 3, (3, 6, 10)
    x = torch.randn(b, net.in_channels, t, h, w, generator=g)
    cond = Conditioning(
        labels=torch.tensor([[1, 2, 3], [4, 4, 4], [0, 1, 0]]),
        text=torch.randn(b, t, 4, 32, generator=g),
        text_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
        .bool()[:, None]
        .expand(b, t, 4)
        .contiguous(),
        is_image=torch.tensor([True, False, True]),
    )
    return x, torch.rand(b, generator=g), cond


def test_transformer_fast_path_equals_reference(impl):
    """The whole tiny network (windows with bias on a padded 6x10 grid, identity packs beside a
    video, cross-attention with padded captions): the default CPU training path equals the SDPA
    reference in output and in every parameter's gradient."""
    net = _tiny_net(spatial_window=(4, 4), st_window=(4, 4))
    x, t, cond = _batch(net)
    results = {}
    for name in ("sdpa", "auto"):
        impl(name)
        out = net(x, t, cond)
        results[name] = (out.detach(), _grads(net, out.square().mean()))
    (ref, g_ref), (out, g) = results["sdpa"], results["auto"]
    torch.testing.assert_close(out, ref, **TOL)
    assert g.keys() == g_ref.keys()
    assert any("cross" in n for n in g) and any("bias.table" in n for n in g)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=name)


def test_no_host_sync_path_equals_cpu_path():
    """The identity-pack path used on CUDA and under torch.compile (a `where` over all windows,
    no data-dependent shapes) equals the CPU path that attends over the video samples only."""
    torch.manual_seed(0)
    attn = WindowSelfAttention(16, 2, (4, 4), temporal=True, max_frames=3)
    x = torch.randn(3, 3, 8, 8, 16)
    ident = torch.tensor([True, False, True])
    ref = attn(x, ident)
    compiling = torch.compiler.is_compiling
    try:
        torch.compiler.is_compiling = lambda: True  # take the graph-friendly branch eagerly
        out = attn(x, ident)
    finally:
        torch.compiler.is_compiling = compiling
    torch.testing.assert_close(out, ref, **TOL)


def test_single_frame_image_attends_inside_its_frame():
    """DESIGN §5: identity attention is for packs of several images; a 1-frame sample (an image
    on its own) attends inside its frame in the STW layers too, so it equals the same 1-frame
    clip marked as a video, and differs from identity attention. A pack's frames stay
    independent."""
    net = _tiny_net()
    net.eval()
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, net.in_channels, 1, 6, 10, generator=g)
    t = torch.rand(1, generator=g)
    labels = torch.tensor([3])
    image = net(one, t, Conditioning(labels=labels, is_image=torch.tensor([True])))
    video = net(one, t, Conditioning(labels=labels, is_image=torch.tensor([False])))
    torch.testing.assert_close(image, video)
    # what the STW layers would give under identity attention: they do change the output
    block = net.blocks[1]
    assert block.temporal
    x = torch.randn(1, 1, 6, 10, net.width, generator=g)
    with torch.no_grad():
        assert not torch.allclose(block.attn(x, torch.tensor([True])), block.attn(x))
        pack = torch.randn(1, 3, 6, 10, net.width, generator=g)
        changed = pack.clone()
        changed[:, 1] += 1.0
        a, b = block.attn(pack, torch.tensor([True])), block.attn(changed, torch.tensor([True]))
        torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]])
        assert not torch.allclose(a[:, 1], b[:, 1])


def test_attention_impl_rejects_unknown_name():
    from walt_cli.errors import WaltError

    with pytest.raises(WaltError, match="unknown attention implementation"):
        attention.set_attention_impl("fast")
