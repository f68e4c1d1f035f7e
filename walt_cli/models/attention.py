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
from functools import lru_cache

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


@lru_cache(maxsize=64)
def _relative_index_cpu(window: Window, table: Window) -> Tensor:
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
    """(N, N) long: flat index into a `(2*Wt-1) x (2*Wh-1) x (2*Ww-1)` bias table (Swin)."""
    key = (window, table, str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _relative_index_cpu(window, table).to(device)
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
        """(heads, N, N) bias for an effective window (wt, wh, ww)."""
        index = relative_index(tuple(window), self.window, self.table.device)
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


def _qk_norm(head_dim: int, enabled: bool) -> nn.Module:
    # Query-key normalisation (ViT-22B; [P Table 3e]) as RMSNorm over the head dimension.
    return nn.RMSNorm(head_dim, eps=1e-6) if enabled else nn.Identity()


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

    def _mask(self, window: Window, grid: tuple, valid_hw: tuple, device) -> Tensor | None:
        """Additive mask (1 or nW, heads, N, N): relative bias plus -inf on padded keys."""
        mask = None if self.bias is None else self.bias(window)[None]  # (1, heads, N, N)
        if grid[1:] != tuple(valid_hw):
            keep = key_padding_mask(grid, window, valid_hw, device)  # (nW, N)
            pad = torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
            pad = pad[:, None, None, :]  # (nW, 1, 1, N)
            mask = pad if mask is None else mask + pad  # (nW, heads, N, N)
        return mask

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        """x (B, T, H, W, C) -> (B, T, H, W, C). `identity` (B,) bool marks samples whose tokens
        attend only to themselves (image samples in STW layers)."""
        b, t, h, w, _ = x.shape
        window = effective_window((t, h, w), self.window, self.temporal)
        x, (pad_h, pad_w) = pad_to_windows(x, window)
        grid = (t, h + pad_h, w + pad_w)
        n_win = (grid[0] // window[0]) * (grid[1] // window[1]) * (grid[2] // window[2])

        xw = window_partition(x, window)  # (B nW, N, C)
        q, k, v = rearrange(self.qkv(xw), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)  # (B nW, heads, N, head_dim)
        mask = self._mask(window, grid, (h, w), x.device)
        if mask is not None:
            mask = mask.to(q.dtype)
            if mask.shape[0] > 1:  # per-window padding mask -> one per (sample, window)
                mask = mask.repeat(b, 1, 1, 1)

        if identity is None or not bool(identity.any()):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif bool(identity.all()):
            out = v  # identity attention: softmax over the token itself = its value
        else:
            attend = ~identity.repeat_interleave(n_win)  # (B nW,) windows of video samples
            if mask is not None and mask.shape[0] > 1:
                mask = mask[attend]
            out = v.clone()
            out[attend] = F.scaled_dot_product_attention(
                q[attend], k[attend], v[attend], attn_mask=mask
            )
        out = self.proj(rearrange(out, "n h l d -> n l (h d)"))  # (B nW, N, C)
        out = window_merge(out, window, grid)  # (B, T, H', W', C)
        return out[:, :, :h, :w]

    def backend(self, x: Tensor, *, training: bool = False) -> str:
        """Which SDPA kernel this layer's windows run on for x (B, T, H, W, C)."""
        b, t, h, w, c = x.shape
        window = effective_window((t, h, w), self.window, self.temporal)
        grid = (t, math.ceil(h / window[1]) * window[1], math.ceil(w / window[2]) * window[2])
        n = window[0] * window[1] * window[2]
        q = x.new_zeros(1, self.heads, n, self.head_dim)  # one window
        mask = self._mask(window, grid, (h, w), x.device)
        mask = None if mask is None else mask[:1].to(q.dtype)
        return sdpa_backend(q, q, q, mask, training=training)


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
