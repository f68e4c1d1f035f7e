"""The W.A.L.T denoiser [P §4.2-4.3]: a window-attention latent transformer.

    x_in (B, C_in, T, h, w) --patchify p x p per frame--> tokens (B, T, h/p, w/p, D)
      + learned spatial + temporal position embeddings (images take frame 0's)
      --> L layers alternating SW (1 x wh x ww windows) and STW (T x wh x ww windows) blocks,
          each: AdaLN-LoRA-modulated self-attention (qk-norm, relative position bias)
                [+ cross-attention to text, spatial layers only] + AdaLN-modulated MLP
      --> final AdaLN + linear --unpatchify--> v (B, c, T, h, w)

The network knows nothing of diffusion (DESIGN §4.2): `walt_cli.diffusion` builds `x_in` (noisy
latent c | self-conditioning estimate c | frame condition [m*z, m] c+1 | low-res latent c for SR
stages) and turns the output, a v-prediction, into x0 or eps.

Conditioning vector (per frame, so packed images each carry their own): e = t_emb(t) +
class_emb(label) [+ noise_level_emb(t_sr) for SR stages]. AdaLN-LoRA [P Eq. 3]:
A_1 = MLP(e) is shared (SiLU -> Linear d -> 6d) and A_i = A_1 + W_b^i W_a^i e for i > 1 with a
rank-r W_a (d -> r) and W_b (r -> 6d); r = 0 means a separate SiLU -> Linear(d, 6d) per layer.
Modulation is DiT's adaLN-Zero: x * (1 + scale) + shift, outputs gated, every modulation linear
(and the final projection) initialised to zero so each block starts as the identity.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from walt_cli.errors import WaltError
from walt_cli.models.attention import WindowCrossAttention, WindowSelfAttention
from walt_cli.models.embeddings import ClassEmbedder, PositionEmbedding, TimestepEmbedder

CHECKPOINT_KIND = "walt-transformer"

# Named sizes (SPEC §2.4). The L/XL geometry is DiT-L/XL; walt-3b uses d = 2048 (head dim 128),
# the reading of the paper's garbled "9216" that lands on 3B with cross-attention in the spatial
# layers. `tiny` keeps every layer type and conditioning path at well under 2M parameters.
PRESETS: dict[str, dict[str, Any]] = {
    "walt-l": dict(depth=24, width=1024, heads=16, adaln_lora_rank=2),
    "walt-xl": dict(depth=28, width=1152, heads=16, adaln_lora_rank=2),
    "walt-3b": dict(depth=52, width=2048, heads=16, adaln_lora_rank=2),
    "tiny": dict(
        depth=4,
        width=64,
        heads=4,
        adaln_lora_rank=2,
        num_classes=10,
        text_dim=32,
        latent_size=(5, 8, 8),
        spatial_window=(8, 8),
        st_window=(4, 4),
    ),
}


BIAS_INITS = ("random", "locality")
POS_INITS = ("random", "sincos")


def locality_slopes(heads: int) -> list[float]:
    """Per-head slopes of the "locality" bias init: 2, 1, 1/2, ... halving per head, and 0 for
    the last head, which starts global (ALiBi's geometric slopes [Press et al. 2022], steeper,
    because a window spans a few tokens, not a few thousand). A single head gets slope 1."""
    if heads == 1:
        return [1.0]
    return [2.0 ** (1 - h) for h in range(heads - 1)] + [0.0]


@dataclass
class Conditioning:
    """Everything besides the input channels and the time that the network is conditioned on.

    Fields (all optional, B = batch, T = latent frames, L = text tokens, D_text = text width):
        labels: (B,) or (B, T) long class labels; -1 (`NULL_LABEL`) is the null class.
        text: (B, L, D_text) or (B, T, L, D_text) text-encoder states (per frame for packed images).
        text_mask: (B, L) or (B, T, L) bool, True for real tokens; all False = no caption.
        is_image: (B,) bool, True for a sample that is a stack of independent images.
        noise_level: (B,) float in [0, 1], the noise-augmentation level of an SR stage's low-res
            latent (fed to AdaLN).
    """

    labels: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None
    is_image: Tensor | None = None
    noise_level: Tensor | None = None

    NULL_LABEL: ClassVar[int] = -1

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def cast(self, dtype: torch.dtype) -> Conditioning:
        """The caption states in `dtype` (a network with weights in that dtype reads them); the
        noise level stays as it is, like the time: both enter through sinusoidal embeddings
        computed in fp32."""
        if self.text is None or self.text.dtype == dtype:
            return self
        return replace(self, text=self.text.to(dtype))

    def select(self, index: Tensor | slice) -> Conditioning:
        """The conditioning of a subset of the batch."""
        return Conditioning(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    def cat(self, other: Conditioning) -> Conditioning:
        """Batch two conditionings (e.g. conditional + unconditional for guidance)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "text_mask":  # a caption without a mask is all real tokens
                a = a if a is not None or self.text is None else _ones_mask(self.text)
                b = b if b is not None or other.text is None else _ones_mask(other.text)
            if (a is None) != (b is None):
                raise WaltError(f"cannot batch conditionings: only one has {f.name!r}")
            out[f.name] = None if a is None else torch.cat([a, b], dim=0)
        return Conditioning(**out)

    def dropped(self, drop: Tensor, *, labels: bool = True, text: bool = True) -> Conditioning:
        """Replace the class label by the null class and mask the caption out where `drop` (B,)
        is True (condition dropout / the unconditional branch of guidance)."""
        out = replace(self)
        if labels and self.labels is not None:
            d = drop.view(-1, *([1] * (self.labels.ndim - 1)))
            out.labels = torch.where(d, torch.full_like(self.labels, self.NULL_LABEL), self.labels)
        if text and self.text is not None:
            mask = self.text_mask if self.text_mask is not None else _ones_mask(self.text)
            d = drop.view(-1, *([1] * (mask.ndim - 1)))
            out.text_mask = mask.bool() & ~d
        return out


