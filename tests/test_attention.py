"""Window attention against a dense reference written independently of the window code: every
token attends to every token of the clip, with the relative bias looked up from global
coordinates and a -inf mask between tokens of different windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from walt_cli.models.attention import (
    RelativePositionBias,
    WindowCrossAttention,
    WindowSelfAttention,
    effective_window,
    sdpa_backend,
    window_merge,
    window_partition,
)


def _coords(t: int, h: int, w: int) -> torch.Tensor:
    """(N, 3) integer coordinates of the tokens of a T x H x W grid, row-major."""
    return torch.stack(
        torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1
    ).reshape(-1, 3)


def _same_window(coords: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    wid = coords // torch.tensor(window)  # window index along each axis
    return (wid[:, None, :] == wid[None, :, :]).all(-1)  # (N, N)


def _dense_self_attention(
    attn: WindowSelfAttention, x: torch.Tensor, identity: torch.Tensor | None = None
) -> torch.Tensor:
    b, t, h, w, c = x.shape
    heads, d = attn.heads, attn.head_dim
    coords = _coords(t, h, w)
    window = effective_window((t, h, w), attn.window, attn.temporal)
    tokens = x.reshape(b, t * h * w, c)
    q, k, v = attn.qkv(tokens).reshape(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, N, N)
    if attn.bias is not None:
        table = attn.bias.table  # (heads, 2Wt-1, 2Wh-1, 2Ww-1)
        extent = torch.tensor(attn.bias.window)
        rel = coords[:, None, :] - coords[None, :, :] + extent - 1  # (N, N, 3)
        rel = torch.minimum(rel.clamp(min=0), 2 * extent - 2)  # pairs across windows: masked below
        logits = logits + table[:, rel[..., 0], rel[..., 1], rel[..., 2]]
    logits = logits.masked_fill(~_same_window(coords, window), float("-inf"))
    if identity is not None:  # image samples: each token attends to itself only
        eye = torch.eye(len(coords), dtype=torch.bool)
        logits = torch.where(
            identity[:, None, None, None] & ~eye, torch.tensor(float("-inf")), logits
        )
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)
    return attn.proj(out).reshape(b, t, h, w, c)


def test_partition_merge_round_trip():
    x = torch.randn(2, 4, 6, 10, 3)
    for window in [(1, 3, 5), (4, 2, 2), (2, 6, 10), (1, 1, 1)]:
        parts = window_partition(x, window)
        assert parts.shape == (2 * x.shape[1] * 60 // math.prod(window), math.prod(window), 3)
        torch.testing.assert_close(window_merge(parts, window, (4, 6, 10)), x)
    # one window of a partition holds exactly the tokens of that block of the grid
    parts = window_partition(x, (2, 3, 5))
    torch.testing.assert_close(parts[1], x[0, 0:2, 0:3, 5:10].reshape(-1, 3))


@pytest.mark.parametrize("temporal", [False, True])
def test_window_covering_grid_equals_full_attention(temporal):
    """A window equal to the grid is full attention (STW: over the whole clip; SW: the frame)."""
    attn = WindowSelfAttention(32, 4, (6, 8), temporal=temporal, max_frames=3)
    x = torch.randn(2, 3, 6, 8, 32)
    torch.testing.assert_close(attn(x), _dense_self_attention(attn, x), atol=1e-5, rtol=1e-4)
    if temporal:  # and no mask at all: plain attention over all 3*6*8 tokens with the bias
        b = x.shape[0]
        tokens = x.reshape(b, -1, 32)
        q, k, v = attn.qkv(tokens).reshape(b, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
        bias = attn.bias((3, 6, 8))
        out = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v, attn_mask=bias)
        full = attn.proj(out.transpose(1, 2).reshape(b, -1, 32)).reshape(x.shape)
        torch.testing.assert_close(attn(x), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "temporal,window,grid",
    [
        (False, (4, 4), (3, 8, 8)),  # SW, windows tile the frame
        (True, (4, 4), (3, 8, 8)),  # STW 3x4x4
        (True, (4, 4), (2, 6, 10)),  # does not divide: padded, padding masked
        (False, (3, 4), (2, 5, 7)),
        (True, (16, 16), (2, 8, 8)),  # larger than the grid: clamped (= full attention)
    ],
)
def test_windowed_attention_equals_dense_reference(temporal, window, grid):
    attn = WindowSelfAttention(16, 2, window, temporal=temporal, max_frames=3)
    x = torch.randn(2, *grid, 16)
    torch.testing.assert_close(attn(x), _dense_self_attention(attn, x), atol=1e-5, rtol=1e-4)


def test_windows_do_not_leak():
    """Changing one window's tokens leaves every other window unchanged."""
    attn = WindowSelfAttention(16, 2, (4, 4), temporal=True, max_frames=2)
    x = torch.randn(1, 2, 8, 8, 16)
    y = x.clone()
    y[:, :, :4, :4] += torch.randn(1, 2, 4, 4, 16)
    ox, oy = attn(x), attn(y)
    torch.testing.assert_close(ox[:, :, 4:], oy[:, :, 4:])
    torch.testing.assert_close(ox[:, :, :, 4:], oy[:, :, :, 4:])
    assert not torch.allclose(ox[:, :, :4, :4], oy[:, :, :4, :4])


