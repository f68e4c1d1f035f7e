"""StyleGAN-style 3D discriminator for tokenizer training (SPEC_WALT.md §1, MAGVIT v1/v2).

A 3x3x3 stem, then one residual down-block per channel multiplier (default 2, 4, 4, 4, 4 times
the base width): conv, LeakyReLU(0.2), blur-pool down, conv, LeakyReLU, with a blur-pooled 1x1x1
shortcut, summed and scaled by 1/sqrt(2). Downsampling is MAGVIT-v2's 3D blur pooling (a
[1, 3, 3, 1] binomial filter, stride 2) over time and space; time stops shrinking at one frame,
so 1-frame images go through the same network.

Where MAGVIT flattens a fixed-size feature map into a dense layer, this head averages over
(T, H, W) first: one discriminator then judges any resolution and frame count, which joint
image-video batches need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BlurPool3d(nn.Module):
    """Antialiased stride-2 downsampling: a separable [1, 3, 3, 1] binomial blur, depthwise.

    Time is only downsampled while it has more than one frame.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("taps", taps / taps.sum(), persistent=False)
        self.channels = channels

    def _blur(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        # zero padding, 1 before and 2 after, so an even length halves exactly under stride 2
        shape = [1, 1, 1]
        shape[dim] = 4
        kernel = self.taps.view(1, 1, *shape).expand(self.channels, 1, *shape).to(x.dtype)
        pad = [0, 0, 0, 0, 0, 0]  # (W_l, W_r, H_l, H_r, T_l, T_r)
        pad[2 * (2 - dim)], pad[2 * (2 - dim) + 1] = 1, 2
        stride = [1, 1, 1]
        stride[dim] = 2
        return F.conv3d(F.pad(x, pad), kernel, stride=stride, groups=self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if x.shape[2] > 1:
            x = self._blur(x, 0)
        return self._blur(self._blur(x, 1), 2)


class ResBlockDown(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.down = BlurPool3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip_down = BlurPool3d(c_in)
        self.skip = nn.Conv3d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(self.down(h)), 0.2)
        return (h + self.skip(self.skip_down(x))) / math.sqrt(2.0)


class Discriminator3D(nn.Module):
    """Logits (B,) for videos or images (B, 3, T, H, W) in [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: tuple[int, ...] = (2, 4, 4, 4, 4),
    ) -> None:
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_multipliers=list(channel_multipliers),
        )
        self.stem = nn.Conv3d(in_channels, base_channels, 3, padding=1)
        blocks, c = [], base_channels
        for m in channel_multipliers:
            blocks.append(ResBlockDown(c, base_channels * m))
            c = base_channels * m
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Conv3d(c, c, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(c, c), nn.LeakyReLU(0.2), nn.Linear(c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.stem(x), 0.2)
        h = self.blocks(h)
        h = F.leaky_relu(self.final(h), 0.2)
        return self.head(h.mean(dim=(2, 3, 4))).squeeze(1)  # (B,)
