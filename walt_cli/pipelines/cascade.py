"""The one generation path: conditions -> base DDIM -> each SR stage -> decode -> uint8 frames.

    noise_base (B, c, T, h, w) --DDIM(base)--> z (base-normalised)
      --denormalise (base stats)--> raw latent --normalise (SR1's low-res stats)--> z_lr
      --noise augmentation at SR1's sampling level--> lowres input of SR1
      --DDIM(SR1)--> z (SR1-normalised) --denormalise (SR1 stats)--> raw latent --> ... SR2 ...
      --tokenizer.decode (chunked in time, tiled in space for large frames)--> pixels --> uint8

Frame conditioning (image-to-video, continuing a clip, autoregressive extension) gives the first
latent frames of every stage: the conditioning pixels, brought to that stage's resolution and
encoded by the tokenizer, enter each DDIM step as in training (`diffusion.inputs.model_input`).
Long videos follow the paper's App. A: a clip of F frames, then the last 5 frames, re-encoded into
2 latent frames, condition the next clip, which adds F - 5 new frames (17 -> 29 -> 41 ...).

Seeds are per sample: sample i draws all its noise from its own generator, in a fixed order
(per clip, per stage: the low-res augmentation noise, then the stage's noise), on the CPU. With
`batch_invariant` (the default on CPU) the networks and the decoder also run one sample at a
time, so sample i with seed s gives the same bytes whatever the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from walt_cli.diffusion.inputs import first_frames_mask
from walt_cli.diffusion.samplers import DDIMStep, sample
from walt_cli.diffusion.schedules import NoiseSchedule, make_schedule, q_sample
from walt_cli.errors import WaltError
from walt_cli.models.transformer import WALT, Conditioning

CONTEXT_FRAMES = 5  # App. A: the last 5 frames (2 latent frames) condition the next clip
DEFAULT_STEPS = 50  # the paper samples with 50 DDIM steps


@dataclass
class Progress:
    """What a progress callback receives: `stage` (base, sr1, ..., decode) finished `step` of
    `total` in clip `chunk` of `chunks` (autoregressive extension runs several clips)."""

    stage: str
    step: int
    total: int
    chunk: int
    chunks: int


ProgressFn = Callable[[Progress], None]


@dataclass
class Stage:
    """One diffusion stage: the network and the statistics that normalise its latents."""

    name: str  # base | sr1 | sr2 ...
    net: WALT
    mean: Tensor  # (c,) of this stage's (target) latents
    std: Tensor
    resolution: tuple[int, int]  # output pixels (H, W)
    lowres_mean: Tensor | None = None  # SR: the statistics that normalise the low-res input
    lowres_std: Tensor | None = None
    noise_level: float = 0.0  # SR: noise-augmentation level of the low-res input at sampling
    frame_channels: bool = False  # trained with frame conditioning: feed the [m * z, m] channels

    @property
    def latent_frames(self) -> int:
        return int(self.net.config["latent_size"][0])

    @property
    def latent_grid(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.net.config["latent_size"][1:])  # type: ignore[return-value]

    @property
    def is_sr(self) -> bool:
        return bool(self.net.lowres_factor)

    @staticmethod
    def _view(v: Tensor, z: Tensor) -> Tensor:
        return v.to(z.device, torch.float32).view(1, -1, 1, 1, 1)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw tokenizer latents (B, c, T, h, w) -> this stage's normalised latents."""
        return (z.float() - self._view(self.mean, z)) / self._view(self.std, z)

    def denormalize(self, z: Tensor) -> Tensor:
        return z.float() * self._view(self.std, z) + self._view(self.mean, z)

    def normalize_lowres(self, z: Tensor) -> Tensor:
        """Raw latents of the previous stage -> this SR stage's normalised low-res input."""
        return (z.float() - self._view(self.lowres_mean, z)) / self._view(self.lowres_std, z)


