"""Every fast path equals its reference path, forward and gradients, on tiny models (CPU).

Tolerances: fp32 throughout; outputs and gradients agree to atol 1e-5 / rtol 1e-4 (the paths
differ only in the order of floating-point sums)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from walt_cli.models import attention
from walt_cli.models.attention import WindowSelfAttention, set_attention_impl
from walt_cli.models.transformer import WALT, Conditioning
from walt_cli.profiling import peak_cpu_bytes

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


def _assert_paths_agree(module, x: torch.Tensor, target: torch.Tensor, paths):
    """Run `module` on `x` through two paths (functions of x, the reference first) with the
    loss sum(out * target): outputs, input gradients and parameter gradients agree within TOL.
    Returns the reference output and the second path's parameter gradients."""
    results = []
    for fn in paths:
        out = fn(x)
        grads = _grads(module, (out * target).sum())
        results.append((out.detach(), x.grad.clone(), grads))
        x.grad = None
    (ref, gx_ref, g_ref), (out, gx, g) = results
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=name)
    return ref, g


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

    def through(name: str):
        def run(v: torch.Tensor) -> torch.Tensor:
            impl(name)
            return attn(v, ident)

        return run

    _, g = _assert_paths_agree(attn, x, target, (through("sdpa"), through("window")))
    assert ("bias.table" in g) == (identity is None or not all(identity))  # all images: no bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_window_kernel_fused_forward_equals_its_by_hand_forward(monkeypatch, dtype, with_bias):
    """The window kernel's forward runs ATen's fused CPU attention for its output and row
    log-sum-exp where no key is padded; the three-pass forward it replaced (still the padded
    path) gives the same output and, through the shared backward, the same gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 2, 20, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = (torch.randn(2, 20, 20) * 2).to(dtype).requires_grad_() if with_bias else None
    target = torch.randn(6, 2, 20, 16, dtype=dtype)
    leaves = [q, k, v] + ([bias] if with_bias else [])

    def run():
        out = attention.WindowAttentionFunction.apply(q, k, v, bias, None, 0.25)
        grads = torch.autograd.grad((out.float() * target).sum(), leaves)
        return [out.detach(), *grads]

    assert attention._CPU_FLASH is not None  # torch 2.13 has the op: the fused path is tested
    fused = run()
    monkeypatch.setattr(attention, "_CPU_FLASH", None)
    by_hand = run()
    if dtype == torch.float32:
        for a, b in zip(fused, by_hand, strict=True):
            torch.testing.assert_close(a, b, **TOL)
        return
    # bf16: the fused kernel rounds once where the three passes round at each, so both are
    # measured against a float64 reference: the fused path is no less accurate (measured:
    # 0.3-1.3x the by-hand path's largest error, 0.2x on the output).
    exact = [x.detach().double().requires_grad_() for x in leaves]
    logits = exact[0] @ exact[1].transpose(-1, -2) * 0.25 + (exact[3] if with_bias else 0)
    out = logits.softmax(-1) @ exact[2]
    ref = [out.detach(), *torch.autograd.grad((out * target.double()).sum(), exact)]
    for a, b, r in zip(fused, by_hand, ref, strict=True):
        err_fused, err_hand = ((x.double() - r).abs().max().item() for x in (a, b))
        assert err_fused <= 1.5 * err_hand, (err_fused, err_hand)
    assert (fused[0].double() - ref[0]).abs().max() < (by_hand[0].double() - ref[0]).abs().max()


@pytest.mark.parametrize("name", ["sdpa", "window"])
@pytest.mark.parametrize(
    "temporal,window,grid,identity",
    [
        (True, (4, 4), (3, 8, 8), None),
        (False, (3, 4), (2, 5, 7), None),  # SW, padded
        (True, (4, 4), (3, 6, 8), [True, False, True]),  # identity packs beside a video
    ],
)
def test_inference_folds_qk_norm_into_q_and_equals_reference(
    impl, monkeypatch, name, temporal, window, grid, identity
):
    """Without gradients the layer folds qk-norm's two weights and 1 / sqrt(d) into q
    (`_folded_qkv`): it is the path taken, and its output equals the reference path's (the one
    training runs) with weights that are not 1 and a bias that matters."""
    torch.manual_seed(0)
    attn = WindowSelfAttention(16, 2, window, temporal=temporal, max_frames=3)
    torch.nn.init.normal_(attn.bias.table, std=0.5)
    for norm in (attn.q_norm, attn.k_norm):
        torch.nn.init.uniform_(norm.weight, 0.3, 3.0)
    x = torch.randn(3, *grid, 16) * 2
    ident = None if identity is None else torch.tensor(identity)
    impl(name)
    folded = []
    monkeypatch.setattr(
        WindowSelfAttention,
        "_folded_qkv",
        lambda self, qkv, _f=WindowSelfAttention._folded_qkv: folded.append(1) or _f(self, qkv),
    )
    ref = attn(x, ident).detach()  # parameters need gradients: the reference path
    assert not folded
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, ident)  # autocast: the reference path
    assert not folded
    with torch.no_grad():
        out = attn(x, ident)
    assert folded
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_forward(impl):
    """FlexAttention (on request: WALT_ATTENTION=flex) against SDPA on CPU: bias as score_mod,
    padding as a block mask, identity packs. PyTorch has no FlexAttention backward on CPU:
    forward only here."""
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


def _tiny_net(latent_size=(3, 6, 10), **overrides) -> WALT:
    torch.manual_seed(0)
    net = WALT.from_preset("tiny", latent_size=latent_size, **overrides).train()
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


@pytest.mark.parametrize("index", [0, 1])  # an SW block with cross-attention, an STW block
def test_block_compiles_as_one_graph(index):
    """Regional compilation: a block's forward (window attention with the bias, identity packs,
    cross-attention, AdaLN) traces as one graph (`fullgraph=True` raises on any graph break),
    forward and backward, and equals the eager block. The `aot_eager` backend traces exactly
    what Inductor would compile, without its (minutes-long on a CPU) code generation."""
    net = _tiny_net(latent_size=(3, 8, 8))
    block = net.blocks[index]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, net.width, generator=g, requires_grad=True)
    e, shared = torch.randn(2, 3, net.width, generator=g), torch.randn(2, 3, 6 * net.width)
    text = torch.randn(2, 3, 4, net.width, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()[:, None].expand(2, 3, 4)
    args = (e, shared, torch.tensor([True, False]), text, mask)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")
    out = compiled(x, *args)
    grads = _grads(block, (out * out.detach()).sum())
    ref = block(x, *args)
    ref_grads = _grads(block, (ref * ref.detach()).sum())
    torch.testing.assert_close(out, ref, **TOL)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def test_activation_checkpointing_cuts_peak_memory_and_keeps_gradients():
    """Per-block activation checkpointing (recipe key base.gradient_checkpointing): the same
    gradients, and a training step's peak memory well below the plain step's."""
    net = _tiny_net(latent_size=(3, 8, 8))
    x, t, cond = torch.randn(2, net.in_channels, 3, 8, 8), torch.rand(2), Conditioning()
    peaks, grads = {}, {}
    for ckpt in (False, True):
        net.gradient_checkpointing = ckpt

        def step():
            net.zero_grad(set_to_none=True)
            net(x, t, cond).square().mean().backward()

        peaks[ckpt] = peak_cpu_bytes(step)
        grads[ckpt] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, **TOL, msg=name)
    assert peaks[True] < 0.6 * peaks[False], peaks


def _mlp_reference(mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP through autograd's plain path (it keeps both h and gelu(h))."""
    return mlp.fc2(mlp.act(mlp.fc1(x)))


