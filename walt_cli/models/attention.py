"""Window attention primitives of W.A.L.T [P §4.2]: partition/merge, relative position bias,
spatial-window (SW) and spatiotemporal-window (STW) self-attention, windowed cross-attention.

Tokens are kept on their grid as `(B, T, H, W, C)` (T latent frames, H x W tokens per frame).
A window is `(wt, wh, ww)` tokens. Windows are cut with einops, batched along the first axis and
handed to `F.scaled_dot_product_attention` as `(B * nW, heads, N, head_dim)` with N = wt*wh*ww:
no dense mask over the whole sequence is ever built.

Window rules (DESIGN §5):
- SW layers attend inside `1 x wh x ww` (one latent frame); STW layers inside `T x wh x ww`,
  the temporal extent is always the whole clip.
- A spatial window larger than the grid is clamped to the grid; one that does not divide the
  grid pads the grid to a multiple of it, and padded keys are masked out.
- A window equal to the grid is full attention.
- In STW layers an image sample (a stack of independent images) uses the paper's identity
  attention: every token attends only to itself, so its value passes through as is.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from walt_cli.errors import WaltError

Window = tuple[int, int, int]


# ---------------------------------------------------------------- partition / merge


def window_partition(x: Tensor, window: Window) -> Tensor:
    """(B, T, H, W, C) -> (B * nW, wt * wh * ww, C). T, H, W must be multiples of the window."""
    wt, wh, ww = window
    return rearrange(
        x, "b (nt wt) (nh wh) (nw ww) c -> (b nt nh nw) (wt wh ww) c", wt=wt, wh=wh, ww=ww
    )


def window_merge(x: Tensor, window: Window, grid: tuple[int, int, int]) -> Tensor:
    """Inverse of `window_partition`: (B * nW, N, C) -> (B, T, H, W, C) for grid (T, H, W)."""
    wt, wh, ww = window
    t, h, w = grid
    return rearrange(
        x,
        "(b nt nh nw) (wt wh ww) c -> b (nt wt) (nh wh) (nw ww) c",
        nt=t // wt,
        nh=h // wh,
        nw=w // ww,
        wt=wt,
        wh=wh,
        ww=ww,
    )


def effective_window(
    grid: tuple[int, int, int], spatial: tuple[int, int], temporal: bool
) -> Window:
    """The window that runs on `grid` (T, H, W): spatial extent clamped to the grid; the temporal
    extent is the whole clip for STW layers (`temporal=True`) and 1 for SW layers."""
    t, h, w = grid
    return (t if temporal else 1, min(spatial[0], h), min(spatial[1], w))


def pad_to_windows(x: Tensor, window: Window) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad (B, T, H, W, C) on the bottom/right so H, W are multiples of the window.
    Returns the padded tensor and the padding (pad_h, pad_w)."""
    _, _, h, w, _ = x.shape
    pad_h, pad_w = (-h) % window[1], (-w) % window[2]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def key_padding_mask(
    grid: tuple[int, int, int], window: Window, valid_hw: tuple[int, int], device: torch.device
) -> Tensor:
    """(nW, N) bool: True where a window position holds a real (not padded) token; `grid` is the
    padded grid, `valid_hw` the true spatial size."""
    t, h, w = grid
    valid = torch.zeros(1, t, h, w, 1, dtype=torch.bool, device=device)
    valid[:, :, : valid_hw[0], : valid_hw[1]] = True
    return window_partition(valid, window)[..., 0]  # (nW, N)


# ---------------------------------------------------------------- relative position bias