def test_identity_attention_for_images():
    """Image samples in an STW layer pass their values through (then the output projection);
    video samples in the same batch attend normally."""
    attn = WindowSelfAttention(16, 2, (4, 4), temporal=True, max_frames=3)
    x = torch.randn(3, 3, 4, 8, 16)
    identity = torch.tensor([True, False, True])
    out = attn(x, identity)
    torch.testing.assert_close(out, _dense_self_attention(attn, x, identity), atol=1e-5, rtol=1e-4)
    v = attn.qkv(x)[..., 32:]
    torch.testing.assert_close(out[0], attn.proj(v[0]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], attn(x[1:2])[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x[:1], identity[:1]), out[:1], atol=1e-6, rtol=1e-5)


def _dense_cross_attention(attn, x, text, mask):
    """Per frame: tokens attend to the tokens of their window and to the frame's real text."""
    b, t, h, w, c = x.shape
    heads, d = attn.heads, attn.head_dim
    window = effective_window((1, h, w), attn.window, temporal=False)
    coords = _coords(1, h, w)
    same = _same_window(coords, window)  # (N, N)
    out = torch.empty_like(x)
    for i in range(b):
        for f in range(t):
            tokens = x[i, f].reshape(-1, c)
            ctx = torch.cat([tokens, text[i, f]], 0)
            q = attn.q_norm(attn.q(tokens).reshape(-1, heads, d).transpose(0, 1))
            k, v = attn.kv(ctx).reshape(-1, 2, heads, d).permute(1, 2, 0, 3)
            logits = q @ attn.k_norm(k).transpose(-1, -2) / math.sqrt(d)
            allowed = torch.cat([same, mask[i, f][None].expand(len(coords), -1)], 1)
            logits = logits.masked_fill(~allowed, float("-inf"))
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, c)
            out[i, f] = attn.proj(o).reshape(h, w, c)
    return out


def test_cross_attention_equals_dense_reference_and_ignores_padding():
    attn = WindowCrossAttention(16, 2, (4, 4))
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 2, 6, 8, 16)
    text = torch.randn(2, 2, 5, 16)
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])
    mask = mask.bool()
    out = attn(x, text, mask)
    torch.testing.assert_close(
        out, _dense_cross_attention(attn, x, text, mask), atol=1e-5, rtol=1e-4
    )
    # masked-out text tokens have no influence
    text2 = torch.where(mask[..., None], text, torch.randn_like(text))
    torch.testing.assert_close(attn(x, text2, mask), out, atol=1e-6, rtol=1e-5)
    # the real tokens do
    assert not torch.allclose(attn(x, torch.randn_like(text), mask)[0, 0], out[0, 0])


def test_relative_bias_resize():
    bias = RelativePositionBias((5, 8, 8), heads=3)
    before = bias.table.detach().clone()
    bias.resize((5, 8, 8))
    torch.testing.assert_close(bias.table, before)
    bias.resize((5, 8, 14))  # the paper's 5x8x8 -> 5x8x14 STW window fine-tune
    assert bias.table.shape == (3, 9, 15, 27)
    torch.testing.assert_close(bias.table[..., 0], before[..., 0])  # end offsets kept
    torch.testing.assert_close(bias.table[..., -1], before[..., -1])
    assert bias((5, 8, 14)).shape == (3, 5 * 8 * 14, 5 * 8 * 14)
    const = RelativePositionBias((1, 4, 4), heads=1)
    torch.nn.init.constant_(const.table, 0.7)
    const.resize((1, 6, 9))
    torch.testing.assert_close(const.table, torch.full_like(const.table, 0.7))


def test_sdpa_backend_is_reported():
    q = torch.randn(2, 2, 16, 8)
    names = {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH", "OVERRIDEABLE"}
    impls = {"window", "flex"} | {f"sdpa:{n}" for n in names}
    assert sdpa_backend(q, q, q) in names
    assert sdpa_backend(q, q, q, torch.zeros(1, 2, 16, 16)) in names
    attn = WindowSelfAttention(16, 2, (4, 4), temporal=True, max_frames=2)
    assert attn.backend(torch.zeros(1, 2, 8, 8, 16)) in impls
    assert attn.backend(torch.zeros(1, 2, 6, 10, 16)) in impls  # padded windows
    # training with a learned bias needs the bias gradient, which no fused SDPA kernel gives:
    # on CPU the hand-written kernel runs; without a bias SDPA's fused kernel runs
    trained = attn.backend(torch.zeros(1, 2, 8, 8, 16), training=True)
    plain = WindowSelfAttention(16, 2, (4, 4), temporal=True, relative_bias=False)
    assert trained == "window"
    assert plain.backend(torch.zeros(1, 2, 8, 8, 16), training=True) == "sdpa:FLASH_ATTENTION"
    # the reference SDPA path with a learned bias falls back to the MATH kernel in training
    bias = torch.zeros(1, 2, 16, 16)
    assert sdpa_backend(q, q, q, bias, training=True) == "MATH"
