"""Recipes: one YAML file per experiment, validated against typed dataclass schemas.

`load_recipe(path, overrides)` merges, in order, the schema's defaults, the YAML file and
`a.b=c` command-line overrides (OmegaConf dotlist), resolves interpolations such as
`run_dir: runs/${name}`, and checks the values. Any problem (unknown key, wrong type, missing
file, impossible value) is a :class:`WaltError` whose one-line message names the file and the
key path.

Each command reads its own section; the schema grows one section per stage (`tokenizer`,
`base`, `sr`, `sample`, `eval`) as the stages land.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walt_cli.errors import WaltError

DATA_SOURCES = ("shapes", "folder", "manifest")
SHORT_CLIP_POLICIES = ("skip", "loop", "pad")
TEMPORAL_FACTOR = 4  # the causal tokenizer's f_t: clips have 1 + 4k frames
SPATIAL_FACTOR = 8  # the tokenizer's f_s: frame sides are multiples of 8


@dataclass
class ShapesConfig:
    """The procedural `shapes` data set (walt_cli/data/shapes.py)."""

    num_items: int = 2048  # items per epoch; item i is the same video for the same seed
    max_objects: int = 2  # 1..max_objects shapes per video
    seed: int = 0
    fps: float = 8.0
    # Multi-scale crops (tokenizer training): render each clip with its short side at one of
    # these sizes and crop it to `data.resolution` (at random where `data.random_crop`, else
    # centred at the first size), so a tokenizer trained on small crops sees shapes at the
    # scales of every resolution it will encode. null: render at `data.resolution`.
    render_sizes: list[int] | None = None
    # Hold the 40 (colour, shape, direction) triples of shapes.HELD_OUT out of training and
    # validation (an object that would show one is redrawn); split "heldout" shows only them.
    # false: every item is the one it always was.
    holdout: bool = False


@dataclass
class DataConfig:
    """What the data pipeline feeds the model: a clip of `num_frames` at `resolution` (H, W)."""

    source: str = "shapes"  # shapes | folder (class folders, UCF-101 layout) | manifest (csv/jsonl)
    path: str | None = None  # the folder or manifest file (not used by shapes)
    split_dir: str | None = None  # where classInd.txt / trainlist0N.txt live (default: searched)
    fold: int = 1  # which trainlist0N/testlist0N split
    val_fraction: float = 0.05  # held-out share where the data set has no split files
    num_frames: int = 17  # 1 + 4k
    resolution: list[int] = field(default_factory=lambda: [128, 128])  # H, W; multiples of 8
    resize: int | None = (
        None  # short side before cropping (default: smallest size covering the crop)
    )
    frame_stride: int = 1  # take every n-th source frame (ignored where fps is set)
    fps: float | None = None  # resample clips to this frame rate
    random_crop: bool = False  # training clips: random crop and random start; validation: centred
    short_clips: str = "skip"  # videos shorter than a clip: skip (counted), loop or pad
    images: str | None = None  # extra images (folder or manifest) for joint image-video training
    image_ratio: float = 0.0  # share of samples that are packs of independent images
    images_per_sample: int | None = None  # images per packed sample (default: latent frames, 1 + k)
    batch_size: int = 8
    clips_per_video: int = 1  # `tokenize encode`, train split: K random windows + flips a video
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TrainerConfig:
    """Lightning keys (https://lightning.ai/docs/pytorch/stable/common/trainer.html)."""

    devices: Any = "auto"  # "auto", a count, or a list of device ids
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ddp_fork | single_device | fsdp
    # fsdp only: full (one last.ckpt file gathered on rank 0) | sharded (a last.ckpt/ folder,
    # each rank writes its shard: for models whose full state does not fit one process)
    fsdp_checkpoint: str = "full"
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    seed: int = 0
    num_workers: int = 2
    log_every: int = 50  # steps between logged metrics
    checkpoint_every: int = 1000  # steps between checkpoints (last.ckpt is always kept)
    # loggers beside metrics.csv (always written): tensorboard (<stage>/tensorboard/ event files;
    # needs `pip install tensorboard`)
    loggers: list[str] = field(default_factory=list)


@dataclass
class TokenizerConfig:
    """`walt tokenize train|encode`: the causal 3D autoencoder and its MAGVIT-v2 loss recipe."""

    preset: str = "tiny"  # tiny | shapes | paper | paper-image
    checkpoint: str | None = None  # use these weights (skip training); default: the run's own
    init_from: str | None = None  # start a new run from these weights (both halves, a
    # tokenizer.safetensors of this preset): fine-tune a trained tokenizer on this recipe's data
    max_steps: int = 100_000
    lr: float = 1e-4
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # max gradient norm (0: off)
    recon_loss: str = "l2"  # l1 | l2
    recon_weight: float = 5.0
    perceptual: str = "none"  # none | i3d | lpips
    perceptual_weight: float = 0.1
    perceptual_path: str | None = None  # the I3D detector (default: searched) or LPIPS weights
    disc_start: int = 2000  # adversarial terms start after this many steps
    disc_channels: int = 128
    disc_multipliers: list[int] = field(default_factory=lambda: [2, 4, 4, 4, 4])
    disc_lr: float | None = None  # default: lr
    gan_weight: float = 0.1
    r1_weight: float = 10.0
    r1_every: int = 4  # lazy regularisation: the r1 term every n discriminator steps, scaled by n
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    nan_patience: int = 10  # stop after this many non-finite losses in a row
    val_every: int = 500  # steps between validations (PSNR of the EMA model) and previews
    val_batches: int = 4
    encode_batch_size: int = 8
    shard_size: int = 256  # clips per latent shard


@dataclass
class DenoiserConfig:
    """The keys every W.A.L.T diffusion stage shares (base and SR): the network, its optimiser,
    the diffusion training recipe and the previews. Model keys left at null take the preset's."""

    preset: str = "tiny"  # walt-l | walt-xl | walt-3b | tiny (models/transformer.py PRESETS)
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    adaln_lora_rank: int | None = None  # r of AdaLN-LoRA; 0 = a separate AdaLN per layer
    spatial_window: list[int] | None = None  # SW window (h, w) in tokens (default: whole frame)
    st_window: list[int] | None = None  # STW window (h, w) in tokens (default: half the frame)
    num_classes: int = 0  # class-conditional with this many classes; 0 = no class labels
    text_dim: int | None = None  # width of the text states in the latent shards (the encoder's D)
    cross_attention: str = "spatial"  # text cross-attention in the spatial layers or in all layers
    # Starts of a new network (a checkpoint's weights replace them): the relative bias tables at
    # random (Swin's) or at a locality prior (-slope x distance, per head); the position tables
    # at random or at sin-cos tables. README, "The default model", measures both.
    bias_init: str = "random"  # random | locality
    pos_init: str = "random"  # random | sincos
    gradient_checkpointing: bool = False
    batch_size: int | None = None  # per device (default: data.batch_size)
    # micro-batches of batch_size per optimizer step: global batch = batch_size x devices x this
    accumulate_grad_batches: int = 1
    latents: str | None = None  # latent folder (default: the stage's folder under runs/<name>/)
    max_steps: int = 100_000
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float = 5e-4
    warmup_steps: int = 5000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    lr_schedule: str = "cosine"  # cosine | constant (after the warmup)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 0.0
    ema: bool = True
    ema_decay: float = 0.9999
    grad_clip: float = 1.0  # max gradient norm (0: off)
    p_self_cond: float = 0.9  # self-conditioning rate [P §4.3, Table 3c]
    p_cond_drop: float = 0.0  # condition dropout (trains the unconditional branch of CFG)
    # Training times t -> s t / (1 + (s - 1) t), s > 1 toward noise (diffusion.losses.shift_time);
    # 1 is the paper's uniform draw.
    time_shift: float = 1.0
    nan_patience: int = 10  # stop after this many non-finite losses in a row
    preview_every: int = 2000  # steps between preview videos (0: none)
    preview_samples: int = 4
    preview_steps: int = 50  # DDIM steps of the previews (the paper samples with 50)
    guidance_scale: float | None = None  # classifier-free guidance of the previews (null: none)


@dataclass
class BaseConfig(DenoiserConfig):
    """`walt train-base`: the base latent transformer and its diffusion training recipe.

    The latent grid (T, h, w) follows from `data` (num_frames, resolution) and the tokenizer's
    factors. `latents: online` encodes pixels on the fly instead of reading shards.
    """

    stats_batches: int = 16  # online encoding: batches that the latent statistics are measured on
    init_from: str | None = None  # start a new run from these weights (a base.safetensors), its
    # grid resized to this run's latent grid (the paper's 128x128 -> 128x224 fine-tune, §5.3)
    p_frame_pred: float = 0.0  # share of samples conditioned on their first latent frames
    num_cond_frames: list[int] = field(default_factory=lambda: [1, 2])  # latent frames to keep


@dataclass
class SRConfig(DenoiserConfig):
    """`walt train-sr RECIPE --stage N` reads `sr[N-1]`: one super-resolution stage [P §5.3].

    It denoises the tokenizer latent of a clip at `resolution` conditioned on the latent of the
    same clip at resolution / factor (the previous stage's output resolution), noised to a level
    t_sr ~ U(0, t_max) that AdaLN sees. Latent pairs come from `walt tokenize encode --sr N`.
    """

    resolution: list[int] = field(default_factory=lambda: [128, 128])  # output pixels (H, W)
    factor: int = 2  # pixel and latent upsampling factor from the previous stage
    t_max: float = 0.25  # noise-conditioning augmentation: t_sr ~ U(0, t_max) in training
    sample_noise_level: float = 0.1  # t_sr at sampling (and in the previews)


@dataclass
class TextEncoderConfig:
    """The text encoder that turns captions into the states the denoisers cross-attend to
    (walt_cli/models/text.py; the same keys as `TextEncoderSpec`)."""

    name: str = "none"  # minilm | t5 | none
    path: str | None = None  # t5: a local directory or a hub id already in the HF cache
    max_length: int = 32  # tokens per caption (padded or truncated)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (T5-XL: bfloat16 on GPU)


@dataclass
class SampleConfig:
    """`walt sample` / `walt animate` defaults, stored in exported bundles. Per-stage lists run
    base, sr1, sr2, ...; a shorter list repeats its last value."""

    steps: list[int] = field(default_factory=lambda: [50, 25])  # DDIM steps per stage
    guidance: list[float] = field(default_factory=lambda: [1.0])  # CFG per stage; 1 = none
    noise_level: list[float] | None = None  # SR noise augmentation per SR stage (null: the stage's)
    fps: float | None = None  # frame rate of written videos (null: data.fps, shapes fps, or 8)
    frames: int | None = None  # default --frames (null: one clip of the model)


@dataclass
class Recipe:
    name: str = ""  # defaults to the recipe file's stem
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    sr: list[SRConfig] = field(default_factory=list)  # the cascade's stages, 1 first
    sample: SampleConfig = field(default_factory=SampleConfig)


# ---------------------------------------------------------------------------------------------


def _describe(err: Exception) -> str:
    """The first meaningful line of an OmegaConf error, without its 'full_key:' trailer."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and not line.startswith(("full_key", "object_type", "reference_type")):
            return line
    return type(err).__name__


def _merge_error(source: str, err: Exception) -> WaltError:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        return WaltError(f"{source}: unknown key '{key}'")
    where = f"{key}: " if key else ""
    return WaltError(f"{source}: {where}{_describe(err)}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, merge and validate a recipe. Returns a typed `Recipe` (an OmegaConf structured view)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise WaltError(f"{path}: recipe not found")
    try:
        from_file = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise WaltError(f"{path}: not valid YAML ({_describe(err)})") from None
    if not isinstance(from_file, dict) and not OmegaConf.is_dict(from_file):
        raise WaltError(f"{path}: a recipe is a YAML mapping of sections")
    if not from_file and _yaml_is_empty(path):  # `{}` is an explicit all-defaults recipe
        raise WaltError(f"{path}: the recipe is empty (a recipe is a YAML mapping of sections)")

    cfg = OmegaConf.structured(Recipe)
    try:
        cfg = OmegaConf.merge(cfg, from_file)
    except OmegaConfBaseException as err:
        raise _merge_error(str(path), err) from None
    for item in overrides or []:
        if "=" not in item:
            raise WaltError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            if "[" in key or any(part.isdigit() for part in key.split(".")):
                # a key inside a list (sr.0.lr or sr[0].lr): dotlist merging would turn the
                # list into a mapping, so the value is set in place
                value = OmegaConf.from_dotlist([f"value={raw}"])["value"]
                OmegaConf.update(cfg, key, value, merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _merge_error(f"override {item!r}", err) from None
        except (IndexError, KeyError, ValueError, TypeError) as err:
            raise WaltError(f"override {item!r}: {err}") from None
    if not cfg.name:
        cfg.name = path.stem
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _merge_error(str(path), err) from None
    _expand_home(cfg)
    recipe: Recipe = cfg  # type: ignore[assignment]  (structured config: typed attribute access)
    validate(recipe, source=str(path))
    return recipe


# Recipe keys that name files or folders (sr.N.latents besides: every SR stage has one).
_PATH_KEYS = (
    "run_dir",
    "data.path",
    "data.split_dir",
    "data.images",
    "tokenizer.checkpoint",
    "tokenizer.init_from",
    "tokenizer.perceptual_path",
    "base.latents",
    "base.init_from",
    "text_encoder.path",
)


def _expand_home(cfg) -> None:
    """A leading `~` in a path-valued key is the home folder, as in a shell. The shell expands
    it only at the start of a word, so an override such as `run_dir=~/runs/x` would otherwise
    reach walt as a folder literally named `~`."""
    from omegaconf import OmegaConf

    keys = [*_PATH_KEYS, *(f"sr.{i}.latents" for i in range(len(cfg.sr)))]
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value))


def _yaml_is_empty(path: Path) -> bool:
    """The file holds no YAML document (empty, blank or comments only)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text()) is None
    except yaml.YAMLError:
        return False