def _relative_index(window: Window, table: Window) -> Tensor:
    """(N, N) long on the CPU: flat index into a `(2*Wt-1) x (2*Wh-1) x (2*Ww-1)` bias table."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(
        1
    )  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N): offset of query i to key j
    # Offsets beyond the table (only when a window outgrows the table it was trained with and
    # was not resized) are clipped to the table's edge, as in clipped relative positions.
    extent = torch.tensor(table).view(3, 1, 1)
    rel = torch.maximum(torch.minimum(rel, extent - 1), 1 - extent) + extent - 1
    sizes = 2 * extent - 1
    return (rel[0] * sizes[1] + rel[1]) * sizes[2] + rel[2]  # (N, N) into the flat table


_INDEX_CACHE: dict[tuple[Window, Window, str], Tensor] = {}


def relative_index(window: Window, table: Window, device: torch.device) -> Tensor:
    """(N, N) long: flat index into a `(2*Wt-1) x (2*Wh-1) x (2*Ww-1)` bias table (Swin).

    Cached per (window, table, device) in eager mode; under `torch.compile` it is built in the
    graph (a constant there), since a Python-side cache would break the graph."""
    if torch.compiler.is_compiling():
        return _relative_index(window, table).to(device)
    key = (window, table, str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _relative_index(window, table).to(device)
    return _INDEX_CACHE[key]


class RelativePositionBias(nn.Module):
    """Swin-style relative position bias [P §4.2, Liu et al. 2021]: one learned scalar per head
    and per 3D offset inside a window, added to the attention logits.

    The table covers the offsets of `window` = (Wt, Wh, Ww); a smaller effective window (a grid
    smaller than the window) reads the central part of the table. `resize` interpolates the table
    to a new window (the paper's 128x128 -> 128x224 fine-tune).
    """

    def __init__(self, window: Window, heads: int) -> None:
        super().__init__()
        self.window: Window = tuple(window)  # type: ignore[assignment]
        wt, wh, ww = self.window
        self.table = nn.Parameter(torch.zeros(heads, 2 * wt - 1, 2 * wh - 1, 2 * ww - 1))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, window: Window) -> Tensor:
        """(heads, N, N) bias for an effective window (wt, wh, ww).

        Without a gradient to the table (sampling, evaluation) the gathered bias is kept until
        the table changes (an optimizer or EMA step, a load, a move to another device or dtype),
        so 50 sampling steps gather once."""
        window = tuple(window)
        table = self.table
        if torch.compiler.is_compiling() or (table.requires_grad and torch.is_grad_enabled()):
            return self._gather(window)
        # `module.to(...)` swaps the parameter's storage but keeps its id and version counter:
        # the storage address, device and dtype tell a moved table (a bias gathered on the CPU,
        # e.g. by the FLOP count before training, once reached a CUDA kernel).
        key = (window, id(table), table._version, table.data_ptr(), table.device, table.dtype)
        cache = self.__dict__.setdefault("_inference_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = self._gather(window)
        return cache[key]

    @torch.no_grad()
    def add_locality_prior(self, slopes: list[float]) -> None:
        """Subtract slope_h x (spatial distance in tokens) from head h's table, the same for
        every temporal offset: an ALiBi-like start [Press et al. 2022] in which each head first
        looks near the query, at its own range (slope 0: the head stays global)."""
        if len(slopes) != self.table.shape[0]:
            raise WaltError(f"{len(slopes)} locality slopes for {self.table.shape[0]} heads")
        _, wh, ww = self.window
        dh = torch.arange(1 - wh, wh, dtype=torch.float32)[:, None]
        dw = torch.arange(1 - ww, ww, dtype=torch.float32)[None, :]
        distance = (dh**2 + dw**2).sqrt().to(self.table)  # (2wh-1, 2ww-1)
        slope = torch.tensor(slopes, dtype=self.table.dtype, device=self.table.device)
        self.table.sub_(slope[:, None, None, None] * distance)

    def _gather(self, window: Window) -> Tensor:
        index = relative_index(window, self.window, self.table.device)
        return self.table.flatten(1)[:, index]  # (heads, N, N)

    @torch.no_grad()
    def resize(self, window: Window) -> None:
        """Interpolate the table (trilinear over offsets) to cover a new window."""
        window = tuple(window)  # type: ignore[assignment]
        if window == self.window:
            return
        size = tuple(2 * n - 1 for n in window)
        table = F.interpolate(
            self.table.data[None].float(), size=size, mode="trilinear", align_corners=True
        )[0]
        self.table = nn.Parameter(table.to(self.table.dtype))
        self.window = window


# ---------------------------------------------------------------- window attention kernels
#
# Three implementations of softmax(q k^T / sqrt(d) + bias + padding) v over windows, equal to
# float tolerance (tests/test_attention.py), chosen by `attention_impl`:
# - "sdpa": `F.scaled_dot_product_attention` with the bias and padding as one additive mask (the
#   reference), and the CUDA path. In inference it runs a fused kernel; in training a learned
#   bias needs its gradient, which CUDA's memory-efficient kernel gives and no CPU kernel does
#   (the CPU falls back to the MATH kernel).
# - "window": the same computation by hand (`WindowAttentionFunction`), the CPU training path:
#   the bias is added in place, only the softmax's log-normaliser is kept for the backward
#   pass, and the bias gradient is summed over the windows directly; no mask is expanded.
# - "flex": FlexAttention with the bias as a `score_mod` and the padding as a block mask (a
#   compiled kernel that also differentiates the bias table), on request only: on an H200
#   (torch 2.11, BENCHMARKS.md "GPU") it trained walt-xl 3-17% slower than "sdpa", failed to
#   compile for walt-l (its Triton kernel wanted more shared memory than the chip has), and
#   trained the default model's small base at only 1.7 steps/s (batch 64).

ATTENTION_IMPLS = ("auto", "sdpa", "window", "flex")
_attention_impl = os.environ.get("WALT_ATTENTION", "auto")


def set_attention_impl(name: str) -> None:
    """Force one window-attention implementation for every layer ("auto" restores the default:
    the hand-written kernel for CPU training with a learned bias, SDPA otherwise)."""
    global _attention_impl
    if name not in ATTENTION_IMPLS:
        raise WaltError(
            f"unknown attention implementation {name!r}; choose one of {ATTENTION_IMPLS}"
        )
    _attention_impl = name


def attention_impl(q: Tensor, *, bias_grad: bool) -> str:
    """The implementation `window_attention` runs for queries q with a bias that needs a gradient
    (`bias_grad`) or not."""
    if _attention_impl != "auto":
        return _attention_impl
    if bias_grad and torch.is_grad_enabled() and q.device.type != "cuda":
        return "window"
    return "sdpa"


# The fused CPU attention forward that returns its log-sum-exp (a private ATen op: torch is pinned
# to 2.13, and the by-hand forward stands in where a build lacks it).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class WindowAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + bias + pad) v with a hand-written backward (FlashAttention's
    gradient identities), for a learned bias on CPU.

    Written by hand because SDPA's fused kernels return no gradient for an additive mask, and
    its MATH fallback expands the mask per window, checks every row for -inf, keeps scaled
    copies of q and k and the (B nW, heads, N, N) softmax for the backward pass. Here only the
    row log-sum-exp (B nW, heads, N) is kept and the softmax is recomputed in the backward pass
    (one more q k^T product), so a window's attention matrix never outlives its layer.

    q, k, v (B nW, heads, N, d); bias (heads, N, N) or None; pad (nW, 1, 1, N) additive
    (0 / -inf) or None, shared by the B samples.
    """

    @staticmethod
    def _logits(q, k, bias, pad, scale: float) -> Tensor:
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B nW, heads, N, N)
        if bias is not None:
            s += bias
        if pad is not None:
            n, heads, length, _ = s.shape
            s.view(-1, pad.shape[0], heads, length, length).add_(pad)
        return s

    @staticmethod
    def forward(ctx, q, k, v, bias, pad, scale: float):  # type: ignore[override]
        if pad is None and q.device.type == "cpu" and _CPU_FLASH is not None:
            # ATen's fused CPU kernel (what SDPA runs in inference) also returns the row
            # log-sum-exp: 1.6-2.2x faster than the three passes below (BENCHMARKS.md). Padded
            # windows keep the by-hand path: their mask differs per window, not per head.
            mask = None if bias is None else bias[None]
            out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
            lse = lse.unsqueeze(-1)  # (B nW, heads, N, 1)
        else:
            s = WindowAttentionFunction._logits(q, k, bias, pad, scale)
            lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B nW, heads, N, 1)
            p = s.sub_(lse).exp_()  # softmax, in place of the logits
            out = torch.matmul(p, v)  # (B nW, heads, N, d)
        ctx.save_for_backward(q, k, v, bias, pad, lse, out)
        ctx.scale = scale
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, bias, pad, lse, out = ctx.saved_tensors
        p = WindowAttentionFunction._logits(q, k, bias, pad, ctx.scale).sub_(lse).exp_()
        grad_v = torch.matmul(p.transpose(-1, -2), grad_out)
        # dS = P * (dP - rowsum(dO * O)), with rowsum(dO * O) = rowsum(P * dP)
        ds = torch.matmul(grad_out, v.transpose(-1, -2))  # dP
        ds.sub_((grad_out * out).sum(-1, keepdim=True)).mul_(p)
        del p
        grad_bias = ds.sum(0) if ctx.bias_grad else None  # (heads, N, N)
        grad_q = torch.matmul(ds, k).mul_(ctx.scale)
        grad_k = torch.matmul(ds.transpose(-1, -2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, grad_bias, None, None


_COMPILED_FLEX = None


def _flex_attention(q, k, v, score_mod, block_mask, scale=None):
    """FlexAttention, compiled once outside a compiled region (eager FlexAttention is a slow
    reference; inside `torch.compile` it is traced into the block's graph)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or q.device.type == "cpu":
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _flex_window_attention(q, k, v, table, index, keep, scale=None):
    """FlexAttention over windows: the bias read from the flat table (heads, M) through the
    relative index (N, N) in a `score_mod`; padded keys (keep (nW, N) False) removed by a block
    mask (window b of the batch is window b % nW of its sample)."""
    from torch.nn.attention.flex_attention import create_block_mask

    score_mod = None
    if table is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, index[q_idx, kv_idx]]

    block_mask = None
    if keep is not None:
        n_win = keep.shape[0]

        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b % n_win, kv_idx]

        n, _, length, _ = q.shape
        block_mask = create_block_mask(mask_mod, n, None, length, length, device=q.device)
    return _flex_attention(q, k, v, score_mod, block_mask, scale)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: RelativePositionBias | None,
    window: Window,
    keep: Tensor | None,
    impl: str | None = None,
    scale: float | None = None,
) -> Tensor:
    """Self-attention inside windows: q, k, v (B nW, heads, N, d) -> (B nW, heads, N, d), with the
    relative position bias of `window` and padded keys (keep (nW, N) False) masked out. The
    logits are q k^T times `scale` (None: 1 / sqrt(d))."""
    impl = impl or attention_impl(q, bias_grad=bias is not None and bias.table.requires_grad)
    if impl == "flex":
        table = index = None
        if bias is not None:
            table = bias.table.flatten(1).to(q.dtype)  # (heads, M)
            index = relative_index(window, bias.window, q.device)
        return _flex_window_attention(q, k, v, table, index, keep, scale)
    pad = None
    if keep is not None:
        pad = torch.zeros(keep.shape, device=q.device, dtype=q.dtype).masked_fill(
            ~keep, float("-inf")
        )[:, None, None, :]  # (nW, 1, 1, N)
    table_bias = None if bias is None else bias(window).to(q.dtype)  # (heads, N, N)
    if impl == "window":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return WindowAttentionFunction.apply(q, k, v, table_bias, pad, scale)
    if impl != "sdpa":
        raise WaltError(f"unknown attention implementation {impl!r}")
    mask = None if table_bias is None else table_bias[None]  # (1, heads, N, N)
    if pad is not None:
        mask = pad if mask is None else mask + pad  # (nW, heads, N, N)
        mask = mask.repeat(q.shape[0] // pad.shape[0], 1, 1, 1)  # one per (sample, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------- SDPA backend report


_BACKWARD_NAMES = {
    "ScaledDotProductFlashAttentionForCpuBackward0": "FLASH_ATTENTION",
    "ScaledDotProductFlashAttentionBackward0": "FLASH_ATTENTION",
    "ScaledDotProductEfficientAttentionBackward0": "EFFICIENT_ATTENTION",
    "ScaledDotProductCudnnAttentionBackward0": "CUDNN_ATTENTION",
}


def sdpa_backend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *, training: bool = False
) -> str:
    """Name of the kernel `F.scaled_dot_product_attention` runs for these inputs
    (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH).

    Inference asks PyTorch's own dispatcher. `training=True` runs the call once with gradients
    (q, k, v and a float mask requiring grad, as a learned relative position bias does) and
    reads the kernel off the autograd graph: a learned bias needs its gradient, which CUDA's
    flash kernel (no masks at all) and the CPU fused kernel do not give, so training with a
    bias runs the memory-efficient kernel on CUDA and the math kernel on CPU."""
    try:
        from torch.nn.attention import SDPBackend

        if not training:
            choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, False)
            return SDPBackend(choice).name
        with torch.enable_grad():
            q, k, v = (z.detach().requires_grad_() for z in (q, k, v))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.detach().requires_grad_()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return _BACKWARD_NAMES.get(type(out.grad_fn).__name__, "MATH")
    except Exception as err:  # private API: report rather than fail
        return f"unknown ({type(err).__name__})"


# ---------------------------------------------------------------- attention layers


class QKNorm(nn.RMSNorm):
    """Query-key normalisation (ViT-22B; [P Table 3e]) as RMSNorm over the head dimension, with
    the weight cast to the input's dtype so that under autocast (bf16 q, k; fp32 weight) it
    keeps PyTorch's fused RMSNorm instead of warning and taking the slow path."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def _qk_norm(head_dim: int, enabled: bool) -> nn.Module:
    return QKNorm(head_dim, eps=1e-6) if enabled else nn.Identity()


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows (SW or STW layer) [P §4.2].

    Args:
        dim: model width.
        heads: number of heads.
        window: spatial window (wh, ww) in tokens.
        temporal: False for an SW layer (window 1 x wh x ww), True for an STW layer (T x wh x ww).
        max_frames: frames the STW bias table covers (the latent clip length).
        qk_norm: RMSNorm on queries and keys.
        relative_bias: add the Swin relative position bias.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: tuple[int, int],
        *,
        temporal: bool,
        max_frames: int = 1,
        qk_norm: bool = True,
        relative_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise WaltError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.window = tuple(window)
        self.temporal = temporal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _qk_norm(self.head_dim, qk_norm)
        self.k_norm = _qk_norm(self.head_dim, qk_norm)
        self.proj = nn.Linear(dim, dim)
        table = (max_frames if temporal else 1, *self.window)
        self.bias = RelativePositionBias(table, heads) if relative_bias else None

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        """x (B, T, H, W, C) -> (B, T, H, W, C). `identity` (B,) bool marks samples whose tokens
        attend only to themselves (packs of independent images in STW layers)."""
        b, t, h, w, _ = x.shape
        window = effective_window((t, h, w), self.window, self.temporal)
        x, (pad_h, pad_w) = pad_to_windows(x, window)
        grid = (t, h + pad_h, w + pad_w)
        n_win = (grid[0] // window[0]) * (grid[1] // window[1]) * (grid[2] // window[2])

        xw = window_partition(x, window)  # (B nW, N, C)
        qkv = self.qkv(xw)
        scale = None  # 1 / sqrt(d)
        if self._folds_qk_norm():
            q, k, v = self._folded_qkv(qkv)
            scale = 1.0  # folded into q
        else:
            q, k, v = rearrange(qkv, "n l (three h d) -> three n h l d", three=3, h=self.heads)
            q, k = self.q_norm(q), self.k_norm(k)  # (B nW, heads, N, head_dim)
        keep = (
            None if (pad_h, pad_w) == (0, 0) else key_padding_mask(grid, window, (h, w), x.device)
        )

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return window_attention(q, k, v, bias=self.bias, window=window, keep=keep, scale=scale)

        if identity is None:
            out = attend(q, k, v)
        elif x.device.type == "cpu" and not torch.compiler.is_compiling():
            # Reading the flags costs no device sync here: attend over the video samples only.
            video = (~identity).nonzero().flatten().tolist()
            if len(video) == b:
                out = attend(q, k, v)
            else:  # identity attention: softmax over the token itself = its value
                out = v.clone()
                if video:
                    rows = torch.tensor(
                        [i * n_win + j for i in video for j in range(n_win)], device=x.device
                    )
                    out[rows] = attend(q[rows], k[rows], v[rows])
        else:  # no data-dependent shapes (no host sync, one compiled graph)
            image = identity.repeat_interleave(n_win)[:, None, None, None]  # (B nW, 1, 1, 1)
            out = torch.where(image, v, attend(q, k, v))
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))  # (B nW, N, C)
        out = window_merge(out, window, grid)  # (B, T, H', W', C)
        return out[:, :, :h, :w]

    def _folds_qk_norm(self) -> bool:
        """Whether this call takes `_folded_qkv`: qk-norm on, not under autocast (whose norms
        may compute in another precision than the fold), and no gradient to its weights or to
        the qkv projection (inference), so that training keeps the reference path bit for bit."""
        if not (isinstance(self.q_norm, QKNorm) and isinstance(self.k_norm, QKNorm)):
            return False
        device = self.qkv.weight.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            return False  # (autocast knows no other device type: `walt plan`'s meta tensors)
        params = (self.qkv.weight, self.q_norm.weight, self.k_norm.weight)
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def _folded_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B nW, heads, N, d) from the projection (B nW, N, 3C), with qk-norm applied
        and its two weights and the 1 / sqrt(d) folded into q (the logits, q k^T, are the same
        product): one RMS pass over q and k together on the projection's layout, where the
        reference path copies q and k out of it and normalises and scales each on its own.
        The logits' scale is then 1. Equal to the reference within float rounding
        (tests/test_fast_paths.py); 2-4% off the time of 50-step CPU sampling of a width-64
        model (BENCHMARKS.md, "Two CPU inference paths")."""
        n, length, _ = qkv.shape
        qkv = qkv.view(n, length, 3, self.heads, self.head_dim)
        qk = qkv[:, :, :2]
        eps = self.q_norm.eps if self.q_norm.eps is not None else torch.finfo(qk.dtype).eps
        qk = qk * torch.rsqrt(qk.square().mean(-1, keepdim=True).add_(eps))
        gain = self.q_norm.weight * self.k_norm.weight * self.head_dim**-0.5
        qk[:, :, 0].mul_(gain.to(qk.dtype))
        q, k = qk.permute(2, 0, 3, 1, 4)  # each (B nW, heads, N, d)
        return q, k, qkv[:, :, 2].transpose(1, 2)

    def backend(self, x: Tensor, *, training: bool = False) -> str:
        """The attention implementation (and SDPA kernel) this layer runs for x (B, T, H, W, C):
        "window" (hand-written, CPU training with a learned bias), "flex" (FlexAttention, on
        request) or "sdpa:<KERNEL>"."""
        b, t, h, w, c = x.shape
        window = effective_window((t, h, w), self.window, self.temporal)
        grid = (t, math.ceil(h / window[1]) * window[1], math.ceil(w / window[2]) * window[2])
        n = window[0] * window[1] * window[2]
        q = x.new_zeros(1, self.heads, n, self.head_dim)  # one window
        with torch.set_grad_enabled(training):
            impl = attention_impl(q, bias_grad=self.bias is not None and training)
        if impl != "sdpa":
            return impl
        mask = None if self.bias is None else self.bias(window)[None].to(q.dtype)
        if grid[1:] != (h, w):
            keep = key_padding_mask(grid, window, (h, w), x.device)[:1]
            pad = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
            mask = pad[:, None, None, :] if mask is None else mask + pad[:, None, None, :]
        return "sdpa:" + sdpa_backend(q, q, q, mask, training=training)


class WindowCrossAttention(nn.Module):
    """Cross-attention to text inside spatial windows (DESIGN §5, [P §4.3]):
    q = W_q x_win, K = W_k [x_win ; text], V = W_v [x_win ; text], with `text` already projected
    to the model width (P text) and its padding masked out. A frame whose text is entirely masked
    (a dropped caption) attends to its own window only.
    """

    def __init__(
        self, dim: int, heads: int, window: tuple[int, int], *, qk_norm: bool = True
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.window = tuple(window)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = _qk_norm(self.head_dim, qk_norm)
        self.k_norm = _qk_norm(self.head_dim, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """x (B, T, H, W, C); text (B, T, L, C) per-frame projected captions; text_mask (B, T, L)
        bool, True for real tokens. Returns (B, T, H, W, C)."""
        b, t, h, w, _ = x.shape
        window = effective_window((t, h, w), self.window, temporal=False)
        x, (pad_h, pad_w) = pad_to_windows(x, window)
        grid = (t, h + pad_h, w + pad_w)
        per_frame = (grid[1] // window[1]) * (grid[2] // window[2])  # windows per frame

        xw = window_partition(x, window)  # (B T nW, N, C)
        q = rearrange(self.q(xw), "n l (h d) -> n h l d", h=self.heads)
        k_x, v_x = rearrange(self.kv(xw), "n l (two h d) -> two n h l d", two=2, h=self.heads)
        # Text keys/values are computed once per frame and shared by that frame's windows.
        k_t, v_t = rearrange(
            self.kv(text), "b t l (two h d) -> two (b t) h l d", two=2, h=self.heads
        )
        k_t, v_t = (z.repeat_interleave(per_frame, dim=0) for z in (k_t, v_t))  # (B T nW, ...)
        k = self.k_norm(torch.cat([k_x, k_t], dim=2))  # (B T nW, heads, N + L, head_dim)
        v = torch.cat([v_x, v_t], dim=2)
        q = self.q_norm(q)

        keep_x = key_padding_mask(grid, window, (h, w), x.device).repeat(b, 1)  # (B T nW, N)
        keep_t = text_mask.reshape(b * t, -1).repeat_interleave(per_frame, dim=0)
        keep = torch.cat([keep_x, keep_t.to(torch.bool)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))
        return window_merge(out, window, grid)[:, :, :h, :w]