def test_mlp_recomputed_gelu_equals_plain_path_and_keeps_less():
    """The training MLP recomputes gelu(h) in its backward pass (`_GeluLinear`): the same output
    and gradients as the plain path, in fp32 and under bf16 autocast (each gradient in its
    parameter's dtype), and it keeps exactly one hidden-width tensor fewer for the backward."""
    from walt_cli.models.transformer import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 4.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randn(2, 5, 16)
    ref, g = _assert_paths_agree(mlp, x, target, (lambda v: _mlp_reference(mlp, v), mlp))
    assert g.keys() == {n for n, _ in mlp.named_parameters()}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = mlp(x)
        ref_bf16 = _mlp_reference(mlp, x)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16, ref_bf16)
    grads = _grads(mlp, (out_bf16.float() * target).sum())
    ref_grads = _grads(mlp, (ref_bf16.float() * target).sum())
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, ref_grads[name], atol=0.05, rtol=0.02, msg=name)

    weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}

    def saved_bytes(fn) -> int:
        """Bytes of activations kept for the backward pass (weights and their views aside)."""
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.untyped_storage().data_ptr() not in weights:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(mlp, x)
        return total

    hidden = x.numel() // 16 * mlp.fc1.out_features * 4  # one (2, 5, 64) float tensor
    assert saved_bytes(_mlp_reference) - saved_bytes(lambda m, v: m(v)) == hidden
    with torch.no_grad():  # inference takes the plain path: nothing to keep
        torch.testing.assert_close(mlp(x), ref)


