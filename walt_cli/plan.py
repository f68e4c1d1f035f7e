"""`walt plan`: what a training stage needs per device, before anything is launched.

Memory. The stage's real networks (the builders the training systems use) are built on the
`meta` device, where tensors have shapes and no data, and a steady-state training step runs
there in the order the systems run it: the loss forward with the previous step's gradients
still alive (the systems zero them after the forward), `zero_grad(set_to_none=True)`,
backward (a GAN: the generator's, then the discriminator's). A dispatch mode (`LiveBytes`) follows every tensor storage
the steps create until it is freed, so the simulated peak holds the activations autograd saves,
the gradients as they appear, the recomputation of activation checkpointing and the largest
transients, at the exact batch (a meta step costs the same at any batch). Weights, EMA and
optimizer state are counted from the parameters. Under `bf16-mixed` / `16-mixed` the autocast
policy is emulated on the meta tensors (`AutocastEmulation`), since autocast does not act on
them. Saved activations are measured separately with `saved_tensors_hooks` (the "activations"
row; what remains of the peak above states and saved activations is the "transient" row).

FSDP at N devices: weights, gradients, optimizer state and EMA are divided by N, plus one
block's unsharded parameters and their gradient (the all-gathered block in flight). DDP at
N > 1 adds its gradient buckets (one more gradient copy).

FLOPs per sample are analytic (`denoiser_flops`, `tokenizer_flops`, tested against
`torch.utils.flop_counter` in tests/test_plan.py); step time = FLOPs x batch / (peak x MFU).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from walt_cli.errors import WaltError

GIB = 1024**3


# Dense peak tensor-core throughput (TFLOP/s) for bf16 (fp16 where the GPU has no bf16) and
# plain fp32 (no TF32: PyTorch's default for matmuls), and memory in GiB as nvidia-smi reports
# it; from the vendors' data sheets (SXM parts for H100/H200/A100).
@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    half_tflops: float  # bf16 (fp16 where bf16 is False) tensor cores, dense
    fp32_tflops: float
    bf16: bool = True


GPUS: dict[str, GPU] = {
    g.name.lower(): g
    for g in (
        GPU("H100", 79.6, 989.0, 66.9),
        GPU("H200", 139.8, 989.0, 66.9),
        GPU("A100-80GB", 80.0, 312.0, 19.5),
        GPU("A100-40GB", 40.0, 312.0, 19.5),
        GPU("L40S", 45.0, 362.0, 91.6),
        GPU("RTX 4090", 24.0, 165.2, 82.6),
        GPU("RTX 3090", 24.0, 71.0, 35.6),
        GPU("A10G", 22.5, 70.0, 31.2),
        GPU("V100", 32.0, 125.0, 15.7, bf16=False),
        GPU("T4", 15.0, 65.0, 8.1, bf16=False),
    )
}

# The share of peak throughput a training step reaches: an assumption (DiT-style transformers
# reach 30-50% in bf16; convolutional tokenizers less), stated in every plan.
DEFAULT_MFU = 0.4


def find_gpu(name: str) -> GPU:
    key = name.strip().lower().replace("_", " ")
    aliases = {"a100": "a100-80gb", "4090": "rtx 4090", "3090": "rtx 3090", "rtx4090": "rtx 4090"}
    key = aliases.get(key.replace(" ", ""), aliases.get(key, key))
    if key not in GPUS:
        known = ", ".join(g.name for g in GPUS.values())
        raise WaltError(f"unknown GPU {name!r}; known: {known} (or give --memory GiB)")
    return GPUS[key]


# ---------------------------------------------------------------------------------------------
# Following tensor storages on the meta device


class LiveBytes:
    """A `TorchDispatchMode` that adds up the bytes of every tensor storage created under it
    while that storage lives (a weak reference says when it is freed), keeping the peak.

    Written here rather than taking `torch.distributed._tools.mem_tracker.MemTracker`: that
    private tool walks every module on every op (slow for 52-layer models) and rounds to the
    CUDA allocator's blocks; the total of live storages is all the plan needs."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self._mode = _Mode()
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _track(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self._seen:
                continue
            n = st.nbytes()
            self._seen[st] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


class AutocastEmulation:
    """A `TorchFunctionMode` applying autocast's cast policy to meta tensors (autocast acts on
    CUDA/CPU tensors only): matmul-like ops run in the half dtype, reductions and norms in fp32,
    everything else by type promotion, as `torch.autocast` does. Casts sit above autograd, so
    what autograd saves has the dtype a real mixed-precision step saves."""

    def __init__(self, dtype) -> None:
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        half = {
            F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose3d, torch.matmul,
            torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
            torch.addmm, torch.mm, F.scaled_dot_product_attention,
        }  # fmt: skip
        full = {
            F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax,
            torch.Tensor.softmax, torch.logsumexp, torch.Tensor.logsumexp, F.mse_loss,
        }  # fmt: skip

        def cast(value, to):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(to)
            if isinstance(value, (list, tuple)):
                return type(value)(cast(v, to) for v in value)
            return value

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in half or func in full:
                    to = dtype if func in half else torch.float32
                    with torch._C.DisableTorchFunction():
                        args = cast(args, to)
                        kwargs = {k: cast(v, to) for k, v in kwargs.items()}
                return func(*args, **kwargs)

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Stages: the networks and one training step, as the systems run them


@dataclass
class StageModel:
    """A stage's networks on the meta device and the closures of its training step."""

    name: str  # tokenizer | base | srN
    key: str  # the recipe section as overrides name it: tokenizer, base, sr.N-1
    batch_key: str  # the recipe key of the per-device batch
    batch: int
    trainable: list  # parameter groups, one per optimizer: [[params...], ...]
    ema_bytes: int
    optimizer: str  # adamw | adam | adafactor
    precision: str
    checkpointing: bool | None  # None: the stage has no activation checkpointing
    describe: str
    block_bytes: int  # the largest block's parameter bytes (FSDP's unit in flight)
    grid: tuple  # latent (c, T, h, w) or pixel (3, T, H, W) per sample
    nets: list = field(default_factory=list)  # every network held on the device
    notes: list[str] = field(default_factory=list)
    # make_step(batch) -> the step's phases, each a callable running one forward and returning
    # (loss, the parameters its optimizer steps), run in order (a GAN: generator, discriminator)
    make_step: Any = None
    flops_per_sample: float = 0.0
    # Deep denoisers: the same stage at depths 2 and 4 (depth, at 2, at 4), whose simulated
    # activations and transients extrapolate linearly in depth (every pair of layers, SW + STW,
    # adds the same), so a 52-layer model costs what a 4-layer one does to plan.
    reduced: tuple | None = None
    # micro-batches per optimizer step (the denoisers' `accumulate_grad_batches`; None: the
    # stage has no gradient accumulation, as the tokenizer's two-optimizer GAN step)
    accumulate: int | None = None


def parse_stage(recipe, stage: str | None) -> str:
    """'tokenizer', 'decoder' (`walt tokenize train --decoder`), 'base' or 'srN' (default:
    base), checked against the recipe."""
    stage = (stage or "base").strip().lower()
    if stage in ("tokenizer", "decoder", "base"):
        return stage
    if stage.startswith("sr") and stage[2:].isdigit():
        n = int(stage[2:])
        if n < 1 or n > len(recipe.sr):
            have = f"sr1..sr{len(recipe.sr)}" if recipe.sr else "no SR stages"
            raise WaltError(f"--stage {stage}: the recipe has {have}")
        return stage
    raise WaltError(f"--stage must be tokenizer, decoder, base or srN, got {stage!r}")


def _tokenizer_shape(recipe):
    import torch

    from walt_cli.models.tokenizer import CausalVideoTokenizer

    with torch.device("meta"):
        tok = CausalVideoTokenizer.from_preset(recipe.tokenizer.preset)
    return tok


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _dtype(precision: str):
    import torch

    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float32


def _denoiser(recipe, stage: str, depth: int | None = None) -> StageModel:
    import torch

    from walt_cli.config import stage_resolution
    from walt_cli.diffusion.schedules import make_schedule
    from walt_cli.models.transformer import Conditioning
    from walt_cli.systems.common import build_network

    n = 0 if stage == "base" else int(stage[2:])
    section = recipe.base if n == 0 else recipe.sr[n - 1]
    key = "base" if n == 0 else f"sr.{n - 1}"  # as an override names it
    tok = _tokenizer_shape(recipe)
    f = tok.spatial_factor
    h, w = (s // f for s in stage_resolution(recipe, n))
    frames = tok.num_latent_frames(recipe.data.num_frames)
    c = tok.latent_channels
    extra = {} if n == 0 else dict(lowres_factor=section.factor, noise_level_cond=True)
    if depth is not None:
        from omegaconf import OmegaConf

        section = OmegaConf.merge(section, {"depth": depth})
    with torch.device("meta"):
        net = build_network(section, (frames, h, w), c, **extra)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    ema = _param_bytes(net.parameters()) + _param_bytes(net.buffers()) if section.ema else 0
    schedule = make_schedule()
    text_len = recipe.text_encoder.max_length

    def make_step(batch: int):
        def step():
            from walt_cli.diffusion.losses import diffusion_loss

            meta = dict(device="meta")
            z0 = torch.empty(batch, c, frames, h, w, **meta)
            cond = Conditioning(is_image=torch.zeros(batch, dtype=torch.bool, **meta))
            if net.num_classes:
                cond.labels = torch.zeros(batch, dtype=torch.long, **meta)
            if net.text_dim:
                cond.text = torch.empty(batch, text_len, net.text_dim, **meta)
                cond.text_mask = torch.ones(batch, text_len, dtype=torch.bool, **meta)
            lowres = None
            if n:
                lowres = torch.empty(
                    batch, c, frames, h // section.factor, w // section.factor, **meta
                )
                cond.noise_level = torch.empty(batch, **meta)
            drop = ("labels", "text", "frames") if n == 0 else ("labels", "text")
            out = diffusion_loss(
                net,
                z0,
                cond,
                schedule,
                p_self_cond=section.p_self_cond,
                p_frame_pred=getattr(section, "p_frame_pred", 0.0),
                num_cond_frames=tuple(getattr(section, "num_cond_frames", (1, 2))),
                p_cond_drop=section.p_cond_drop,
                cond_drop=drop,
                time_shift=section.time_shift,
                lowres=lowres,
            )
            return out.loss, params

        return [step]

    block = max(_param_bytes(b.parameters()) for b in net.blocks)
    describe = (
        f"{section.preset}: depth {net.depth}, width {net.width}, p={net.patch_size}, "
        f"latent ({c}, {frames}, {h}, {w})"
    )
    model = StageModel(
        name=stage,
        key=key,
        batch_key=f"{key}.batch_size",
        batch=section.batch_size or recipe.data.batch_size,
        trainable=[params],
        ema_bytes=ema,
        optimizer=section.optimizer,
        precision=str(recipe.trainer.precision),
        checkpointing=bool(section.gradient_checkpointing),
        describe=describe,
        block_bytes=block,
        accumulate=section.accumulate_grad_batches,
        grid=(c, frames, h, w),
        nets=[net],
        make_step=make_step,
    )
    model.flops_per_sample = denoiser_flops(net, text_len, section.p_self_cond)
    if depth is None and net.depth > 4:
        model.reduced = (net.depth, _denoiser(recipe, stage, 2), _denoiser(recipe, stage, 4))
    return model


def _tokenizer(recipe, decoder: bool = False) -> StageModel:
    """The tokenizer's training step; `decoder`: the decoder fine-tune's, whose frozen encoder
    has no gradients, optimizer state or saved activations."""
    import torch

    from walt_cli.systems.tokenizer import TokenizerSystem

    k, d = recipe.tokenizer, recipe.data
    from walt_cli.models.tokenizer import CausalVideoTokenizer
    from walt_cli.systems.common import section_kwargs

    kwargs = section_kwargs(k, TokenizerSystem)
    kwargs.update(perceptual="none", perceptual_path=None, freeze_encoder=decoder)
    with torch.device("meta"):
        tok = CausalVideoTokenizer.from_preset(k.preset)
        system = TokenizerSystem(tok, stage_dir="plan", **kwargs)
    notes = []
    if k.perceptual == "i3d" and k.perceptual_weight > 0:
        from walt_cli.losses.perceptual import I3DPerceptual
        from walt_cli.metrics.i3d import InceptionI3d

        with torch.device("meta"):
            system._perceptual[0] = I3DPerceptual(InceptionI3d().eval().requires_grad_(False))
    elif k.perceptual == "lpips" and k.perceptual_weight > 0:
        notes.append("the LPIPS network (a TorchScript file) is not counted")
    system.train()
    gen = [p for p in tok.parameters() if p.requires_grad]  # the decoder's alone under --decoder
    disc = [p for p in system.discriminator.parameters()]
    adversarial = k.disc_start < k.max_steps and k.gan_weight > 0
    t, (hh, ww) = d.num_frames, d.resolution

    def make_step(batch: int):
        held: dict = {}

        def generator():
            held["x"] = x = torch.empty(batch, 3, t, hh, ww, device="meta")
            system.discriminator.requires_grad_(False)  # what toggle_optimizer(opt_g) does
            terms, held["recons"] = system.generator_losses([x], adversarial)
            system.discriminator.requires_grad_(True)
            return terms["g_loss"], gen

        def discriminator():  # the worst step: with the lazy r1 term
            for p in gen:
                p.requires_grad_(False)
            terms = system.discriminator_losses(
                [held.pop("x")], held.pop("recons"), k.r1_weight > 0
            )
            for p in gen:
                p.requires_grad_(True)
            return terms["d_loss"], disc

        return [generator, discriminator] if adversarial else [generator]

    blocks = [m for m in tok.modules() if type(m).__name__ == "ResBlock3d"]
    block = max((_param_bytes(b.parameters()) for b in blocks), default=0)
    model = StageModel(
        name="decoder" if decoder else "tokenizer",
        key="tokenizer",
        batch_key="data.batch_size",
        batch=d.batch_size,
        trainable=[gen, disc] if adversarial else [gen],
        ema_bytes=_param_bytes(tok.parameters()) + _param_bytes(tok.buffers()),
        optimizer="adam",
        precision=str(recipe.trainer.precision),
        checkpointing=None,
        describe=f"{k.preset}: input (3, {t}, {hh}, {ww}), latent ({tok.latent_channels}, "
        f"{tok.num_latent_frames(t)}, {hh // tok.spatial_factor}, {ww // tok.spatial_factor})"
        + (", encoder frozen" if decoder else "")
        + (", discriminator" if adversarial else ""),
        block_bytes=block,
        grid=(3, t, hh, ww),
        nets=[tok, system.discriminator, system.lecam]
        + ([system.perceptual] if system.perceptual is not None else []),
        notes=notes,
        make_step=make_step,
    )
    model.flops_per_sample = tokenizer_flops(
        tok, system.discriminator if adversarial else None, (t, hh, ww), decoder=decoder
    )
    return model


def stage_model(recipe, stage: str) -> StageModel:
    stage = parse_stage(recipe, stage)
    if stage in ("tokenizer", "decoder"):
        return _tokenizer(recipe, decoder=stage == "decoder")
    return _denoiser(recipe, stage)


# ---------------------------------------------------------------------------------------------
# Memory


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Bytes of optimizer state: Adam/AdamW two moments per element (in the parameter's dtype);
    torch's Adafactor a row and a column factor per matrix (a full second moment for vectors)
    and no first moment; plus a step counter per tensor."""
    total = 0
    for p in params:
        size = p.element_size()
        if optimizer in ("adam", "adamw"):
            total += 2 * p.numel() * size
        elif p.ndim >= 2:
            rows = math.prod(p.shape[:-1])
            cols = math.prod(p.shape[:-2]) * p.shape[-1]
            total += (rows + cols) * size
        else:
            total += p.numel() * size
        total += 4  # step
    return total


@dataclass
class Memory:
    """Per-device bytes of one training step."""

    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int  # saved for backward (the forward's end)
    transient: int  # the rest of the peak
    peak: int

    def as_gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in asdict(self).items()}


def simulate(model: StageModel, batch: int, checkpointing: bool | None = None) -> Memory:
    """A steady-state training step of `model` at `batch` on the meta device (single device, DDP's
    per-device view without buckets): the peak of live bytes and its parts."""
    params = [p for group in model.trainable for p in group]
    weights = sum(
        _param_bytes(net.parameters()) + _param_bytes(net.buffers()) for net in model.nets
    )
    grads = _param_bytes(params)
    opt = sum(optimizer_state_bytes(g, model.optimizer) for g in model.trainable)
    if model.reduced is None:
        dynamic, acts = _dynamic(model, batch, checkpointing)
    else:  # linear in depth from the 2- and 4-layer models (their own grads included)
        depth, two, four = model.reduced
        d2, a2 = _dynamic(two, batch, checkpointing)
        d4, a4 = _dynamic(four, batch, checkpointing)
        k = (depth - 2) / 2
        dynamic, acts = round(d2 + k * (d4 - d2)), round(a2 + k * (a4 - a2))
    # The dynamic peak holds the gradients alive at that moment; the optimizer state (fused
    # AdamW: no temporaries) and the EMA are updated in place.
    peak = weights + opt + model.ema_bytes + dynamic
    transient = max(0, peak - weights - grads - opt - model.ema_bytes - acts)
    return Memory(weights, grads, opt, model.ema_bytes, acts, transient, peak)


def _dynamic(model: StageModel, batch: int, checkpointing: bool | None) -> tuple[int, int]:
    """(peak of the bytes the steps create, the largest forward's bytes saved for backward)."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    nets = model.nets
    if checkpointing is not None and model.checkpointing is not None:
        for net in nets:
            net.gradient_checkpointing = checkpointing
    params = [p for group in model.trainable for p in group]
    param_storages = {id(p.untyped_storage()) for net in nets for p in net.parameters()}
    dtype = _dtype(model.precision)
    mixed = model.precision.endswith("mixed") and dtype != torch.float32
    saved: dict[int, int] = {}
    most = 0

    def pack(t):
        st = t.untyped_storage()
        if id(st) not in param_storages:
            saved[id(st)] = st.nbytes()
        return t

    phases = model.make_step(batch)
    mem = LiveBytes()
    with mem:
        # The steady state: the last step's gradients are alive when the forward starts (the
        # systems zero them after it); the optimizer state exists (counted by the caller).
        for p in params:
            p.grad = torch.empty_like(p)
        for phase in phases:
            saved.clear()
            autocast = AutocastEmulation(dtype) if mixed else _null()
            recompute = _recompute_under(dtype if mixed else None)
            with saved_tensors_hooks(pack, lambda t: t), autocast, recompute:
                loss, group = phase()
            most = max(most, sum(saved.values()))
            for p in group:
                p.grad = None  # zero_grad(set_to_none=True), just before backward
            loss.backward()
            del loss
        dynamic = mem.peak
    for p in params:
        p.grad = None
    if checkpointing is not None and model.checkpointing is not None:
        for net in nets:
            net.gradient_checkpointing = bool(model.checkpointing)
    return dynamic, most


@contextlib.contextmanager
def _recompute_under(dtype):
    """Activation checkpointing's recompute under the AutocastEmulation of `dtype` (None: no
    emulation): checkpoint restores torch.autocast's state for the recompute, but the backward
    runs without the forward's function modes, so the recompute would save fp32 where the
    forward saved half-precision tensors (and checkpoint refuses the mismatch). While this is
    open, the transformer's `checkpoint` gets a `context_fn` that enters the emulation around
    each recompute."""
    if dtype is None:
        yield
        return
    from walt_cli.models import transformer

    original = transformer.checkpoint

    def emulated(fn, *args, **kwargs):
        contexts = lambda: (_null(), AutocastEmulation(dtype))  # noqa: E731
        return original(fn, *args, context_fn=contexts, **kwargs)

    transformer.checkpoint = emulated
    try:
        yield
    finally:
        transformer.checkpoint = original


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def distributed(mem: Memory, model: StageModel, strategy: str, devices: int) -> Memory:
    """Per-device memory under `strategy` at `devices` devices (see the module docstring)."""
    if devices <= 1:
        return mem
    states = mem.weights + mem.gradients + mem.optimizer + mem.ema
    if strategy == "fsdp":
        shard = lambda v: math.ceil(v / devices)  # noqa: E731
        gathered = 2 * model.block_bytes  # one block's full parameters and gradient in flight
        out = Memory(
            shard(mem.weights),
            shard(mem.gradients),
            shard(mem.optimizer),
            shard(mem.ema),
            mem.activations,
            mem.transient + gathered,
            0,
        )
    else:  # DDP: a full replica per device, plus the gradient buckets
        out = Memory(
            mem.weights,
            mem.gradients,
            mem.optimizer,
            mem.ema,
            mem.activations,
            mem.transient + mem.gradients,
            0,
        )
    out.peak = mem.peak - states + (out.weights + out.gradients + out.optimizer + out.ema)
    out.peak += out.transient - mem.transient
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs (analytic, 2 per multiply-add; matmuls and convolutions, as torch.utils.flop_counter)


def denoiser_flops(net, text_len: int, p_self_cond: float) -> float:
    """Training FLOPs per sample of a W.A.L.T denoiser: forward, backward (twice the forward's
    matmuls; the window kernel's backward recomputes q k^T, so attention costs 5 products
    against the forward's 2), the self-conditioning forward (no gradient; it runs whenever
    p_self_cond > 0, as on a GPU) and, with activation checkpointing, one more block forward.

    Forward per layer on n tokens, width d, windows of N_w tokens (padded grid n_pad):
    qkv + out + MLP 2n(3d^2 + d^2 + 2 r_mlp d^2), attention 4 n_pad N_w d; cross-attention
    2n d^2 (q) + 2 T L d_t... (k, v of the projected text) + 2n d^2 (out) + 4 n L d;
    AdaLN-LoRA, patch/final layers, text projection and the SR upsampler as they are."""
    from walt_cli.models.attention import effective_window

    cfg = net.config
    frames, lat_h, lat_w = cfg["latent_size"]
    p, d = net.patch_size, net.width
    gh, gw = lat_h // p, lat_w // p
    n = frames * gh * gw
    mlp = net.blocks[0].mlp.fc1.out_features
    c_in = net.in_channels
    c = net.latent_channels
    fwd_blocks = 0.0
    attn_fwd = 0.0
    for block in net.blocks:
        wt, wh, ww = effective_window((frames, gh, gw), block.attn.window, block.temporal)
        n_pad = frames * math.ceil(gh / wh) * wh * math.ceil(gw / ww) * ww
        fwd_blocks += 2 * n * (4 * d * d + 2 * d * mlp)
        attn_fwd += 4 * n_pad * (wt * wh * ww) * d
        if block.adaln_rank > 0:
            fwd_blocks += 2 * frames * (d * block.adaln_rank + block.adaln_rank * 6 * d)
        elif block.adaln_rank == 0:
            fwd_blocks += 2 * frames * d * 6 * d
        if block.cross is not None and net.text_dim:
            fwd_blocks += 2 * n * d * d * 2 + 2 * frames * text_len * d * 2 * d
            fwd_blocks += 4 * n * text_len * d
    other = 2 * n * (p * p * c_in) * d  # patch embedding
    other += 2 * n * d * (p * p * c) + 2 * frames * d * 2 * d  # final layer + its AdaLN
    if net.adaln_lora_rank > 0:
        other += 2 * frames * d * 6 * d  # shared A_1
    other += _embedder_flops(net, frames, text_len)
    if net.lowres_factor:
        f = net.lowres_factor
        other += 2 * frames * (lat_h // f) * (lat_w // f) * (c * f * f) * c * 9
    linear = fwd_blocks + other
    total = 3 * linear + attn_fwd * (1 + 2.5)
    if net.gradient_checkpointing:
        total += fwd_blocks + attn_fwd
    if p_self_cond > 0:
        total += linear + attn_fwd
    return float(total)


def _embedder_flops(net, frames: int, text_len: int) -> float:
    import torch

    total = 0.0
    for embedder in (net.t_embed, net.noise_embed):
        if embedder is not None:
            for layer in embedder.mlp:
                if isinstance(layer, torch.nn.Linear):
                    total += 2 * layer.in_features * layer.out_features
    if net.text_proj is not None:
        total += 2 * text_len * net.text_dim * net.width
    return total


def tokenizer_flops(tok, disc, shape: tuple[int, int, int], *, decoder: bool = False) -> float:
    """Training FLOPs per sample of the tokenizer, from its module structure (`_conv_flops`).

    Generator: forward, input gradients of every layer but the first (its input, the clip,
    needs none) and weight gradients: 3F - F_first. With a frozen encoder (`decoder`): the
    encoder's forward E, and 3D - D_first for the decoder D, whose input, the latent, needs no
    gradient either. Discriminator, in the generator's step on
    the reconstruction (weights frozen): forward + input gradients, 2D; in its own step on the
    real and the fake clip: forward, weight gradients of its convolutions (not of the blur
    pooling, which has none) and input gradients of all but the first layer, 2 (3D - D_blur -
    D_first). The lazy r1 term (every r1_every discriminator steps) and a perceptual network
    are not counted."""
    g, g_first, _ = _conv_flops(tok, shape)
    total = 3 * g - g_first
    if decoder:
        e = _conv_flops(tok.encoder, shape)[0]
        latent = (tok.num_latent_frames(shape[0]), *(x // tok.spatial_factor for x in shape[1:]))
        d_first = _conv_flops(tok.decoder, latent, channels=tok.latent_channels)[1]
        total = e + 3 * (g - e) - d_first
    if disc is not None:
        d, d_first, blur = _conv_flops(disc, shape)
        total += 2 * d + 2 * (3 * d - blur - d_first)
    return float(total)


def _conv_flops(
    module, shape: tuple[int, int, int], channels: int = 3
) -> tuple[float, float, float]:
    """Forward FLOPs of `module` on one (channels, T, H, W) input from a meta forward with hooks:
    (all, the first convolution's, the blur pooling's). A convolution or linear layer costs
    2 x output elements x fan-in; the discriminator's blur pooling is the depthwise 4-tap
    convolution it is, once per axis it halves."""
    import torch
    from torch import nn

    from walt_cli.models.discriminator import BlurPool3d

    counts: list[tuple[str, float]] = []

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv3d):
            fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
            counts.append(("conv", 2 * out.numel() * fan_in))
        elif isinstance(m, nn.Linear):
            counts.append(("linear", 2 * out.numel() * m.in_features))
        elif isinstance(m, BlurPool3d):
            x = inputs[0]
            c, (t, h, w) = x.shape[0] * x.shape[1], x.shape[2:]
            flops = 0
            if t > 1:  # time, then height, then width: 4 taps, stride 2, padding 1 + 2
                t = (t - 1) // 2 + 1
                flops += 2 * 4 * c * t * h * w
            h = (h - 1) // 2 + 1
            flops += 2 * 4 * c * t * h * w
            w = (w - 1) // 2 + 1
            flops += 2 * 4 * c * t * h * w
            counts.append(("blur", flops))

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Conv3d, nn.Linear, BlurPool3d))
    ]
    try:
        with torch.no_grad():
            module(torch.empty(1, channels, *shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    total = sum(f for _, f in counts)
    first = next(f for kind, f in counts if kind == "conv")
    blur = sum(f for kind, f in counts if kind == "blur")
    return total, first, blur


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    recipe: str
    stage: str
    model: str
    parameters: int  # trained (the tokenizer's with its discriminator)
    batch: int
    batch_key: str
    accumulate: int  # micro-batches per optimizer step
    devices: int
    strategy: str
    precision: str
    checkpointing: bool | None
    memory: Memory
    per_sample_bytes: int  # the peak's growth per added sample
    ddp: Memory
    fsdp: Memory
    flops_per_sample: float
    gpu: str | None
    capacity_gib: float | None
    mfu: float | None
    step_s: float | None
    samples_per_s: float | None
    fits: bool | None
    suggestion: str | None
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("memory", "ddp", "fsdp"):
            out[key] = {k: round(v, 4) for k, v in getattr(self, key).as_gib().items()}
            out[key]["unit"] = "GiB"
        return out


def _strategy(recipe, strategy: str | None, devices: int) -> str:
    if strategy:
        if strategy not in ("ddp", "fsdp"):
            raise WaltError(f"--strategy must be ddp or fsdp, got {strategy!r}")
        return strategy
    s = str(recipe.trainer.strategy)
    return "fsdp" if s.startswith("fsdp") else "ddp"


def _devices(recipe, devices: int | None) -> int:
    if devices is not None:
        if devices < 1:
            raise WaltError(f"--devices must be >= 1, got {devices}")
        return devices
    d = recipe.trainer.devices
    if isinstance(d, int):
        return d * max(1, recipe.trainer.num_nodes)
    if isinstance(d, str) and d.isdigit():
        return int(d) * max(1, recipe.trainer.num_nodes)
    if not isinstance(d, str):
        return len(list(d)) * max(1, recipe.trainer.num_nodes)
    return 1  # "auto": one unless told (--devices)


def make_plan(
    recipe,
    stage: str | None = None,
    *,
    gpu: str | None = None,
    memory_gib: float | None = None,
    devices: int | None = None,
    strategy: str | None = None,
    mfu: float = DEFAULT_MFU,
    suggest: bool = True,
    source: str = "recipe",
) -> Plan:
    """The plan of one stage (see the module docstring)."""
    if gpu is not None and memory_gib is not None:
        raise WaltError("give --gpu or --memory, not both")
    if memory_gib is not None and memory_gib <= 0:
        raise WaltError(f"--memory must be positive GiB, got {memory_gib}")
    if not 0 < mfu <= 1:
        raise WaltError(f"--mfu must be in (0, 1], got {mfu}")
    card = find_gpu(gpu) if gpu else None
    n = _devices(recipe, devices)
    strat = _strategy(recipe, strategy, n)
    model = stage_model(recipe, stage)
    mem = simulate(model, model.batch)
    if model.batch > 1:
        per_sample = (mem.peak - simulate(model, 1).peak) // (model.batch - 1)
    else:
        per_sample = simulate(model, 2).peak - mem.peak
    ddp, fsdp = distributed(mem, model, "ddp", n), distributed(mem, model, "fsdp", n)
    chosen = fsdp if strat == "fsdp" else ddp
    capacity = card.memory_gib if card else memory_gib
    notes = list(model.notes)
    step_s = sps = None
    used_mfu = None
    if card is not None:
        half = model.precision.split("-")[0] in ("bf16", "16")
        if half and model.precision.startswith("bf16") and not card.bf16:
            notes.append(f"{card.name} has no bf16 tensor cores: use trainer.precision=16-mixed")
        peak = (card.half_tflops if half else card.fp32_tflops) * 1e12
        used_mfu = mfu
        micro = model.accumulate or 1
        step_s = model.flops_per_sample * model.batch * micro / (peak * mfu)
        sps = model.batch * micro * n / step_s
    fits = None if capacity is None else chosen.peak <= capacity * GIB
    suggestion = None
    if fits is False and suggest:
        suggestion = suggest_fix(model, capacity * GIB, n, strat)
    params = sum(p.numel() for g in model.trainable for p in g)
    return Plan(
        recipe=source,
        stage=model.name,
        model=model.describe,
        parameters=params,
        batch=model.batch,
        batch_key=model.batch_key,
        accumulate=model.accumulate or 1,
        devices=n,
        strategy=strat,
        precision=model.precision,
        checkpointing=model.checkpointing,
        memory=mem,
        per_sample_bytes=per_sample,
        ddp=ddp,
        fsdp=fsdp,
        flops_per_sample=model.flops_per_sample,
        gpu=card.name if card else None,
        capacity_gib=capacity,
        mfu=used_mfu,
        step_s=step_s,
        samples_per_s=sps,
        fits=fits,
        suggestion=suggestion,
        notes=notes,
    )


def suggest_fix(model: StageModel, capacity: int, devices: int, strategy: str) -> str:
    """The smallest change that fits, as `key=value` overrides: activation checkpointing first
    (same batch, ~1/3 more compute), then FSDP (at several devices), then a per-device batch
    that fits with gradient accumulation keeping the global batch (the largest divisor of the
    samples per step that fits). The tokenizer has no gradient accumulation: its line shrinks
    the global batch and says by how much."""
    tried = []
    ckpt_key = f"{model.key}.gradient_checkpointing"

    def peak(m: Memory, strat: str) -> int:
        return distributed(m, model, strat, devices).peak

    if model.checkpointing is False:
        m = simulate(model, model.batch, checkpointing=True)
        if peak(m, strategy) <= capacity:
            return f"{ckpt_key}=true"
        tried.append(f"{ckpt_key}=true")
    if devices > 1 and strategy != "fsdp":
        ck = model.checkpointing is not None
        m = simulate(model, model.batch, checkpointing=True if ck else None)
        if peak(m, "fsdp") <= capacity:
            return " ".join([*tried, "trainer.strategy=fsdp"])
        tried.append("trainer.strategy=fsdp")
        strategy = "fsdp"
    ck = True if model.checkpointing is not None else None
    # The peak grows linearly with the batch (every activation does): the largest batch under
    # the line through batch 1 and the recipe's, checked and stepped down until it fits.
    top = peak(simulate(model, model.batch, checkpointing=ck), strategy)
    one = peak(simulate(model, 1, checkpointing=ck), strategy)
    slope = (top - one) / max(1, model.batch - 1)
    lo = min(model.batch - 1, int((capacity - one) // slope) + 1 if slope > 0 else 1)
    while lo >= 1 and peak(simulate(model, lo, checkpointing=ck), strategy) > capacity:
        lo = lo - max(1, lo // 8)
    lo = max(lo, 0)
    if lo == 0:
        return "none: even batch 1 does not fit" + (f" with {' '.join(tried)}" if tried else "")
    if model.accumulate is not None:
        total = model.batch * model.accumulate  # samples per device per optimizer step
        micro = max(d for d in range(1, lo + 1) if total % d == 0)
        return (
            " ".join(
                [
                    *tried,
                    f"{model.batch_key}={micro}",
                    f"{model.key}.accumulate_grad_batches={total // micro}",
                ]
            )
            + f"  (global batch kept: {micro} x {total // micro} micro-batches per device)"
        )
    factor = model.batch / lo
    return " ".join([*tried, f"{model.batch_key}={lo}"]) + (
        f"  (global batch x{1 / factor:.2f}: the tokenizer has no gradient accumulation; "
        f"{math.ceil(factor)}x the devices keep it)"
    )


# ---------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _flops(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def memory_line(mem: Memory) -> str:
    return (
        f"{_gib(mem.peak)} peak = weights {_gib(mem.weights)} + gradients {_gib(mem.gradients)}"
        f" + optimizer {_gib(mem.optimizer)} + EMA {_gib(mem.ema)} + activations "
        f"{_gib(mem.activations)} + transient {_gib(mem.transient)}"
    )


def render(p: Plan):
    """The plan as a Rich table."""
    from walt_cli.systems.common import human_count

    rows = [
        ("model", f"{p.model}; {human_count(p.parameters)} trained parameters"),
        (
            "run",
            f"batch {p.batch} per device ({p.batch_key})"
            + (f" x {p.accumulate} accumulated" if p.accumulate > 1 else "")
            + f" x {p.devices} device(s), {p.strategy}, "
            f"{p.precision}"
            + (
                ""
                if p.checkpointing is None
                else f", activation checkpointing {'on' if p.checkpointing else 'off'}"
            ),
        ),
        ("memory, 1 device", memory_line(p.memory)),
        ("per sample", f"+{_gib(p.per_sample_bytes)} of peak per sample of batch"),
        (f"ddp x{p.devices}", f"{_gib(p.ddp.peak)} per device"),
        (
            f"fsdp x{p.devices}",
            f"{_gib(p.fsdp.peak)} per device (states / {p.devices}, one block gathered)",
        ),
        ("FLOPs", f"{_flops(p.flops_per_sample)} per sample (training step)"),
    ]
    if p.step_s is not None:
        rows.append(
            (
                f"on {p.gpu}",
                f"{p.step_s:.3g} s per step, {p.samples_per_s:.3g} samples/s over "
                f"{p.devices} device(s) at an assumed {p.mfu:.0%} MFU",
            )
        )
    if p.fits is not None:
        chosen = p.fsdp if p.strategy == "fsdp" else p.ddp
        verdict = (
            f"yes: {_gib(chosen.peak)} of {p.capacity_gib:g} GiB"
            if p.fits
            else f"NO: {_gib(chosen.peak)} > {p.capacity_gib:g} GiB"
        )
        rows.append(("fits", verdict))
        if p.suggestion:
            rows.append(("to fit", p.suggestion))
    for note in p.notes:
        rows.append(("note", note))
    from walt_cli.systems.common import startup_table

    return startup_table(f"walt plan: {p.recipe} --stage {p.stage} (a prediction)", rows)


def startup_rows(recipe, stage: str, devices: int = 1, strategy: str = "ddp") -> list:
    """The start-up table's rows of a training command: the plan's memory and FLOPs (meta
    device only; a planning failure is reported in the row, never stops training)."""
    try:
        model = stage_model(recipe, stage)
        mem = distributed(simulate(model, model.batch), model, strategy, devices)
    except Exception as err:  # the plan is advice: training goes on without it
        return [("memory plan", f"not available ({type(err).__name__}: {err})")]
    return [
        ("memory plan", memory_line(mem) + f" per device ({strategy} x{devices}, predicted)"),
        ("FLOPs", f"{_flops(model.flops_per_sample)} per sample per step"),
    ]