def _ones_mask(text: Tensor) -> Tensor:
    return torch.ones(text.shape[:-1], dtype=torch.bool, device=text.device)


def _to(x: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if x is None else x.to(device)


def _pair(value: Any, name: str) -> tuple[int, int]:
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
        raise WaltError(
            f"{name} must be a positive int or (height, width) in tokens, got {value!r}"
        )
    return values  # type: ignore[return-value]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift (DiT); shift/scale (B, T, 1, 1, D) broadcast over tokens.
    One fused multiply-add (`addcmul`) over the tokens instead of a multiply and an add."""
    return torch.addcmul(shift, x, 1 + scale)


def _per_frame(x: Tensor) -> Tensor:
    """(B, T, D) -> (B, T, 1, 1, D) to broadcast a per-frame vector over the token grid."""
    return x[:, :, None, None, :]


class _GeluLinear(torch.autograd.Function):
    """linear(gelu_tanh(h), weight, bias) that keeps only h for the backward pass.

    Autograd's plain path keeps both h (for GELU's gradient) and gelu(h) (for the second linear
    layer's weight gradient): two tensors of the MLP's hidden width, 4d per token. Here gelu(h)
    is recomputed in the backward pass, one elementwise op against the two matmuls the backward
    does anyway, so each MLP keeps 4d fewer floats per token until its backward. Written by hand
    because torch.utils.checkpoint would also rerun the linear layer's matmul. Same values as
    the plain path; gradients equal within float rounding (tests/test_fast_paths.py)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(nn.functional.gelu(h, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        # Under autocast the saved h and the incoming gradient are in the low precision while
        # the weight stays fp32: compute in the gradient's dtype, return each in its input's.
        # One hidden-width temporary at a time beside h: the recomputed gelu(h) is freed before
        # the input gradient's two are made.
        grad_h = grad_w = grad_b = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            g = nn.functional.gelu(h.to(grad.dtype), approximate="tanh")
            grad_w = (flat.T @ g.reshape(-1, g.shape[-1])).to(weight.dtype)
            del g
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_g = grad @ weight.to(grad.dtype)
            grad_h = torch.ops.aten.gelu_backward(grad_g, h.to(grad.dtype), approximate="tanh")
            grad_h = grad_h.to(h.dtype)
        return grad_h, grad_w, grad_b


_FUSED_GELU_LINEAR: bool | None = None  # decided on first use: `_fused_gelu_linear_ready`


def _fused_gelu_linear_ready(x: Tensor, linear: nn.Linear) -> bool:
    """Whether `_fused_gelu_linear` can run for x: inference on the CPU in fp32 (not under
    autocast, whose linear layers run in bf16), outside `torch.compile` (Inductor fuses by
    itself), with oneDNN's linear-pointwise op present in this build of torch and agreeing with
    the plain path on a small probe (checked once per process; `WALT_FUSED_MLP=0` turns it
    off)."""
    global _FUSED_GELU_LINEAR
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or linear.weight.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return False
    if _FUSED_GELU_LINEAR is None:
        _FUSED_GELU_LINEAR = False
        if (
            os.environ.get("WALT_FUSED_MLP", "1") != "0"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        ):
            # Its own generator: the probe leaves the global random stream untouched.
            g = torch.Generator().manual_seed(0)
            v, w, b = (torch.randn(*shape, generator=g) for shape in ((3, 8), (16, 8), (16,)))
            try:  # a private op: a build where it fails or differs keeps the plain path
                with torch.no_grad():
                    got = _fused_gelu_linear(v, w, b)
                    want = nn.functional.gelu(nn.functional.linear(v, w, b), approximate="tanh")
                _FUSED_GELU_LINEAR = torch.allclose(got, want, atol=1e-5)
            except RuntimeError:
                pass
    return _FUSED_GELU_LINEAR


def _fused_gelu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """gelu_tanh(x W^T + b) in one oneDNN call (a linear layer with GELU as its post-op).

    Written against oneDNN's op (the one Inductor emits for the same pattern) because ATen's
    tanh-GELU is slow on CPU: on the 2-core development machine (torch 2.13, AVX512) it took
    4.5x the time of the exact GELU and more than the 64 -> 256 linear before it, so the fused
    call runs 50-step sampling of a width-64 model in 0.89x the time (BENCHMARKS.md, "Two CPU
    inference paths"). Equal to the unfused path within float rounding
    (tests/test_fast_paths.py)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "gelu", [], "tanh")
    return out.view(*x.shape[:-1], out.shape[-1])


class Mlp(nn.Module):
    """Transformer MLP, ratio 4 [SPEC §2.4 "not given": assume 4], GELU (tanh). In training the
    GELU output is recomputed in the backward pass instead of kept (`_GeluLinear`); in CPU
    inference the first linear and the GELU run as one fused call (`_fused_gelu_linear`)."""

    def __init__(self, width: int, ratio: float) -> None:
        super().__init__()
        hidden = int(width * ratio)
        self.fc1, self.act, self.fc2 = (
            nn.Linear(width, hidden),
            nn.GELU("tanh"),
            nn.Linear(hidden, width),
        )

    def forward(self, x: Tensor) -> Tensor:
        training = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if not training and _fused_gelu_linear_ready(x, self.fc1):
            return self.fc2(_fused_gelu_linear(x, self.fc1.weight, self.fc1.bias))
        h = self.fc1(x)
        if training:
            return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.act(h))


class WALTBlock(nn.Module):
    """One W.A.L.T layer: SW (`temporal=False`) or STW (`temporal=True`) self-attention, optional
    cross-attention (spatial layers), MLP; AdaLN-LoRA modulation of attention and MLP.

    `adaln_rank`: -1 = this layer uses the shared A_1 as is (the first layer with r > 0);
    0 = its own full AdaLN; r > 0 = A_1 + W_b W_a e.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        temporal: bool,
        window: tuple[int, int],
        max_frames: int,
        mlp_ratio: float,
        qk_norm: bool,
        relative_bias: bool,
        cross_attention: bool,
        adaln_rank: int,
    ) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = WindowSelfAttention(
            width,
            heads,
            window,
            temporal=temporal,
            max_frames=max_frames,
            qk_norm=qk_norm,
            relative_bias=relative_bias,
        )
        self.cross = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(width, eps=1e-6)
            self.cross = WindowCrossAttention(width, heads, window, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, mlp_ratio)
        self.adaln_rank = adaln_rank
        if adaln_rank == 0:
            self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        elif adaln_rank > 0:
            self.adaln_down = nn.Linear(width, adaln_rank, bias=False)  # W_a: d -> r
            self.adaln_up = nn.Linear(adaln_rank, 6 * width, bias=False)  # W_b: r -> 6d

    def modulation(self, e: Tensor, shared: Tensor | None) -> Tensor:
        """(B, T, 6D): this layer's (shift, scale, gate) x (attention, MLP) [P Eq. 3]."""
        if self.adaln_rank == 0:
            return self.adaln(e)
        assert shared is not None
        if self.adaln_rank < 0:
            return shared
        return shared + self.adaln_up(self.adaln_down(e))

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        shared: Tensor | None,
        is_image: Tensor | None,
        text: Tensor | None,
        text_mask: Tensor | None,
    ) -> Tensor:
        """x (B, T, H, W, D); e (B, T, D) = c + t per frame; shared (B, T, 6D) = A_1."""
        mod = self.modulation(e, shared).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (_per_frame(m) for m in mod)
        # Identity attention in STW layers for packs of several images only: a 1-frame sample
        # (an image on its own) attends inside its frame in every layer (DESIGN §5).
        identity = is_image if self.temporal and x.shape[1] > 1 else None
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), identity))
        if self.cross is not None and text is not None:
            x = x + self.cross(self.norm_cross(x), text, text_mask)
        return torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))

    def set_window(self, window: tuple[int, int], max_frames: int) -> None:
        """Use a new spatial window (resizing the relative position bias table)."""
        self.attn.window = tuple(window)
        if self.attn.bias is not None:
            self.attn.bias.resize((max_frames if self.temporal else 1, *window))
        if self.cross is not None:
            self.cross.window = tuple(window)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to p*p*c values per token (DiT), zero-initialised."""

    def __init__(self, width: int, out_per_token: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_per_token)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (_per_frame(m) for m in self.adaln(e).chunk(2, dim=-1))
        return self.linear(modulate(self.norm(x), shift, scale))


class WALT(nn.Module):
    """The W.A.L.T denoiser. `net(x_in, t, cond) -> v` with x_in (B, C_in, T, h, w), t (B,) or
    (B, T) in [0, 1] and `cond` a `Conditioning`; returns (B, latent_channels, T, h, w).

    Args:
        depth: number of layers in total; even layers are SW, odd layers STW [P Fig. 2].
        width, heads: model width d and attention heads.
        patch_size: p, tokens are p x p patches of one latent frame.
        latent_channels: c of the latent (and of the output).
        in_channels: channels of x_in; default 3c + 1 (noisy latent, self-conditioning estimate,
            frame condition [m*z, m]) + c when `lowres_factor` > 0.
        latent_size: (T, h, w) latent grid the position embeddings cover; T is the longest clip.
        spatial_window: (wh, ww) tokens, the window of SW layers (1 x wh x ww).
        st_window: (wh, ww) tokens, the spatial extent of STW windows (T x wh x ww).
        adaln_lora_rank: r of AdaLN-LoRA; 0 = separate AdaLN per layer.
        num_classes: class-conditional with this many classes (+ a null class); 0 = none.
        text_dim: width of the text-encoder states; enables cross-attention in SW layers.
            None = no cross-attention.
        cross_attention: "spatial" (SW layers only, the paper's joint image-video models) or
            "all" (STW layers too, each frame's windows attending to its caption); with "all"
            the SR presets land on the paper's 1.3B and 419M (SPEC §2.4, README).
        mlp_ratio: MLP hidden width / d.
        qk_norm: RMSNorm on queries and keys.
        relative_position_bias: Swin relative position bias inside windows.
        full_attention: every window is the whole token grid (SW: a full frame, STW: the whole
            clip); the comparison baseline for window attention.
        lowres_factor: SR stage upsampling factor f (0 = base model). The last c input channels
            hold the low-res latent repeated f x f (nearest) by `diffusion.inputs`; the network
            reads one value per f x f cell and upsamples it with its own depth-to-space
            convolution (DESIGN §5).
        noise_level_cond: embed `Conditioning.noise_level` (SR noise augmentation) into AdaLN.
        bias_init: start of the relative position bias tables: "random" (N(0, 0.02), Swin's) or
            "locality" (`locality_slopes`: head h starts at -slope_h x spatial distance).
        pos_init: start of the position tables: "random" (N(0, 0.02)) or "sincos" (fixed
            sin-cos tables, `PositionEmbedding.init_sincos`). Neither init is part of `config`:
            it changes no weight's shape, and loaded weights (a checkpoint, `init_from`)
            replace it.

    Parameter count = `sum(p.numel() for p in net.parameters())`: every learned tensor (patch
    embedding, position tables, relative position bias tables, embedders, AdaLN, blocks, final
    layer), nothing added or left out. See `num_parameters`. How walt-l (d = 1024, 24 layers,
    101 classes, p = 1, no text) lands on the paper's 313M: attention 24 x (4d^2 + 4d + qk-norm)
    = 100.8M, MLP 24 x (8d^2 + 5d) = 201.4M, relative bias tables 0.6M, shared A_1 6d^2 + 6d =
    6.3M, 23 LoRA pairs 7dr = 0.3M, final adaLN + linear 2.1M, timestep MLP 1.3M, patch,
    position and class tables 0.4M: 313.2M. With r = 0, 24 per-layer AdaLNs (6d^2 + 6d each,
    151.1M) replace A_1 + LoRA: 457.7M (DiT-L's 458M, Table 4).
    """

    def __init__(
        self,
        *,
        depth: int = 24,
        width: int = 1024,
        heads: int = 16,
        patch_size: int = 1,
        latent_channels: int = 8,
        in_channels: int | None = None,
        latent_size: tuple[int, int, int] = (5, 16, 16),
        spatial_window: tuple[int, int] = (16, 16),
        st_window: tuple[int, int] = (8, 8),
        adaln_lora_rank: int = 2,
        num_classes: int = 0,
        text_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        relative_position_bias: bool = True,
        full_attention: bool = False,
        lowres_factor: int = 0,
        noise_level_cond: bool = False,
        cross_attention: str = "spatial",
        bias_init: str = "random",
        pos_init: str = "random",
    ) -> None:
        super().__init__()
        latent_size = tuple(int(n) for n in latent_size)  # type: ignore[assignment]
        spatial_window, st_window = (
            _pair(spatial_window, "spatial_window"),
            _pair(st_window, "st_window"),
        )
        if depth < 1 or width < 1 or heads < 1 or width % heads:
            raise WaltError(
                f"width {width} must be a positive multiple of heads {heads} (depth {depth})"
            )
        if patch_size < 1:
            raise WaltError(f"patch_size must be >= 1, got {patch_size}")
        if len(latent_size) != 3 or min(latent_size) < 1:
            raise WaltError(f"latent_size must be (T, h, w), got {latent_size}")
        frames, lat_h, lat_w = latent_size
        if lat_h % patch_size or lat_w % patch_size:
            raise WaltError(
                f"latent grid {lat_h}x{lat_w} is not divisible by patch size {patch_size}"
            )
        if cross_attention not in ("spatial", "all"):
            raise WaltError(f"cross_attention must be spatial or all, got {cross_attention!r}")
        if bias_init not in BIAS_INITS or pos_init not in POS_INITS:
            raise WaltError(
                f"bias_init must be one of {BIAS_INITS} and pos_init one of {POS_INITS}, "
                f"got {bias_init!r} and {pos_init!r}"
            )
        if adaln_lora_rank < 0 or num_classes < 0 or lowres_factor < 0:
            raise WaltError("adaln_lora_rank, num_classes and lowres_factor must be >= 0")
        default_in = 3 * latent_channels + 1 + (latent_channels if lowres_factor else 0)
        in_channels = default_in if in_channels is None else in_channels
        if lowres_factor and in_channels < latent_channels:
            raise WaltError(
                f"in_channels {in_channels} cannot hold a {latent_channels}-channel low-res latent"
            )

        self.config: dict[str, Any] = dict(
            depth=depth,
            width=width,
            heads=heads,
            patch_size=patch_size,
            latent_channels=latent_channels,
            in_channels=in_channels,
            latent_size=list(latent_size),
            spatial_window=list(spatial_window),
            st_window=list(st_window),
            adaln_lora_rank=adaln_lora_rank,
            num_classes=num_classes,
            text_dim=text_dim,
            mlp_ratio=mlp_ratio,
            qk_norm=qk_norm,
            relative_position_bias=relative_position_bias,
            full_attention=full_attention,
            lowres_factor=lowres_factor,
            noise_level_cond=noise_level_cond,
            cross_attention=cross_attention,
        )
        self.depth, self.width, self.heads = depth, width, heads
        self.patch_size, self.latent_channels, self.in_channels = (
            patch_size,
            latent_channels,
            in_channels,
        )
        self.num_classes, self.text_dim, self.lowres_factor = num_classes, text_dim, lowres_factor
        self.adaln_lora_rank = adaln_lora_rank
        self.full_attention = full_attention
        self.gradient_checkpointing = False
        self.checkpoint_extra: dict[str, Any] = {}
        grid = (lat_h // patch_size, lat_w // patch_size)  # token grid
        if full_attention:
            spatial_window = st_window = grid

        # Tokens [P §4.2]
        if lowres_factor:
            c, f = latent_channels, lowres_factor
            self.lowres_up = nn.Conv3d(c, c * f * f, (1, 3, 3), padding=(0, 1, 1))
        self.patch_embed = nn.Linear(in_channels * patch_size**2, width)
        self.pos_embed = PositionEmbedding(width, frames, grid)

        # Conditioning [P §4.3]
        self.t_embed = TimestepEmbedder(width)
        self.class_embed = ClassEmbedder(num_classes, width) if num_classes else None
        self.noise_embed = TimestepEmbedder(width) if noise_level_cond else None
        self.text_proj = nn.Linear(text_dim, width) if text_dim else None  # P in DESIGN §5
        if adaln_lora_rank > 0:
            self.adaln_shared = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # A_1

        self.blocks = nn.ModuleList(
            WALTBlock(
                width,
                heads,
                temporal=bool(i % 2),
                window=st_window if i % 2 else spatial_window,
                max_frames=frames,
                mlp_ratio=mlp_ratio,
                qk_norm=qk_norm,
                relative_bias=relative_position_bias,
                cross_attention=bool(text_dim) and (cross_attention == "all" or i % 2 == 0),
                adaln_rank=adaln_lora_rank if (adaln_lora_rank == 0 or i > 0) else -1,
            )
            for i in range(depth)
        )
        self.final = FinalLayer(width, patch_size**2 * latent_channels)
        self._init_weights()
        # Both priors are deterministic (they draw no random numbers), so every other weight
        # starts as it would without them.
        if bias_init == "locality":
            for block in self.blocks:
                if block.attn.bias is not None:
                    block.attn.bias.add_locality_prior(locality_slopes(heads))
        if pos_init == "sincos":
            self.pos_embed.init_sincos()

    # ------------------------------------------------------------------ construction

    def _init_weights(self) -> None:
        """DiT initialisation: xavier linears, zero biases; adaLN-Zero (every modulation linear,
        the LoRA up-projections, cross-attention output and the final projection start at 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.t_embed, self.noise_embed):
            if embedder is not None:
                for layer in (embedder.mlp[0], embedder.mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02)
        zero = [self.final.adaln[-1], self.final.linear]
        if self.adaln_lora_rank > 0:
            zero.append(self.adaln_shared[-1])
        for block in self.blocks:
            if block.adaln_rank == 0:
                zero.append(block.adaln[-1])
            elif block.adaln_rank > 0:
                zero.append(block.adaln_up)
                nn.init.normal_(block.adaln_down.weight, std=0.02)
            if block.cross is not None:
                zero.append(block.cross.proj)
        for module in zero:
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.lowres_factor:
            # Start the depth-to-space conv at nearest-neighbour upsampling: every sub-pixel
            # output channel copies its input channel's centre tap.
            c, f = self.latent_channels, self.lowres_factor
            weight = torch.zeros_like(self.lowres_up.weight)  # (c f f, c, 1, 3, 3)
            for ch in range(c):
                weight[ch * f * f : (ch + 1) * f * f, ch, 0, 1, 1] = 1.0
            with torch.no_grad():
                self.lowres_up.weight.copy_(weight)
                self.lowres_up.bias.zero_()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> WALT:
        """Build a named size (`walt-l`, `walt-xl`, `walt-3b`, `tiny`) with keyword overrides."""
        if name not in PRESETS:
            raise WaltError(f"unknown transformer preset {name!r}; choose one of {sorted(PRESETS)}")
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise WaltError(
                f"unknown transformer option {unknown[0]!r}; options: {sorted(allowed)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> WALT:
        """Rebuild a model from a file written by `save` (config in its metadata). The file's
        extra metadata (e.g. latent statistics) is on `net.checkpoint_extra`."""
        from walt_cli.models.checkpoint import load_state_strict, load_weights

        config, state, extra = load_weights(path, kind=CHECKPOINT_KIND)
        net = cls(**config)
        load_state_strict(net, state, path)
        net.checkpoint_extra = extra
        return net

    def save(
        self,
        path: str | os.PathLike,
        *,
        extra: dict[str, Any] | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> None:
        """Write safetensors weights with the constructor config (and `extra`) as metadata;
        `state`: the weights to write when they are not this module's own (e.g. gathered from
        FSDP shards)."""
        from walt_cli.models.checkpoint import save_weights

        save_weights(path, self, kind=CHECKPOINT_KIND, config=self.config, extra=extra, state=state)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.pos_embed.grid

    @property
    def num_frames(self) -> int:
        return self.pos_embed.frames

    def resize_grid(
        self,
        latent_size: tuple[int, int, int],
        *,
        spatial_window: tuple[int, int] | None = None,
        st_window: tuple[int, int] | None = None,
    ) -> None:
        """Move to a new latent grid (T, h, w) [P §5.3: the 128x128 -> 128x224 fine-tune]:
        interpolate the absolute position embeddings, scale the windows with the grid (or take
        the given ones) and interpolate the relative position bias tables to them."""
        frames, lat_h, lat_w = (int(n) for n in latent_size)
        p = self.patch_size
        if lat_h % p or lat_w % p:
            raise WaltError(f"latent grid {lat_h}x{lat_w} is not divisible by patch size {p}")
        old_h, old_w = self.token_grid
        grid = (lat_h // p, lat_w // p)

        def scaled(window: list[int]) -> tuple[int, int]:
            return (
                max(1, round(window[0] * grid[0] / old_h)),
                max(1, round(window[1] * grid[1] / old_w)),
            )

        if self.full_attention:  # full attention follows the grid
            spatial, st = grid, grid
        else:
            spatial = (
                _pair(spatial_window, "spatial_window")
                if spatial_window
                else scaled(self.config["spatial_window"])
            )
            st = _pair(st_window, "st_window") if st_window else scaled(self.config["st_window"])
        self.pos_embed.resize(frames, grid)
        for block in self.blocks:
            block.set_window(st if block.temporal else spatial, frames)
        self.config.update(
            latent_size=[frames, lat_h, lat_w], spatial_window=list(spatial), st_window=list(st)
        )

    def compile_blocks(self, **options: Any) -> None:
        """Regional compilation: `torch.compile` each block in place (a block's forward is one
        graph with no break; blocks of the same kind share the compiled code), leaving the
        light embedding and input checks eager. `options` go to `torch.compile`."""
        for block in self.blocks:
            block.compile(**{"fullgraph": True, "dynamic": False, **options})

    # ------------------------------------------------------------------ forward

    def _check(self, x_in: Tensor, t: Tensor, cond: Conditioning) -> None:
        if x_in.ndim != 5:
            raise WaltError(f"x_in must be (B, C, T, h, w), got shape {tuple(x_in.shape)}")
        b, c, frames, h, w = x_in.shape
        if c != self.in_channels:
            raise WaltError(
                f"x_in has {c} channels; this model expects {self.in_channels} "
                f"(noisy latent, self-conditioning, frame condition{', low-res latent' if self.lowres_factor else ''})"
            )
        if frames > self.num_frames:
            raise WaltError(
                f"x_in has {frames} latent frames; this model takes at most {self.num_frames}"
            )
        p = self.patch_size
        if h % p or w % p:
            raise WaltError(f"latent grid {h}x{w} is not divisible by patch size {p}")
        if (h // p, w // p) != self.token_grid:
            gh, gw = self.token_grid
            raise WaltError(
                f"latent grid {h}x{w} does not match the model's {gh * p}x{gw * p}; "
                "call net.resize_grid((T, h, w)) to fine-tune at a new size"
            )
        if self.lowres_factor and (h % self.lowres_factor or w % self.lowres_factor):
            raise WaltError(
                f"latent grid {h}x{w} is not divisible by the SR factor {self.lowres_factor}"
            )
        if t.shape not in ((b,), (b, frames)):
            raise WaltError(f"t must have shape ({b},) or ({b}, {frames}), got {tuple(t.shape)}")
        if cond.labels is not None:
            if self.class_embed is None:
                raise WaltError("labels given to a model built without classes (num_classes=0)")
            if cond.labels.shape not in ((b,), (b, frames)):
                raise WaltError(
                    f"labels must have shape ({b},) or ({b}, {frames}), got {tuple(cond.labels.shape)}"
                )
            bad = (cond.labels >= self.num_classes) | (cond.labels < -1)
            message = f"labels must lie in [0, {self.num_classes}) or be -1 (null class)"
            if cond.labels.device.type == "cpu":
                if bool(bad.any()):
                    raise WaltError(message)
            else:  # checked on the device, without waiting for it (no host sync per step)
                torch._assert_async(~bad.any(), message)
        if cond.text is not None:
            if self.text_proj is None:
                raise WaltError(
                    "text given to a model built without cross-attention (text_dim=None)"
                )
            if cond.text.shape[-1] != self.text_dim or cond.text.ndim not in (3, 4):
                raise WaltError(
                    f"text must be (B, L, {self.text_dim}) or (B, T, L, {self.text_dim}), got {tuple(cond.text.shape)}"
                )
        if cond.is_image is not None and cond.is_image.shape != (b,):
            raise WaltError(f"is_image must have shape ({b},), got {tuple(cond.is_image.shape)}")

    def _embed_conditions(self, t: Tensor, cond: Conditioning, b: int, frames: int) -> Tensor:
        """e = t_emb + class_emb [+ noise_level_emb], per frame: (B, T, D)."""
        t = t if t.ndim == 2 else t[:, None]
        e = self.t_embed(t)  # (B, 1 or T, D)
        if self.class_embed is not None:
            labels = cond.labels
            if labels is None:
                labels = torch.full(
                    (b,), Conditioning.NULL_LABEL, dtype=torch.long, device=t.device
                )
            e = e + self.class_embed(labels if labels.ndim == 2 else labels[:, None])
        if self.noise_embed is not None:
            level = (
                cond.noise_level
                if cond.noise_level is not None
                else torch.zeros(b, device=t.device)
            )
            e = e + self.noise_embed(level[:, None])
        return e.expand(b, frames, self.width)

    def _embed_text(
        self, cond: Conditioning, b: int, frames: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """Per-frame projected captions (B, T, L, D) and their mask (B, T, L)."""
        if self.text_proj is None or cond.text is None:
            return None, None
        text = cond.text if cond.text.ndim == 4 else cond.text[:, None]
        mask = cond.text_mask
        if mask is None:
            mask = torch.ones(text.shape[:-1], dtype=torch.bool, device=text.device)
        mask = mask if mask.ndim == 3 else mask[:, None]
        text = self.text_proj(text)  # (B, 1 or T, L, D)
        length = text.shape[2]
        return text.expand(b, frames, length, self.width), mask.bool().expand(b, frames, length)

    def _upsample_lowres(self, x_in: Tensor) -> Tensor:
        """Replace the nearest-repeated low-res channels by the learned depth-to-space upsampling."""
        c, f = self.latent_channels, self.lowres_factor
        low = x_in[:, -c:, :, ::f, ::f]  # (B, c, T, h/f, w/f): one value per f x f cell
        up = rearrange(self.lowres_up(low), "b (c fh fw) t h w -> b c t (h fh) (w fw)", fh=f, fw=f)
        return torch.cat([x_in[:, :-c], up], dim=1)

    def forward(self, x_in: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """x_in (B, C_in, T, h, w), t (B,) or (B, T) in [0, 1] -> v (B, c, T, h, w)."""
        cond = cond if cond is not None else Conditioning()
        self._check(x_in, t, cond)
        b, _, frames, _, _ = x_in.shape
        p = self.patch_size
        if self.lowres_factor:
            x_in = self._upsample_lowres(x_in)

        x = rearrange(x_in, "b c t (h p) (w q) -> b t h w (p q c)", p=p, q=p)
        x = self.patch_embed(x)  # (B, T, H, W, D)
        is_image = None if cond.is_image is None else cond.is_image.bool()
        x = x + self.pos_embed(frames, is_image)

        e = self._embed_conditions(t, cond, b, frames)  # (B, T, D)
        shared = self.adaln_shared(e) if self.adaln_lora_rank > 0 else None  # (B, T, 6D)
        text, text_mask = self._embed_text(cond, b, frames)

        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, e, shared, is_image, text, text_mask, use_reentrant=False)
            else:
                x = block(x, e, shared, is_image, text, text_mask)

        x = self.final(x, e)  # (B, T, H, W, p*p*c)
        return rearrange(x, "b t h w (p q c) -> b c t (h p) (w q)", p=p, q=p)

    # ------------------------------------------------------------------ introspection

    @torch.no_grad()
    def attention_backends(
        self,
        frames: int | None = None,
        *,
        training: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, str]:
        """Which SDPA kernel each layer type runs on (DESIGN §5), for inference or for a training
        step: e.g. flash attention takes no additive bias, and a learned relative position bias
        needs its gradient (CUDA: memory-efficient kernel; CPU training: math kernel)."""
        param = next(self.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        frames = frames or self.num_frames
        h, w = self.token_grid
        x = torch.zeros(1, frames, h, w, self.width, device=device, dtype=dtype)
        out = {}
        for block in self.blocks[:2]:
            kind = "spatiotemporal" if block.temporal else "spatial"
            out[kind] = block.attn.backend(x, training=training)
        return out


def count_parameters(module: nn.Module) -> int:
    """Learned parameters of a module (what the paper's "params" column counts)."""
    return sum(p.numel() for p in module.parameters())


def describe_windows(net: WALT, frames: int | None = None) -> str:
    """'SW 1x16x16, STW 5x8x8' for the windows that run on the model's grid."""
    from walt_cli.models.attention import effective_window

    frames = frames or net.num_frames
    grid = (frames, *net.token_grid)
    parts = []
    for block in net.blocks[:2]:
        window = effective_window(grid, block.attn.window, block.temporal)
        parts.append(("STW " if block.temporal else "SW ") + "x".join(map(str, window)))
    return ", ".join(parts)


__all__ = ["PRESETS", "WALT", "Conditioning", "count_parameters", "describe_windows"]