def test_mlp_inference_fuses_linear_and_gelu_and_equals_plain_path(monkeypatch):
    """CPU inference runs fc1 and the tanh GELU as one oneDNN call: it is the path taken (the
    op is called), its output equals the plain path's in fp32 on the block's 5D token grid, and
    `WALT_FUSED_MLP=0`, bf16 weights, bf16 autocast and a gradient each keep the plain path."""
    from walt_cli.models import transformer
    from walt_cli.models.transformer import Mlp

    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        pytest.skip("this build of torch has no oneDNN linear-pointwise op")
    torch.manual_seed(0)
    mlp = Mlp(16, 4.0).eval()
    x = torch.randn(2, 3, 4, 5, 16) * 3  # wide enough to reach GELU's curved part
    calls = []
    fused = transformer._fused_gelu_linear

    def counting(v, weight, bias):
        if v.shape == x.shape:  # not the one-off probe of the op
            calls.append(1)
        return fused(v, weight, bias)

    monkeypatch.setattr(transformer, "_fused_gelu_linear", counting)
    monkeypatch.setattr(transformer, "_FUSED_GELU_LINEAR", None)
    state = torch.get_rng_state()
    with torch.no_grad():
        out = mlp(x)
        assert torch.equal(torch.get_rng_state(), state)  # the op's probe draws nothing here
        ref = _mlp_reference(mlp, x)
        assert len(calls) == 1 and out.shape == x.shape
        torch.testing.assert_close(out, ref, **TOL)
        copy.deepcopy(mlp).to(torch.bfloat16)(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mlp(x)
        assert len(calls) == 1
    mlp(x)  # parameters need their gradients: the training path
    assert len(calls) == 1
    monkeypatch.setenv("WALT_FUSED_MLP", "0")
    monkeypatch.setattr(transformer, "_FUSED_GELU_LINEAR", None)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, atol=0, rtol=0)
    assert len(calls) == 1


