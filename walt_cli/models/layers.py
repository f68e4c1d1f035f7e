"""Building blocks of the causal 3D tokenizer (SPEC_WALT.md §1, MAGVIT-v2 lineage).

Everything here is *causal in time*: an output frame depends on input frames at or before it and
never after. Convolutions pad `k_t - 1` frames before the input and none after; every
normalisation computes its statistics per frame (time folded into the batch, DESIGN §5
"Causality is exact"). That is what lets an image be a 1-frame video: frame 0 is encoded as if
nothing followed it.

Streaming. Every layer takes an optional `state` (a :data:`StreamState`, a plain dict owned by
the caller). With a state, a :class:`CausalConv3d` prepends the frames it kept from the previous
call instead of zero padding, and keeps the frames the next call needs; so feeding a clip in
consecutive chunks gives what one call over the whole clip gives (to float tolerance). Norms are
per frame and need no state.

Axis alphabet: B batch, C channels, T frames, H x W pixels (a latent grid is t x h x w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

StreamState = dict
"""Carried convolution state for chunked processing: {CausalConv3d: kept input frames}."""


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """A 3D convolution that is causal in time and "same" in space (SPEC §1, [M2], [OS]).

    Time: `k_t - 1` zero frames are padded before the input and none after, so output frame i
    sees input frames `s_t * i - (k_t - 1) ... s_t * i`. With temporal stride s, `1 + s*m` frames
    become `1 + m` frames. Space: symmetric padding `(k - 1) // 2`; with stride 2 and k = 3 an
    even H becomes H / 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        self.kernel_t = kt
        self.stride_t = _triple(stride)[0]
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            (kt, kh, kw),
            stride=_triple(stride),
            padding=(0, (kh - 1) // 2, (kw - 1) // 2),  # time is padded by hand, causally
            bias=bias,
        )

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W)
        pad = self.kernel_t - 1
        if state is None:
            # One copy that also makes x contiguous (a frame-normalised input arrives in its
            # norm's frame-major layout): cat writes each element once, where F.pad would first
            # fill the whole padded tensor and then copy x into it.
            if pad:
                x = torch.cat([x.new_zeros(*x.shape[:2], pad, *x.shape[3:]), x], dim=2)
            return self.conv(x.contiguous())  # (B, C', T', H', W')
        # Streaming: the frames kept from the previous chunk replace the zero padding.
        past = state.get(self)
        if past is None:
            past = x.new_zeros(*x.shape[:2], pad, *x.shape[3:])
        buf = torch.cat([past, x], dim=2)  # (B, C, pad + T, H, W)
        n_out = (
            (buf.shape[2] - self.kernel_t) // self.stride_t + 1
            if buf.shape[2] >= self.kernel_t
            else 0
        )
        # The next window starts at frame s * n_out of the buffer: keep everything from there on
        # (a copy, not a view, so the whole buffer can be freed).
        state[self] = buf[:, :, self.stride_t * n_out :].clone()
        if n_out == 0:  # a chunk too short to complete a window: nothing to emit yet
            (_, kh, kw), (_, sh, sw), (_, ph, pw) = (
                self.conv.kernel_size,
                self.conv.stride,
                self.conv.padding,
            )
            h, w = x.shape[3:]
            h_out, w_out = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            return x.new_empty(x.shape[0], self.conv.out_channels, 0, h_out, w_out)
        return self.conv(buf)  # (B, C', n_out, H', W')


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed per frame (time folded into the batch).

    A plain GroupNorm over (C/G, T, H, W) would let a later frame change frame 0's output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W)
        b = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        # Returned as a view in the frame-major layout, not copied back: what follows (SiLU, an
        # affine modulation, the next FrameGroupNorm) keeps that layout for free, and the causal
        # convolution's padding copy makes it contiguous for oneDNN (which takes a 3x slower path
        # on permuted inputs) in the same pass.
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class AdaptiveGroupNorm(nn.Module):
    """StyleGAN-style adaptive GroupNorm of the MAGVIT-v2 decoder, per frame (SPEC §1).

    `x` is group-normalised per frame without a learned affine, then scaled and shifted per
    channel by affine maps of the control signal's per-channel spatial std and mean. The control
    signal is given per frame of `x`: the latent frame that covers that frame (DESIGN §5), so the
    output frame j depends only on latents that cover frames <= j. The scale map's bias starts
    at 1 (as StyleGAN's style affine), so at initialisation this is close to a plain GroupNorm.
    """

    def __init__(
        self, channels: int, cond_channels: int, *, num_groups: int = 32, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(num_groups, channels, eps=eps, affine=False)
        self.to_scale = nn.Linear(cond_channels, channels)
        self.to_shift = nn.Linear(cond_channels, channels)
        self.eps = eps
        nn.init.ones_(self.to_scale.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W); cond: (B, c, T, h, w), one control frame per frame of x
        var, mean = torch.var_mean(cond, dim=(-2, -1), correction=0)  # (B, c, T) each
        std = torch.sqrt(var + self.eps)
        scale = self.to_scale(rearrange(std, "b c t -> b t c"))  # (B, T, C)
        shift = self.to_shift(rearrange(mean, "b c t -> b t c"))  # (B, T, C)
        scale = rearrange(scale, "b t c -> b c t 1 1")
        shift = rearrange(shift, "b t c -> b c t 1 1")
        return self.norm(x) * scale + shift  # (B, C, T, H, W)


class ResBlock3d(nn.Module):
    """GN -> SiLU -> causal conv3 -> GN -> SiLU -> causal conv3, plus a shortcut ([M1c]).

    The convolutions have no bias (each feeds a norm or the residual sum); the shortcut is a
    1x1x1 convolution (no bias) where the channel count changes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, num_groups: int = 32, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = FrameGroupNorm(num_groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.shortcut = (
            nn.Conv3d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        # x: (B, C_in, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)), state)
        h = self.conv2(F.silu(self.norm2(h)), state)
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(x.contiguous())
        return skip + h  # (B, C_out, T, H, W)


class Downsample3d(nn.Module):
    """Strided causal convolution (MAGVIT-v2 replaces v1's average pooling): x2 in space, and x2
    in time where `temporal` is set (`1 + 2m` frames -> `1 + m`)."""

    def __init__(self, channels: int, *, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return self.conv(x, state)  # (B, C, T', H/2, W/2)


class DepthToSpaceUpsample3d(nn.Module):
    """Causal conv to `C * s_t * 2 * 2` channels, then depth-to-space (SPEC §1, [M2], [OS]).

    `B (C ts hs ws) T H W -> B C (T ts) (H hs) (W ws)`. Each input frame becomes `s_t` output
    frames; the first `s_t - 1` frames of a clip (those "before" frame 0) are dropped, so
    `1 + m` frames become `1 + s_t * m` and output frame j comes from input frame ceil(j / s_t).
    """

    def __init__(self, channels: int, *, temporal: bool) -> None:
        super().__init__()
        self.factor_t = 2 if temporal else 1
        self.conv = CausalConv3d(channels, channels * self.factor_t * 4, 3)

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None, *, first: bool = True
    ) -> torch.Tensor:
        # x: (B, C, T, H, W); `first`: this chunk starts at the clip's frame 0
        h = self.conv(x, state)  # (B, C * ts * 4, T, H, W)
        h = rearrange(
            h, "b (c ts hs ws) t h w -> b c (t ts) (h hs) (w ws)", ts=self.factor_t, hs=2, ws=2
        )
        if first:
            h = h[:, :, self.factor_t - 1 :]  # (B, C, 1 + ts * (T - 1), 2H, 2W)
        return h
