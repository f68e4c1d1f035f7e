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
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TrainerConfig:
    """Lightning keys (https://lightning.ai/docs/pytorch/stable/common/trainer.html)."""

    devices: Any = "auto"  # "auto", a count, or a list of device ids
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp | deepspeed_stage_2 ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    seed: int = 0
    num_workers: int = 2
    log_every: int = 50  # steps between logged metrics
    checkpoint_every: int = 1000  # steps between checkpoints (last.ckpt is always kept)


@dataclass
class Recipe:
    name: str = ""  # defaults to the recipe file's stem
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


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

    cfg = OmegaConf.structured(Recipe)
    try:
        cfg = OmegaConf.merge(cfg, from_file)
    except OmegaConfBaseException as err:
        raise _merge_error(str(path), err) from None
    for item in overrides or []:
        if "=" not in item:
            raise WaltError(f"override {item!r} is not of the form key.path=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _merge_error(f"override {item!r}", err) from None
    if not cfg.name:
        cfg.name = path.stem
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _merge_error(str(path), err) from None
    recipe: Recipe = cfg  # type: ignore[assignment]  (structured config: typed attribute access)
    validate(recipe, source=str(path), base_dir=path.parent)
    return recipe


def _check(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise WaltError(f"{source}: {key}: {message}")


def validate(recipe: Recipe, *, source: str, base_dir: Path) -> None:
    """Checks that types alone cannot express. Paths are resolved against the working directory."""
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
    _check(d.shapes.max_objects >= 1, source, "data.shapes.max_objects", "must be >= 1")
    _check(d.shapes.num_items >= 1, source, "data.shapes.num_items", "must be >= 1")
    if d.source != "shapes":
        _check(d.path is not None, source, "data.path", f"is required for data.source={d.source}")
        want_dir = d.source == "folder"
        p = Path(d.path)
        _check(
            p.is_dir() if want_dir else p.is_file(),
            source,
            "data.path",
            f"{'folder' if want_dir else 'file'} not found: {d.path}",
        )
    if d.images is not None:
        _check(Path(d.images).exists(), source, "data.images", f"not found: {d.images}")
    if d.split_dir is not None:
        _check(
            Path(d.split_dir).is_dir(), source, "data.split_dir", f"folder not found: {d.split_dir}"
        )
    t = recipe.trainer
    _check(t.num_nodes >= 1, source, "trainer.num_nodes", "must be >= 1")
    _check(t.num_workers >= 0, source, "trainer.num_workers", "must be >= 0")
    _check(t.log_every >= 1, source, "trainer.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 1, source, "trainer.checkpoint_every", "must be >= 1")


def to_yaml(recipe: Recipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(recipe)


def save_recipe(recipe: Recipe) -> Path:
    """Write the resolved recipe to `<run_dir>/recipe.yaml` (the last command's view of it)."""
    out = Path(recipe.run_dir) / "recipe.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(recipe))
    return out