def test_foreach_ema_equals_per_tensor_lerp():
    from walt_cli.systems.common import ema_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = ema_model(net, decay=0.999)
    expected = [t.detach().clone() for t in (*net.parameters(), *net.buffers())]
    for n in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].num_batches_tracked += 5
        d = min(0.999, (1 + n) / (10 + n)) if n else None  # the first update copies
        current = [t.detach() for t in (*net.parameters(), *net.buffers())]
        for i, (avg, cur) in enumerate(zip(expected, current, strict=True)):
            if d is None:
                expected[i] = cur.clone()
            elif avg.is_floating_point():
                expected[i] = avg + (1 - d) * (cur - avg)
            else:
                expected[i] = (avg * d + cur * (1 - d)).to(avg.dtype)
        ema.update_parameters(net)
    averaged = [t for t in (*ema.module.parameters(), *ema.module.buffers())]
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_adamw_equals_for_loop_adamw_and_fuses_off_cpu_only():
    """On CPU `adamw` keeps the for-each path (the fused kernel broke bitwise resume,
    tests/test_distributed.py); the result equals the plain for-loop AdamW."""
    from walt_cli.systems.common import adamw

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = adamw(list(a.parameters()), lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert not fused.defaults["fused"]
    for _ in range(3):
        x = torch.randn(5, 8)
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_schedule_table_is_copied_once_per_device():
    from walt_cli.diffusion.schedules import make_schedule

    schedule = make_schedule()
    t = torch.tensor([0.0, 0.5, 1.0])
    first = schedule.at(t)
    table = schedule.table(t.device)
    torch.testing.assert_close(schedule.at(t), first)
    assert schedule.table(t.device) is table  # cached, not copied again
    torch.testing.assert_close(table, schedule.alpha_bar)


# ---------------------------------------------------------------- tokenizer layers


def _reference_frame_group_norm(norm, x):
    """GroupNorm applied to each frame on its own (the definition), contiguous output."""
    frames = [
        F.group_norm(x[:, :, i], norm.num_groups, norm.weight, norm.bias, norm.eps)
        for i in range(x.shape[2])
    ]
    return torch.stack(frames, dim=2)


def _reference_causal_conv(layer, x):
    """Zero-pad k_t - 1 frames in front (F.pad), then the convolution."""
    return layer.conv(F.pad(x, (0, 0, 0, 0, layer.kernel_t - 1, 0)))


def test_tokenizer_layers_equal_reference():
    """The frame-major layout the layers now pass along (no copy back after each per-frame norm,
    one copy for the causal padding) changes no value: FrameGroupNorm, CausalConv3d and a
    residual block against reference compositions, forward and gradients."""
    from walt_cli.models.layers import CausalConv3d, FrameGroupNorm, ResBlock3d

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, 6, requires_grad=True)
    norm = FrameGroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    torch.testing.assert_close(norm(x), _reference_frame_group_norm(norm, x), **TOL)
    conv = CausalConv3d(8, 4, 3)
    torch.testing.assert_close(conv(x), _reference_causal_conv(conv, x), **TOL)
    permuted = norm(x)  # a frame-major view, as a norm hands it on
    assert not permuted.is_contiguous()
    torch.testing.assert_close(conv(permuted), _reference_causal_conv(conv, permuted), **TOL)

    block = ResBlock3d(8, 12, num_groups=4)

    def reference(x):
        h = _reference_causal_conv(block.conv1, F.silu(_reference_frame_group_norm(block.norm1, x)))
        h = _reference_causal_conv(block.conv2, F.silu(_reference_frame_group_norm(block.norm2, h)))
        return block.shortcut(x) + h

    for inp in (x, permuted):
        out = block(inp)
        gx = torch.autograd.grad(out.square().sum(), [x, *block.parameters()], retain_graph=True)
        ref = reference(inp)
        gr = torch.autograd.grad(ref.square().sum(), [x, *block.parameters()], retain_graph=True)
        torch.testing.assert_close(out, ref, **TOL)
        for a, b in zip(gx, gr, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_inference_bias_cache_follows_the_table():
    """Without gradients the gathered bias is reused, and refreshed when the table changes
    (an optimizer or EMA step updates it in place)."""
    from walt_cli.models.attention import RelativePositionBias

    bias = RelativePositionBias((2, 3, 3), heads=2)
    with torch.no_grad():
        first = bias((2, 3, 3))
        assert bias((2, 3, 3)) is first
        bias.table.add_(1.0)
        torch.testing.assert_close(bias((2, 3, 3)), first + 1.0)
    assert bias((2, 3, 3)).requires_grad  # with gradients: gathered in the graph


def test_inference_bias_cache_follows_a_moved_table():
    """`module.to(...)` keeps the table's Parameter (same id, same version counter) and swaps its
    storage: the cached bias must follow it. A stale CPU bias reached a CUDA kernel when the
    FLOP count ran a forward pass on the CPU before training moved the model to the GPU; a
    dtype move shows the same on a CPU."""
    from walt_cli.models.attention import RelativePositionBias

    bias = RelativePositionBias((2, 3, 3), heads=2)
    with torch.no_grad():
        before = bias((2, 3, 3))
        bias.to(torch.float64)
        after = bias((2, 3, 3))
    assert after.dtype == torch.float64 and after.device == bias.table.device
    torch.testing.assert_close(after, before.double())


def test_auto_attention_choice_per_device():
    """The "auto" choice: SDPA on CUDA, training too (its memory-efficient kernel
    differentiates the bias; FlexAttention lost to it on an H200, BENCHMARKS.md), the
    hand-written kernel for CPU training with a learned bias, SDPA for CPU inference."""
    from types import SimpleNamespace

    from walt_cli.models.attention import attention_impl

    def on(kind):
        return SimpleNamespace(device=SimpleNamespace(type=kind))  # all attention_impl reads

    assert attention_impl(on("cuda"), bias_grad=True) == "sdpa"
    assert attention_impl(on("cpu"), bias_grad=True) == "window"
    assert attention_impl(on("cpu"), bias_grad=False) == "sdpa"
    with torch.no_grad():
        assert attention_impl(on("cpu"), bias_grad=True) == "sdpa"