def _check(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise WaltError(f"{source}: {key}: {message}")


def validate(recipe: Recipe, *, source: str) -> None:
    """Checks that types alone cannot express.

    Data paths are checked by the commands that read them (`check_data_paths`), so a shipped
    recipe that names a data set the user has not downloaded yet still validates.
    """
    d = recipe.data
    _check(
        d.source in DATA_SOURCES,
        source,
        "data.source",
        f"must be one of {', '.join(DATA_SOURCES)}, got {d.source!r}",
    )
    _check(
        d.num_frames >= 1 and (d.num_frames - 1) % TEMPORAL_FACTOR == 0,
        source,
        "data.num_frames",
        f"must be 1 + {TEMPORAL_FACTOR}k (1, 5, 9, 17, ...), got {d.num_frames}",
    )
    _check(
        len(d.resolution) == 2,
        source,
        "data.resolution",
        f"must be [height, width], got {list(d.resolution)}",
    )
    _check(
        all(s > 0 and s % SPATIAL_FACTOR == 0 for s in d.resolution),
        source,
        "data.resolution",
        f"sides must be positive multiples of {SPATIAL_FACTOR}, got {list(d.resolution)}",
    )
    _check(
        d.resize is None or d.resize >= min(d.resolution),
        source,
        "data.resize",
        f"{d.resize} is smaller than the crop {list(d.resolution)}",
    )
    _check(d.frame_stride >= 1, source, "data.frame_stride", f"must be >= 1, got {d.frame_stride}")
    _check(d.fps is None or d.fps > 0, source, "data.fps", f"must be positive, got {d.fps}")
    _check(
        d.short_clips in SHORT_CLIP_POLICIES,
        source,
        "data.short_clips",
        f"must be one of {', '.join(SHORT_CLIP_POLICIES)}, got {d.short_clips!r}",
    )
    _check(
        0.0 <= d.val_fraction < 1.0,
        source,
        "data.val_fraction",
        f"must be in [0, 1), got {d.val_fraction}",
    )
    _check(
        0.0 <= d.image_ratio <= 1.0,
        source,
        "data.image_ratio",
        f"must be in [0, 1], got {d.image_ratio}",
    )
    _check(
        d.image_ratio == 0.0 or d.images is not None,
        source,
        "data.image_ratio",
        "is set but data.images names no image folder or manifest",
    )
    _check(d.batch_size >= 1, source, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(
        d.clips_per_video >= 1,
        source,
        "data.clips_per_video",
        f"must be >= 1, got {d.clips_per_video}",
    )
    _check(d.shapes.max_objects >= 1, source, "data.shapes.max_objects", "must be >= 1")
    _check(d.shapes.num_items >= 1, source, "data.shapes.num_items", "must be >= 1")
    sizes = d.shapes.render_sizes
    _check(
        sizes is None or (len(sizes) > 0 and min(sizes) >= min(d.resolution)),
        source,
        "data.shapes.render_sizes",
        f"must be null or sizes >= the crop {list(d.resolution)}, got {sizes}",
    )
    _check(
        not d.shapes.holdout or d.source == "shapes",
        source,
        "data.shapes.holdout",
        f"applies to data.source=shapes only, not {d.source}",
    )
    if d.source != "shapes":
        _check(d.path is not None, source, "data.path", f"is required for data.source={d.source}")
    k = recipe.tokenizer
    _check(
        k.preset in ("tiny", "shapes", "paper", "paper-image"),
        source,
        "tokenizer.preset",
        f"must be tiny, shapes, paper or paper-image, got {k.preset!r}",
    )
    _check(
        k.recon_loss in ("l1", "l2"),
        source,
        "tokenizer.recon_loss",
        f"must be l1 or l2, got {k.recon_loss!r}",
    )
    _check(
        k.perceptual in ("none", "i3d", "lpips"),
        source,
        "tokenizer.perceptual",
        f"must be none, i3d or lpips, got {k.perceptual!r}",
    )
    _check(
        k.perceptual != "lpips" or k.perceptual_path is not None,
        source,
        "tokenizer.perceptual_path",
        "LPIPS weights must be given by path (no download happens)",
    )
    _check(
        len(k.betas) == 2, source, "tokenizer.betas", f"must be [beta1, beta2], got {list(k.betas)}"
    )
    _check(
        k.max_steps >= 1 and k.warmup_steps >= 0,
        source,
        "tokenizer.max_steps",
        "must be >= 1 (warmup >= 0)",
    )
    _check(
        0.0 <= k.ema_decay < 1.0,
        source,
        "tokenizer.ema_decay",
        f"must be in [0, 1), got {k.ema_decay}",
    )
    _check(k.r1_every >= 1, source, "tokenizer.r1_every", "must be >= 1")
    _check(k.nan_patience >= 1, source, "tokenizer.nan_patience", "must be >= 1")
    _check(
        k.val_every >= 1 and k.val_batches >= 1,
        source,
        "tokenizer.val_every",
        "val_every and val_batches must be >= 1",
    )
    _check(
        k.shard_size >= 1 and k.encode_batch_size >= 1,
        source,
        "tokenizer.shard_size",
        "shard_size and encode_batch_size must be >= 1",
    )
    _check_optimisation(k, "tokenizer", source)
    _check(
        k.disc_lr is None or k.disc_lr > 0,
        source,
        "tokenizer.disc_lr",
        f"must be positive (or null: lr), got {k.disc_lr}",
    )
    for key in ("recon_weight", "perceptual_weight", "gan_weight", "r1_weight", "lecam_weight"):
        value = getattr(k, key)
        _check(value >= 0, source, f"tokenizer.{key}", f"must be >= 0, got {value}")
    _check(0.0 <= k.lecam_decay < 1.0, source, "tokenizer.lecam_decay", "must be in [0, 1)")
    _check(k.disc_start >= 0, source, "tokenizer.disc_start", "must be >= 0")
    _check(
        k.disc_channels >= 1 and len(k.disc_multipliers) >= 1 and min(k.disc_multipliers) >= 1,
        source,
        "tokenizer.disc_channels",
        "disc_channels and every disc_multipliers entry must be >= 1",
    )
    _validate_base(recipe.base, source)
    _validate_sr(recipe, source)
    _validate_text_encoder(recipe, source)
    _validate_sample(recipe.sample, source)
    b, latent_frames = recipe.base, 1 + (d.num_frames - 1) // TEMPORAL_FACTOR
    _check(
        b.p_frame_pred == 0 or max(b.num_cond_frames) < latent_frames,
        source,
        "base.num_cond_frames",
        f"{list(b.num_cond_frames)} leaves nothing to predict: data.num_frames={d.num_frames} "
        f"gives {latent_frames} latent frames (condition on fewer)",
    )
    _validate_trainer(recipe.trainer, source)


# What walt runs Lightning with (https://lightning.ai/docs/pytorch/stable/common/trainer.html).
PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "16-mixed")
HALF_WEIGHTS = ("bf16-true", "16-true", "bf16", "16", "transformer-engine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device", "fsdp")
FSDP_CHECKPOINTS = ("full", "sharded")
LOGGERS = ("tensorboard",)  # trainer.loggers


def _check_optimisation(section, name: str, source: str) -> None:
    """Ranges shared by the optimiser keys of every training section."""
    _check(section.lr > 0, source, f"{name}.lr", f"must be positive, got {section.lr}")
    _check(
        all(0.0 <= beta < 1.0 for beta in section.betas),
        source,
        f"{name}.betas",
        f"each beta must be in [0, 1), got {list(section.betas)}",
    )
    wd = getattr(section, "weight_decay", 0.0)
    _check(wd >= 0, source, f"{name}.weight_decay", f"must be >= 0, got {wd}")
    _check(
        section.grad_clip >= 0,
        source,
        f"{name}.grad_clip",
        f"must be >= 0 (0: off), got {section.grad_clip}",
    )
    _check(
        0.0 <= section.min_lr_ratio <= 1.0,
        source,
        f"{name}.min_lr_ratio",
        f"must be in [0, 1], got {section.min_lr_ratio}",
    )


def _validate_trainer(t: TrainerConfig, source: str) -> None:
    precision = str(t.precision)
    _check(
        precision not in HALF_WEIGHTS,
        source,
        "trainer.precision",
        f"{precision} keeps the weights themselves in half precision, where the optimiser's "
        "and the EMA's small updates round away; use bf16-mixed (or 16-mixed, 32-true)",
    )
    _check(
        precision in PRECISIONS,
        source,
        "trainer.precision",
        f"must be one of {', '.join(PRECISIONS)}, got {precision!r}",
    )
    _check(
        str(t.accelerator) in ACCELERATORS,
        source,
        "trainer.accelerator",
        f"must be one of {', '.join(ACCELERATORS)}, got {t.accelerator!r}",
    )
    _check(
        not str(t.strategy).startswith("deepspeed"),
        source,
        "trainer.strategy",
        f"{t.strategy} is not supported: use fsdp to shard a model that does not fit one device",
    )
    _check(
        str(t.strategy) in STRATEGIES,
        source,
        "trainer.strategy",
        f"must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}",
    )
    devices = t.devices
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and (devices >= 1 or devices == -1))
        or (isinstance(devices, str) and devices.lstrip("-").isdigit() and int(devices) != 0)
        or (
            not isinstance(devices, (int, str))
            and len(devices) >= 1
            and all(isinstance(i, int) and i >= 0 for i in devices)
        )
    )
    _check(
        ok,
        source,
        "trainer.devices",
        f"must be auto, a count >= 1 (-1: all), or a list of device ids, got {devices!r}",
    )
    _check(t.num_nodes >= 1, source, "trainer.num_nodes", "must be >= 1")
    _check(
        t.fsdp_checkpoint in FSDP_CHECKPOINTS,
        source,
        "trainer.fsdp_checkpoint",
        f"must be one of {', '.join(FSDP_CHECKPOINTS)}, got {t.fsdp_checkpoint!r}",
    )
    _check(t.seed >= 0, source, "trainer.seed", f"must be >= 0, got {t.seed}")
    _check(t.num_workers >= 0, source, "trainer.num_workers", "must be >= 0")
    _check(t.log_every >= 1, source, "trainer.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, source, "trainer.checkpoint_every", "must be >= 1")
    for name in t.loggers:
        _check(
            name in LOGGERS,
            source,
            "trainer.loggers",
            f"unknown logger {name!r} (known: {', '.join(LOGGERS)}; metrics.csv is always written)",
        )


def _validate_denoiser(b: DenoiserConfig, key: str, source: str) -> None:
    """The checks every diffusion stage shares; `key` is its recipe path (base, sr[0], ...)."""
    from walt_cli.models.transformer import BIAS_INITS, POS_INITS, PRESETS

    def check(ok: bool, sub: str, message: str) -> None:
        _check(ok, source, f"{key}.{sub}", message)

    check(b.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {b.preset!r}")
    for sub in ("depth", "width", "heads", "patch_size"):
        value = getattr(b, sub)
        check(value is None or value >= 1, sub, f"must be >= 1, got {value}")
    check(b.adaln_lora_rank is None or b.adaln_lora_rank >= 0, "adaln_lora_rank", "must be >= 0")
    for sub in ("spatial_window", "st_window"):
        value = getattr(b, sub)
        check(
            value is None or (len(value) == 2 and min(value) >= 1),
            sub,
            f"must be [height, width] in tokens, got {None if value is None else list(value)}",
        )
    check(b.num_classes >= 0, "num_classes", "must be >= 0")
    check(b.batch_size is None or b.batch_size >= 1, "batch_size", "must be >= 1")
    check(
        b.accumulate_grad_batches >= 1,
        "accumulate_grad_batches",
        f"must be >= 1, got {b.accumulate_grad_batches}",
    )
    check(b.text_dim is None or b.text_dim >= 1, "text_dim", "must be >= 1 (or null)")
    check(
        b.cross_attention in ("spatial", "all"),
        "cross_attention",
        f"must be spatial or all, got {b.cross_attention!r}",
    )
    check(
        b.bias_init in BIAS_INITS,
        "bias_init",
        f"must be {' or '.join(BIAS_INITS)}, got {b.bias_init!r}",
    )
    check(
        b.pos_init in POS_INITS, "pos_init", f"must be {' or '.join(POS_INITS)}, got {b.pos_init!r}"
    )
    check(
        b.optimizer in ("adamw", "adafactor"),
        "optimizer",
        f"must be adamw or adafactor, got {b.optimizer!r}",
    )
    check(len(b.betas) == 2, "betas", f"must be [beta1, beta2], got {list(b.betas)}")
    check(b.max_steps >= 1 and b.warmup_steps >= 0, "max_steps", "must be >= 1 (warmup >= 0)")
    _check_optimisation(b, key, source)
    check(
        b.guidance_scale is None or b.guidance_scale >= 0,
        "guidance_scale",
        f"must be >= 0 (or null), got {b.guidance_scale}",
    )
    check(
        b.lr_schedule in ("cosine", "constant"),
        "lr_schedule",
        f"must be cosine or constant, got {b.lr_schedule!r}",
    )
    check(0.0 <= b.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
    for sub in ("p_self_cond", "p_cond_drop"):
        value = getattr(b, sub)
        check(0.0 <= value <= 1.0, sub, f"must be in [0, 1], got {value}")
    check(b.time_shift > 0, "time_shift", f"must be > 0 (1: uniform times), got {b.time_shift}")
    check(b.nan_patience >= 1, "nan_patience", "must be >= 1")
    check(
        b.preview_every >= 0 and b.preview_samples >= 1 and b.preview_steps >= 1,
        "preview_every",
        "preview_every must be >= 0, preview_samples and preview_steps >= 1",
    )


def _validate_base(b: BaseConfig, source: str) -> None:
    _validate_denoiser(b, "base", source)
    _check(
        0.0 <= b.p_frame_pred <= 1.0,
        source,
        "base.p_frame_pred",
        f"must be in [0, 1], got {b.p_frame_pred}",
    )
    _check(
        len(b.num_cond_frames) >= 1 and min(b.num_cond_frames) >= 1,
        source,
        "base.num_cond_frames",
        f"must list latent frame counts >= 1, got {list(b.num_cond_frames)}",
    )
    _check(b.stats_batches >= 1, source, "base.stats_batches", "must be >= 1")


def stage_resolution(recipe: Recipe, stage: int) -> list[int]:
    """Output pixels (H, W) of cascade stage `stage` (0 = the base, N = sr[N-1])."""
    return list(recipe.data.resolution if stage == 0 else recipe.sr[stage - 1].resolution)


def _validate_sr(recipe: Recipe, source: str) -> None:
    """Each SR stage's own checks (the chain of resolutions is checked by the commands that use
    a stage, `check_sr_chain`, so that overriding data.resolution for another command works)."""
    for i, sr in enumerate(recipe.sr):
        key = f"sr[{i}]"
        _validate_denoiser(sr, key, source)
        _check(sr.factor >= 2, source, f"{key}.factor", f"must be >= 2, got {sr.factor}")
        _check(
            len(sr.resolution) == 2
            and all(s > 0 and s % (SPATIAL_FACTOR * sr.factor) == 0 for s in sr.resolution),
            source,
            f"{key}.resolution",
            f"must be [height, width], multiples of {SPATIAL_FACTOR} x factor {sr.factor}, "
            f"got {list(sr.resolution)}",
        )
        _check(0.0 <= sr.t_max <= 1.0, source, f"{key}.t_max", f"must be in [0, 1], got {sr.t_max}")
        _check(
            0.0 <= sr.sample_noise_level <= 1.0,
            source,
            f"{key}.sample_noise_level",
            f"must be in [0, 1], got {sr.sample_noise_level}",
        )


def check_sr_chain(recipe: Recipe, stage: int, source: str = "recipe") -> None:
    """SR stages 1..`stage`: each one's resolution is the previous stage's (the base's
    data.resolution for stage 1) times its factor."""
    for i, sr in enumerate(recipe.sr[:stage]):
        previous = stage_resolution(recipe, i)
        want = [s * sr.factor for s in previous]
        _check(
            list(sr.resolution) == want,
            source,
            f"sr[{i}].resolution",
            f"{list(sr.resolution)} is not the previous stage's {previous} x factor {sr.factor} "
            f"= {want}",
        )


def _validate_text_encoder(recipe: Recipe, source: str) -> None:
    from walt_cli.models.text import DTYPES, ENCODERS

    e = recipe.text_encoder
    _check(
        e.name in ENCODERS,
        source,
        "text_encoder.name",
        f"unknown encoder {e.name!r}; choose one of {', '.join(ENCODERS)}",
    )
    _check(
        e.dtype in DTYPES,
        source,
        "text_encoder.dtype",
        f"must be one of {', '.join(DTYPES)}, got {e.dtype!r}",
    )
    _check(e.max_length >= 1, source, "text_encoder.max_length", "must be >= 1")
    _check(
        e.name != "t5" or bool(e.path),
        source,
        "text_encoder.path",
        "name a T5 encoder: a local directory or a hub id already in the Hugging Face cache",
    )


def _validate_sample(s: SampleConfig, source: str) -> None:
    _check(
        len(s.steps) >= 1 and min(s.steps) >= 1,
        source,
        "sample.steps",
        f"must list DDIM steps >= 1 per stage, got {list(s.steps)}",
    )
    _check(
        len(s.guidance) >= 1 and min(s.guidance) >= 0,
        source,
        "sample.guidance",
        f"must list guidance scales >= 0 per stage, got {list(s.guidance)}",
    )
    _check(
        s.noise_level is None or all(0 <= v <= 1 for v in s.noise_level),
        source,
        "sample.noise_level",
        "must list levels in [0, 1] per SR stage (or null)",
    )
    _check(s.fps is None or s.fps > 0, source, "sample.fps", f"must be positive, got {s.fps}")
    _check(
        s.frames is None or (s.frames >= 1 and (s.frames - 1) % TEMPORAL_FACTOR == 0),
        source,
        "sample.frames",
        f"must be 1 + {TEMPORAL_FACTOR}k (or null), got {s.frames}",
    )


def check_data_paths(data: DataConfig) -> None:
    """One-line errors for data paths that do not exist (relative to the working directory)."""
    where = "recipe"
    if data.source != "shapes":
        want_dir = data.source == "folder"
        p = Path(data.path)
        _check(
            p.is_dir() if want_dir else p.is_file(),
            where,
            "data.path",
            f"{'folder' if want_dir else 'file'} not found: {data.path}",
        )
    if data.images is not None:
        _check(Path(data.images).exists(), where, "data.images", f"not found: {data.images}")
    if data.split_dir is not None:
        _check(
            Path(data.split_dir).is_dir(),
            where,
            "data.split_dir",
            f"folder not found: {data.split_dir}",
        )


def to_yaml(recipe: Recipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(recipe)


def save_recipe(recipe: Recipe) -> Path:
    """Write the resolved recipe to `<run_dir>/recipe.yaml` (the last command's view of it)."""
    from walt_cli.runio import write_text

    return write_text(Path(recipe.run_dir) / "recipe.yaml", to_yaml(recipe))