def _stats(meta: dict, key: str, where: Any) -> tuple[Tensor, Tensor]:
    stats = meta.get(key)
    if not stats or "mean" not in stats or "std" not in stats:
        raise WaltError(f"{where}: no {key} in its metadata")
    std = torch.tensor(stats["std"], dtype=torch.float32)
    if bool((std <= 0).any()):
        raise WaltError(f"{where}: {key} has a zero std channel")
    return torch.tensor(stats["mean"], dtype=torch.float32), std


def _per_stage(value, n: int, name: str, cast) -> list:
    """One value for every stage, or exactly one per stage."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        return [cast(values[0])] * n
    if len(values) != n:
        raise WaltError(
            f"{name}: give one value or one per stage ({n}: "
            f"{', '.join(['base'] + [f'sr{i}' for i in range(1, n)])}), got {len(values)}"
        )
    return [cast(v) for v in values]


def _defaults_per_stage(value, n: int, fallback) -> list:
    """A recipe/bundle default list: the first n values, the last one repeated if shorter."""
    values = list(value) if isinstance(value, (list, tuple)) else ([value] if value else [])
    if not values:
        return [fallback] * n
    return [values[min(i, len(values) - 1)] for i in range(n)]


def valid_frame_counts(clip: int, up_to: int) -> list[int]:
    """Frame counts autoregressive extension reaches from clips of `clip` frames: clip,
    clip + (clip - 5), ... up to `up_to` (and the first one above)."""
    step = clip - CONTEXT_FRAMES
    counts = [clip]
    while step > 0 and counts[-1] < up_to:
        counts.append(counts[-1] + step)
    return counts


class Pipeline:
    """Generation from a tokenizer, a base stage and 0..N SR stages (see the module docstring).

    Build it with `Pipeline.from_bundle(path)` (a run directory, an exported bundle, or
    "default") or directly from modules (the training previews do). `precision` "auto" is bf16
    on CUDA and fp32 on the CPU; `from_bundle` loads the weights in that precision, while
    modules given directly keep theirs and fp32 ones run under autocast in bf16.
    """

    def __init__(
        self,
        tokenizer,
        stages: Sequence[Stage],
        *,
        text_encoder=None,
        class_names: Sequence[str] = (),
        defaults: dict | None = None,
        vocabulary: dict[str, list[str]] | None = None,
        hashes: dict[str, str] | None = None,
        name: str = "",
        schedule: NoiseSchedule | None = None,
        batch_invariant: bool | None = None,
        precision: str = "auto",
        decode_chunk: int | str | None = "auto",
        decode_tile: int = 64,
        decode_overlap: int = 8,
        refine_only: bool = False,
    ) -> None:
        # `refine_only`: SR stages alone, without a base, for `super_resolve` (the previews of
        # SR training, which refine real low-res latents); `generate` needs a base.
        if not stages or (stages[0].is_sr and not refine_only):
            raise WaltError("a pipeline needs a base stage first")
        if refine_only and not all(s.is_sr for s in stages):
            raise WaltError("a refine-only pipeline holds super-resolution stages only")
        self.refine_only = refine_only
        self.tokenizer = tokenizer
        self.stages = list(stages)
        self.text_encoder = text_encoder
        self.class_names = list(class_names)
        self.defaults = dict(defaults or {})
        self.vocabulary = dict(vocabulary or {})  # caption words by category ({}: not checked)
        self.hashes = dict(hashes or {})
        self.name = name
        self.schedule = schedule or make_schedule()  # the training schedule [P Table 8]
        self.device = next(self.stages[0].net.parameters()).device
        self.batch_invariant = (
            self.device.type == "cpu" if batch_invariant is None else batch_invariant
        )
        self.precision = resolve_precision(precision, self.device)
        self.decode_chunk = decode_chunk
        self.decode_tile, self.decode_overlap = decode_tile, decode_overlap
        self.timings: dict[str, float] = {}
        base = self.stages[0]
        for prev, stage in zip(self.stages, self.stages[1:], strict=False):
            if stage.latent_frames != base.latent_frames:
                raise WaltError(
                    f"{stage.name} takes {stage.latent_frames} latent frames, the base makes "
                    f"{base.latent_frames}"
                )
            if not stage.is_sr or stage.lowres_mean is None:
                raise WaltError(f"{stage.name} is not a super-resolution stage")
            f = stage.net.lowres_factor
            want = (prev.latent_grid[0] * f, prev.latent_grid[1] * f)
            if stage.latent_grid != want:
                raise WaltError(
                    f"{stage.name} works on a {stage.latent_grid[0]}x{stage.latent_grid[1]} "
                    f"latent grid, {prev.name} x{f} makes {want[0]}x{want[1]}"
                )

    # ---------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_bundle(
        cls,
        model=None,
        *,
        device: str = "auto",
        precision: str = "auto",
        text_encoder=None,
        batch_invariant: bool | None = None,
        verify: bool = True,
    ) -> Pipeline:
        """Load a run directory, an exported bundle or the default model ("default"/None).

        `text_encoder` replaces the one the bundle names (an object with `encode(prompts)`,
        `dim`, `max_length` and `hash`)."""
        from walt_cli.console import resolve_device
        from walt_cli.models.tokenizer import CausalVideoTokenizer
        from walt_cli.pipelines.bundle import read_bundle, stage_resolution

        index = read_bundle(model, verify=verify)
        dev = resolve_device(device)
        precision = resolve_precision(precision, dev)
        # The pipeline owns these weights, so in bf16 they are cast once, here, where autocast
        # casts every weight at every call: under autocast bf16 sampling was slower than fp32 on
        # the CPU, with bf16 weights faster (BENCHMARKS.md, "Generation").
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        tok = CausalVideoTokenizer.from_checkpoint(index.tokenizer, map_location=dev).to(dtype)
        stages = []
        noise_levels = index.sample.get("noise_level")
        for i, entry in enumerate(index.stages):
            net = WALT.from_checkpoint(entry.file).to(dev, dtype).eval().requires_grad_(False)
            meta = {**net.checkpoint_extra, **entry.meta}
            mean, std = _stats(meta, "latent_stats", entry.file)
            stage = Stage(
                name=entry.name,
                net=net,
                mean=mean,
                std=std,
                resolution=tuple(stage_resolution(index, i)),  # type: ignore[arg-type]
                frame_channels=float(meta.get("p_frame_pred", 0.0) or 0.0) > 0,
            )
            if net.lowres_factor:
                stage.lowres_mean, stage.lowres_std = _stats(
                    meta, "lowres_latent_stats", entry.file
                )
                level = meta.get("noise_level", 0.0)
                if noise_levels:
                    level = _defaults_per_stage(noise_levels, len(index.stages) - 1, level)[i - 1]
                stage.noise_level = float(level)
            stages.append(stage)
        if text_encoder is None and stages[0].net.text_dim:
            text_encoder = load_text_encoder(index.text_encoder, where=index.root)
        if (
            text_encoder is not None
            and stages[0].net.text_dim
            and text_encoder.dim != stages[0].net.text_dim
        ):
            raise WaltError(
                f"the text encoder gives {text_encoder.dim}-d states, the model reads "
                f"{stages[0].net.text_dim}-d"
            )
        hashes = index.hashes
        if text_encoder is not None:
            hashes["text_encoder"] = str(text_encoder.hash)
        return cls(
            tok,
            stages,
            text_encoder=text_encoder,
            class_names=index.class_names,
            defaults=index.sample,
            vocabulary=index.vocabulary,
            hashes=hashes,
            name=index.name,
            batch_invariant=batch_invariant,
            precision=precision,
        )

    # ---------------------------------------------------------------------------------------
    # What the model is

    @property
    def base(self) -> Stage:
        return self.stages[0]

    @property
    def conditioning(self) -> str:
        """class | text | unconditional."""
        if self.base.net.num_classes:
            return "class"
        if self.base.net.text_dim:
            return "text"
        return "unconditional"

    @property
    def clip_frames(self) -> int:
        """Pixel frames of one clip of the model (1 + f_t (T - 1))."""
        return self.tokenizer.num_frames(self.base.latent_frames)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.stages[-1].resolution

    @property
    def fps(self) -> float:
        return float(self.defaults.get("fps") or 8.0)

    def default_steps(self) -> list[int]:
        default = self.defaults.get("steps") or [DEFAULT_STEPS]
        return [int(v) for v in _defaults_per_stage(default, len(self.stages), DEFAULT_STEPS)]

    def default_guidance(self) -> list[float]:
        default = self.defaults.get("guidance") or [1.0]
        return [float(v) for v in _defaults_per_stage(default, len(self.stages), 1.0)]

    def check_frames(self, num_frames: int) -> int:
        """The number of clips that make `num_frames` frames; a one-line error naming the
        nearest valid counts otherwise."""
        clip = self.clip_frames
        counts = valid_frame_counts(clip, num_frames)
        if num_frames in counts:
            return counts.index(num_frames) + 1
        if len(counts) == 1 and num_frames > clip:
            raise WaltError(
                f"--frames {num_frames}: this model makes {clip}-frame clips and cannot extend "
                f"them ({self.base.latent_frames} latent frames; extension needs 3 or more)"
            )
        below = [c for c in counts if c < num_frames]
        above = [c for c in counts if c > num_frames]
        near = " or ".join(str(c) for c in (below[-1:] + above[:1]))
        raise WaltError(
            f"--frames {num_frames}: autoregressive extension makes {clip} + "
            f"{clip - CONTEXT_FRAMES}k frames; use {near}"
        )

    def class_id(self, value: str | int) -> int:
        """A class by id or name (case-insensitive)."""
        n = self.base.net.num_classes
        if not n:
            raise WaltError(
                f"this model is {self.conditioning}, not class-conditional: "
                + (
                    "pass a prompt instead of --class"
                    if self.conditioning == "text"
                    else "drop --class"
                )
            )
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            k = int(text)
            if not 0 <= k < n:
                raise WaltError(f"--class {k}: class ids run from 0 to {n - 1}")
            return k
        folded = {c.lower().replace("_", " "): i for i, c in enumerate(self.class_names)}
        key = text.lower().replace("_", " ")
        if key in folded and folded[key] < n:
            return folded[key]
        hint = (
            f"e.g. {', '.join(repr(c) for c in self.class_names[:3])}"
            if self.class_names
            else "this model names no classes; use an id"
        )
        raise WaltError(f"--class {text!r}: unknown class ({hint}; ids 0..{n - 1})")

    # ---------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(
        self,
        *,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        text: tuple[Tensor, Tensor] | None = None,
        num_frames: int | None = None,
        steps: int | Sequence[int] | None = None,
        guidance: float | Sequence[float] | None = None,
        cond_video: Tensor | None = None,
        cond_latents: Tensor | None = None,
        callback: ProgressFn | None = None,
        output: str = "uint8",
    ) -> Tensor:
        """Videos for `seeds` (one per sample).

        prompts (text models), labels (class models) or precomputed `text` (states (B, L, D),
        mask (B, L)); `num_frames` beyond one clip extends autoregressively; `steps` and
        `guidance` one value or one per stage (defaults: the bundle's); `cond_video`
        (B, 3, n, H, W) in [-1, 1], n = 1 + 4k pixel frames, conditions the first clip (its
        frames come back first); `cond_latents` (B, c, k, h, w) base-normalised latents do the
        same for a base-only pipeline. Returns uint8 (B, T, H, W, 3), or float (B, 3, T, H, W)
        in [-1, 1] with output="float".
        """
        if self.refine_only:
            raise WaltError("this pipeline has no base stage: use super_resolve")
        self.timings = {}
        b = len(seeds)
        if b == 0:
            raise WaltError("nothing to generate: no seeds")
        n = len(self.stages)
        steps_per = _per_stage(self.default_steps() if steps is None else steps, n, "--steps", int)
        if min(steps_per) < 1:
            raise WaltError(f"--steps must be >= 1, got {steps_per}")
        guidance_per = _per_stage(
            self.default_guidance() if guidance is None else guidance, n, "--guidance", float
        )
        clips = self.check_frames(num_frames or self.clip_frames)
        cond = self._conditioning(b, prompts, labels, text)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if cond_latents is not None and n > 1:
            raise WaltError("cond_latents condition a base-only pipeline; pass cond_video")
        context = cond_video
        pieces = []
        for chunk in range(clips):
            video = self._clip(
                cond,
                gens,
                steps_per,
                guidance_per,
                context=context,
                context_latents=cond_latents if chunk == 0 else None,
                chunk=(chunk, clips),
                callback=callback,
            )  # (B, 3, F, H, W)
            keep = 0 if chunk == 0 else CONTEXT_FRAMES
            pieces.append(video[:, :, keep:].cpu())
            context = video[:, :, -CONTEXT_FRAMES:]
        video = torch.cat(pieces, dim=2)
        if output == "float":
            return video
        return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)

    def super_resolve(
        self,
        z_lowres: Tensor,
        *,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        text: tuple[Tensor, Tensor] | None = None,
        steps: int | Sequence[int] | None = None,
        guidance: float | Sequence[float] | None = None,
        output: str = "uint8",
    ) -> Tensor:
        """The SR stages of this pipeline from a raw latent (B, c, T, h, w) at the resolution
        before its first SR stage (a base's output, or a real clip's low-res latent), then the
        decoder: the same denoising path as `generate`. `steps` / `guidance` one value or one
        per stage of the pipeline. Returns uint8 (B, T, H, W, 3) or float (B, 3, T, H, W)."""
        first = next((i for i, s in enumerate(self.stages) if s.is_sr), None)
        if first is None:
            raise WaltError("this pipeline has no super-resolution stage")
        b, n = len(seeds), len(self.stages)
        if b == 0 or z_lowres.shape[0] != b:
            raise WaltError(f"{z_lowres.shape[0]} low-res latents for {b} seeds")
        self.timings = {}
        steps_per = _per_stage(self.default_steps() if steps is None else steps, n, "--steps", int)
        guidance_per = _per_stage(
            self.default_guidance() if guidance is None else guidance, n, "--guidance", float
        )
        cond = self._conditioning(b, prompts, labels, text)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z_raw = z_lowres.to(self.device, torch.float32)
        for i in range(first, n):
            with self._timed(self.stages[i].name):
                z_raw = self._denoise(
                    self.stages[i], cond, gens, z_raw, None, None, steps_per[i],
                    guidance_per[i], (0, 1), None,
                )  # fmt: skip
        with self._timed("decode"):
            video = self.decode(z_raw)
        if output == "float":
            return video.cpu()
        return (
            ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()
        )

    def animate(self, image: Tensor, prompt: str | None = None, **kwargs) -> Tensor:
        """Image-to-video: `image` uint8 (H, W, 3) (any size: resized to cover the model's
        resolution and centre-cropped) becomes the first latent frame of every sample; `prompt`
        (one for all samples) or the `generate` keywords (seeds, prompts, labels, ...)."""
        if prompt is not None:
            kwargs["prompts"] = [prompt] * len(kwargs["seeds"])
        frames = image[None] if image.ndim == 3 else image
        return self.continue_video(frames, context_frames=1, **kwargs)

    def continue_video(
        self,
        frames: Tensor,
        *,
        seeds: Sequence[int],
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        context_frames: int = CONTEXT_FRAMES,
        **kwargs,
    ) -> Tensor:
        """Continue a clip, uint8 (T, H, W, 3), from its last `context_frames` frames (5: the K600
        setting, 2 latent frames); the output starts with those frames."""
        from walt_cli.data.video import frames_to_tensor, resize_crop

        frames = torch.as_tensor(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise WaltError(f"expected uint8 frames (T, H, W, 3), got {tuple(frames.shape)}")
        if frames.shape[0] < context_frames:
            raise WaltError(
                f"the clip has {frames.shape[0]} frames; continuing needs its last {context_frames}"
            )
        x = frames_to_tensor(frames[-context_frames:].numpy())  # (3, n, H, W) in [-1, 1]
        x = resize_crop(x, "cover", self.resolution)
        cond_video = x[None].expand(len(seeds), *x.shape)
        return self.generate(
            seeds=seeds, prompts=prompts, labels=labels, cond_video=cond_video, **kwargs
        )

    # ---------------------------------------------------------------------------------------
    # Internals

    @contextmanager
    def _timed(self, name: str):
        """Add the wall time of the block to `timings[name]` (seconds, summed over clips)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _conditioning(self, b, prompts, labels, text) -> Conditioning:
        kind = self.conditioning
        has_prompt = prompts is not None and any(p for p in prompts)
        if kind != "text" and (has_prompt or text is not None):
            raise WaltError(
                f"this model is {kind}"
                + (
                    " (pass --class NAME|ID, not a prompt)"
                    if kind == "class"
                    else ": drop the prompt"
                )
            )
        is_image = torch.zeros(b, dtype=torch.bool, device=self.device)
        if kind == "class":
            if labels is None:
                y = torch.full((b,), Conditioning.NULL_LABEL, dtype=torch.long)
            else:
                if len(labels) != b:
                    raise WaltError(f"{len(labels)} class labels for {b} samples")
                y = torch.tensor([int(v) for v in labels], dtype=torch.long)
            return Conditioning(labels=y.to(self.device), is_image=is_image)
        if labels is not None:
            self.class_id(labels[0])  # raises: not class-conditional
        if kind == "unconditional":
            return Conditioning(is_image=is_image)
        if text is None:
            prompts = [p or "" for p in prompts] if prompts is not None else [""] * b
            if len(prompts) != b:
                raise WaltError(f"{len(prompts)} prompts for {b} samples")
            if self.text_encoder is None:
                raise WaltError("this model is text-conditioned but has no text encoder loaded")
            with self._timed("text"):
                states, mask = self.text_encoder.encode(list(prompts))
        else:
            states, mask = text
        return Conditioning(
            text=states.to(self.device, torch.float32),
            text_mask=mask.to(self.device).bool(),
            is_image=is_image,
        )

    def _net_fn(self, net: WALT, samples: int):
        """net(x_in, t, cond) -> fp32 under the pipeline's precision.

        Batch-invariant, a call runs one sample at a time (a batched matmul may round
        differently from a single row), so that sample i's bytes do not depend on how many
        samples share the batch. A guided call holds 2 x `samples` rows, the conditional ones
        then the unconditional ones (`samplers.sample`): each sample's two rows run together,
        which keeps that promise and halves the calls (a 1.35-1.38x faster guided base stage on
        the CPU, BENCHMARKS.md "Generation").

        A network whose weights are bf16 (`from_bundle` in bf16) gets its inputs in bf16; one
        in fp32 runs under bf16 autocast when the precision is bf16 (the training previews,
        which sample with the live fp32 weights). The sampler's arithmetic stays fp32."""
        dtype = next(net.parameters()).dtype
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16" and dtype == torch.float32
            else nullcontext()
        )

        def fn(x_in: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            x_in, cond = x_in.to(dtype), cond.cast(dtype)
            rows = x_in.shape[0]
            if rows == 2 * samples:  # guided: sample i's rows i and samples + i run together
                groups = [[i, samples + i] for i in range(samples)]
            else:
                groups = [[i] for i in range(rows)]
            with autocast:
                if not self.batch_invariant or len(groups) == 1:
                    return net(x_in, t, cond).float()
                index = [torch.tensor(g, device=x_in.device) for g in groups]
                v = torch.cat([net(x_in[i], t[i], cond.select(i)).float() for i in index])
                return v[torch.cat(index).argsort()]  # back to the call's row order

        return fn

    def _noise(self, gens, shape: tuple[int, ...]) -> Tensor:
        """(B, *shape) standard normal, sample i from its own generator (CPU, then device)."""
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)

    def _clip(self, cond, gens, steps, guidance, *, context, context_latents, chunk, callback):
        """One clip through every stage and the decoder: float pixels (B, 3, F, H, W)."""
        from walt_cli.data.video import resize_crop

        b = len(gens)
        z_raw = None
        for i, stage in enumerate(self.stages):
            c = stage.net.latent_channels
            frames = stage.latent_frames
            h, w = stage.latent_grid
            frame_latents = frame_mask = None
            if context is not None:
                with self._timed("encode"):
                    px = torch.stack([resize_crop(v, "cover", stage.resolution) for v in context])
                    known = stage.normalize(self.encode(px.to(self.device)))  # (B, c, k, h, w)
            elif context_latents is not None and i == 0:
                known = context_latents.to(self.device, torch.float32)
            else:
                known = None
            if known is not None:
                k = known.shape[2]
                frame_latents = torch.zeros(b, c, frames, h, w, device=self.device)
                frame_latents[:, :, :k] = known
                frame_mask = first_frames_mask(b, frames, k, device=self.device)
            with self._timed(stage.name):
                z_raw = self._denoise(
                    stage, cond, gens, z_raw, frame_latents, frame_mask, steps[i], guidance[i],
                    chunk, callback,
                )  # fmt: skip
        with self._timed("decode"):
            video = self.decode(z_raw, callback=callback, chunk=chunk)
        return video

    def _denoise(
        self, stage, cond, gens, z_prev, frame_latents, frame_mask, steps, scale, chunk, callback
    ) -> Tensor:
        """One stage's DDIM: its normalised latent from noise (and, for an SR stage, the previous
        stage's raw latent `z_prev`); returns the raw (denormalised) latent."""
        b = len(gens)
        net = stage.net
        c, frames = net.latent_channels, stage.latent_frames
        h, w = stage.latent_grid
        stage_cond = Conditioning(  # a stage reads only the conditions it was built for
            labels=cond.labels if net.num_classes else None,
            text=cond.text if net.text_dim else None,
            text_mask=cond.text_mask if net.text_dim else None,
            is_image=cond.is_image,
        )
        lowres = None
        if stage.is_sr:
            z_lr = stage.normalize_lowres(z_prev)
            eps = self._noise(gens, tuple(z_lr.shape[1:]))
            level = torch.full((b,), stage.noise_level, device=self.device)
            lowres = q_sample(z_lr, eps, self.schedule.at(level))  # inputs.noise_augment
            stage_cond.noise_level = level
        noise = self._noise(gens, (c, frames, h, w))
        guide = ("labels", "text", "frames") if not stage.is_sr else ("labels", "text")
        guided = (
            stage_cond.labels is not None
            or stage_cond.text is not None
            or (frame_mask is not None and stage.frame_channels and "frames" in guide)
        )

        def report(s: DDIMStep) -> None:
            if callback is not None:
                callback(Progress(stage.name, s.index + 1, s.total, chunk[0] + 1, chunk[1]))

        z = sample(
            self._net_fn(net, b),
            noise,
            stage_cond,
            self.schedule,
            num_steps=steps,
            frame_latents=frame_latents,
            frame_mask=frame_mask,
            frame_channels=stage.frame_channels,
            lowres=lowres,
            guidance_scale=scale if guided and scale != 1.0 else None,
            guide=guide,
            callback=report,
        )
        return stage.denormalize(z)

    def encode(self, video: Tensor) -> Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> raw latents (one sample at a time if invariant)."""
        tok = self.tokenizer
        video = video.to(next(tok.parameters()).dtype)
        if not self.batch_invariant:
            return tok.encode(video).float()
        return torch.cat([tok.encode(video[i : i + 1]).float() for i in range(video.shape[0])])

    def decode(self, z: Tensor, *, callback: ProgressFn | None = None, chunk=(0, 1)) -> Tensor:
        """Raw latents (B, c, T, h, w) -> pixels (B, 3, 1 + 4(T-1), 8h, 8w) in [-1, 1]: chunked in
        time (`decode_chunk` latent frames at a time; "auto": one at a time when a tile holds
        more than 5x32x32 latents, i.e. above 17x256x256 pixels), tiled in space when the latent
        grid is larger than `decode_tile`, one sample at a time when batch-invariant."""
        z = z.to(next(self.tokenizer.parameters()).dtype)
        rows = [z[i : i + 1] for i in range(z.shape[0])] if self.batch_invariant else [z]
        chunk_latents = self.decode_chunk
        if chunk_latents == "auto":  # one latent frame at a time above 17x256x256 (memory)
            t, h, w = z.shape[2:]
            chunk_latents = (
                1 if t * min(h, self.decode_tile) * min(w, self.decode_tile) > 5 * 32 * 32 else None
            )
        out = []
        for k, row in enumerate(rows):
            out.append(
                decode_tiled(
                    lambda part: self.tokenizer.decode(part, chunk_latents=chunk_latents),
                    row,
                    tile=self.decode_tile,
                    overlap=self.decode_overlap,
                    factor=self.tokenizer.spatial_factor,
                )
                .float()
                .clamp(-1, 1)
            )
            if callback is not None:
                callback(Progress("decode", k + 1, len(rows), chunk[0] + 1, chunk[1]))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision, fp32 or bf16, of a pipeline on `device`: "auto" is bf16 on CUDA and fp32 on
    the CPU, where bf16 is faster only on CPUs with native bf16 units (AMX or AVX512-BF16;
    BENCHMARKS.md) and fp32 keeps the shipped model's figures as measured."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise WaltError(f"precision must be fp32 or bf16, got {precision!r}")
    return precision


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, overlap: int, left: bool, right: bool) -> Tensor:
    """Blend weights along one axis: rising over the overlap at a shared left edge, falling at
    a shared right edge, 1 elsewhere."""
    w = torch.ones(n)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if left and overlap:
        w[:overlap] = ramp
    if right and overlap:
        w[-overlap:] = ramp.flip(0)
    return w


def decode_tiled(
    decode: Callable[[Tensor], Tensor], z: Tensor, *, tile: int, overlap: int, factor: int
) -> Tensor:
    """Decode latents (B, c, T, h, w) in overlapping spatial tiles of `tile` latents, blending
    the overlaps linearly (the tiling of diffusers' VAEs). A grid no larger than one tile is
    decoded whole (identical to `decode(z)`). The tokenizer normalises per frame, so tiles see
    slightly different statistics; the blend hides the seams."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decode(z)
    if not 0 <= overlap < tile:
        raise WaltError(f"decode overlap {overlap} must be smaller than the tile {tile}")
    stride = tile - overlap
    out = weight = None
    for y in _tile_starts(h, tile, stride):
        for x in _tile_starts(w, tile, stride):
            part = decode(z[..., y : y + tile, x : x + tile]).float()  # (B, 3, T, th f, tw f)
            ph, pw = part.shape[-2:]
            wy = _ramp(ph, overlap * factor, y > 0, y + tile < h)
            wx = _ramp(pw, overlap * factor, x > 0, x + tile < w)
            wgt = (wy[:, None] * wx[None, :]).to(part.device)
            if out is None:
                b, c, t = part.shape[:3]
                out = part.new_zeros(b, c, t, h * factor, w * factor)
                weight = part.new_zeros(h * factor, w * factor)
            ys, xs = slice(y * factor, y * factor + ph), slice(x * factor, x * factor + pw)
            out[..., ys, xs] += part * wgt
            weight[ys, xs] += wgt
    return out / weight


def load_text_encoder(spec: dict | None, *, where) -> Any:
    """The text encoder a bundle names (walt_cli.models.text), checked against its hash."""
    if not spec:
        raise WaltError(f"{where}: the model is text-conditioned but names no text encoder")
    try:
        from walt_cli.models.text import TextEncoder, TextEncoderSpec
    except ImportError:
        raise WaltError(
            f"{where}: the model needs the {spec.get('name')!r} text encoder, which this walt "
            "does not have (walt_cli.models.text is missing)"
        ) from None
    spec = dict(spec)
    want = spec.pop("hash", None)
    enc = TextEncoder.from_spec(TextEncoderSpec.from_dict(spec))
    if want and str(enc.hash) != str(want):
        raise WaltError(
            f"{where}: the model was trained with text encoder {want}, the installed "
            f"{spec.get('name')!r} is {enc.hash}"
        )
    return enc
