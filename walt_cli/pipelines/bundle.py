"""Model bundles: what generation reads, from a run directory or an exported folder.

A bundle is a tokenizer, a base model and 0..N super-resolution stages (self-describing
safetensors files, EMA weights), the text-encoder spec, the latent statistics of each stage and
the sampling defaults, named by one small index file, `walt_bundle.json` (the idea of diffusers'
`model_index.json`: one JSON file that names the components; the format is walt's own):

    {
      "format": "walt-bundle", "format_version": 1, "walt_version": "0.1.0", "name": "shapes",
      "tokenizer": {"file": "tokenizer.safetensors", "sha256": "..."},
      "stages": [
        {"name": "base", "file": "base.safetensors", "sha256": "...", "resolution": [64, 64],
         "latent_stats": {"mean": [...], "std": [...], "tokenizer": "<16-hex hash>"}},
        {"name": "sr1", "file": "sr1.safetensors", "sha256": "...", "resolution": [128, 128],
         "factor": 2, "latent_stats": {...}, "lowres_latent_stats": {...}}
      ],
      "text_encoder": null | {"name": "minilm", "path": null, "max_length": 32, ..., "hash": "..."},
      "class_names": ["circle moving left", ...],
      "sample": {"steps": [50, 25], "guidance": [4.0, 2.0], "noise_level": [0.1], "fps": 8.0,
                 "frames": null}
    }

Files are relative to the index. Loading checks every file's sha256, that each stage's latent
statistics in the index are the ones in its file, and that every stage was trained on latents of
this tokenizer: a missing, corrupt or mismatched file is one line naming it. A run directory
(`runs/<name>`, with recipe.yaml, tokenizer/, base/, sr<N>/) reads as the same index, built in
memory from the files and the recipe; `export_bundle` writes it out.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walt_cli.errors import WaltError
from walt_cli.metrics.weights import sha256_file  # noqa: F401  (re-exported)

INDEX_FILE = "walt_bundle.json"
FORMAT = "walt-bundle"
FORMAT_VERSION = 1
DEFAULT_MODEL = "default"


def default_model_dir() -> Path:
    """Where the default model ships: package data `walt_cli/default_model/`."""
    return Path(__file__).resolve().parent.parent / "default_model"


@dataclass
class StageEntry:
    """One diffusion stage of a bundle: the base (index 0) or SR stage N."""

    name: str  # base | sr1 | sr2 ...
    file: Path
    sha256: str
    meta: dict[str, Any]  # the file's `extra` metadata (latent stats, factor, noise level, ...)


@dataclass
class BundleIndex:
    """A bundle's index, read from `walt_bundle.json` or built from a run directory."""

    root: Path
    name: str
    tokenizer: Path
    tokenizer_sha256: str
    stages: list[StageEntry]
    text_encoder: dict[str, Any] | None = None
    class_names: list[str] = field(default_factory=list)
    sample: dict[str, Any] = field(default_factory=dict)
    # The caption words the model was trained on, by category (shapes models: shapes_vocab);
    # empty where the training captions were open-ended (prompts are then not checked).
    vocabulary: dict[str, list[str]] = field(default_factory=dict)
    source: str = "bundle"  # bundle | run | default

    @property
    def hashes(self) -> dict[str, str]:
        """Short (16 hex) sha256 of each file, by component name: what sidecars record."""
        out = {"tokenizer": self.tokenizer_sha256[:16]}
        out.update({s.name: s.sha256[:16] for s in self.stages})
        return out

    def to_json(self) -> dict[str, Any]:
        from walt_cli import __version__

        stages = []
        for s in self.stages:
            entry = {"name": s.name, "file": s.file.name, "sha256": s.sha256}
            for key in ("resolution", "factor", "latent_stats", "lowres_latent_stats"):
                if key in s.meta:
                    entry[key] = s.meta[key]
            stages.append(entry)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "walt_version": __version__,
            "name": self.name,
            "tokenizer": {"file": self.tokenizer.name, "sha256": self.tokenizer_sha256},
            "stages": stages,
            "text_encoder": self.text_encoder,
            "class_names": list(self.class_names),
            "sample": dict(self.sample),
            "vocabulary": dict(self.vocabulary),
        }


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """(folder, kind) for `--model`: a run directory, an exported bundle, or "default"/None for
    the model shipped inside the package."""
    if model is None or str(model) == DEFAULT_MODEL:
        root = default_model_dir()
        if not (root / INDEX_FILE).is_file():
            raise WaltError(
                "the default model is not installed in this walt; pass --model RUN_DIR|BUNDLE"
            )
        return root, "default"
    root = Path(model)
    if not root.exists():
        raise WaltError(f"--model {root}: no such run directory or bundle")
    if root.is_file():
        if root.name == INDEX_FILE:
            return root.parent, "bundle"
        raise WaltError(f"--model {root}: give the run directory or bundle folder, not a file")
    if (root / INDEX_FILE).is_file():
        return root, "bundle"
    if (root / "base").is_dir() or (root / "recipe.yaml").is_file():
        return root, "run"
    raise WaltError(
        f"--model {root}: neither a bundle ({INDEX_FILE}) nor a run directory (base/, recipe.yaml)"
    )


def read_bundle(model: str | os.PathLike | None, *, verify: bool = True) -> BundleIndex:
    """The index of a bundle or run directory, with every file checked (see the module doc)."""
    root, kind = resolve_model(model)
    index = _read_index(root) if kind != "run" else _index_from_run(root)
    if kind == "default":
        index.source = "default"
    if verify:
        check_bundle(index)
    return index


def _read_index(root: Path) -> BundleIndex:
    path = root / INDEX_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WaltError(f"{path}: not a readable bundle index ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WaltError(f"{path}: not a walt bundle index (format is not {FORMAT!r})")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise WaltError(
            f"{path}: bundle format {data.get('format_version')} is newer than this walt reads "
            f"({FORMAT_VERSION}); upgrade walt"
        )
    try:
        tok = data["tokenizer"]
        stages = []
        for entry in data["stages"]:
            meta = {k: v for k, v in entry.items() if k not in ("name", "file", "sha256")}
            stages.append(
                StageEntry(entry["name"], root / entry["file"], str(entry["sha256"]), meta)
            )
        index = BundleIndex(
            root=root,
            name=str(data.get("name") or root.name),
            tokenizer=root / tok["file"],
            tokenizer_sha256=str(tok["sha256"]),
            stages=stages,
            text_encoder=data.get("text_encoder"),
            class_names=list(data.get("class_names") or []),
            sample=dict(data.get("sample") or {}),
            vocabulary={k: list(v) for k, v in (data.get("vocabulary") or {}).items()},
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise WaltError(f"{path}: bundle index is missing {err}") from None
    if not index.stages or index.stages[0].name != "base":
        raise WaltError(f"{path}: the first stage of a bundle must be 'base'")
    return index


def _recipe_dict(root: Path) -> dict[str, Any]:
    """The run's resolved recipe.yaml as plain data (read leniently: only a few keys are used)."""
    path = root / "recipe.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml errors
        raise WaltError(f"{path}: not valid YAML ({err})") from None
    return data if isinstance(data, dict) else {}


def _run_tokenizer(root: Path, recipe: dict[str, Any]) -> Path:
    """The tokenizer file a run decodes with: its fine-tuned decoder (decoder/, `walt tokenize
    train --decoder`) when there is one, else the recipe's `tokenizer.checkpoint` or the run's
    tokenizer/. A fine-tuned decoder names the file whose encoder it kept (`encoder_of`, the
    short sha256 latents are keyed by; a fine-tune of a fine-tune names the first file); one made
    from another tokenizer (one retrained since) is refused."""
    from walt_cli.data.latents import encoder_key

    tok_section = recipe.get("tokenizer") or {}
    tok = Path(tok_section.get("checkpoint") or root / "tokenizer" / "tokenizer.safetensors")
    if not tok.is_file():
        raise WaltError(f"{root}: run has no tokenizer weights ({tok} is missing)")
    tuned = root / "decoder" / "tokenizer.safetensors"
    if not tuned.is_file():
        return tok
    # `tok` may itself be a fine-tuned decoder (a bundle's tokenizer given as the checkpoint):
    # a fine-tune of it names the file that first encoded, as `tok` does.
    if _read_extra(tuned, "tokenizer").get("encoder_of") != encoder_key(tok):
        raise WaltError(
            f"{tuned}: its encoder is not the one of {tok} (the tokenizer changed after the "
            "decoder was fine-tuned); rerun `walt tokenize train --decoder` or remove "
            f"{tuned.parent}"
        )
    return tuned


def _index_from_run(root: Path) -> BundleIndex:
    """A run directory read as a bundle: tokenizer (decoder/tokenizer.safetensors, else the
    recipe's `tokenizer.checkpoint` or tokenizer/tokenizer.safetensors: `_run_tokenizer`),
    base/base.safetensors, sr1/sr1.safetensors, ..."""
    recipe = _recipe_dict(root)
    tok = _run_tokenizer(root, recipe)
    base = root / "base" / "base.safetensors"
    if not base.is_file():
        raise WaltError(f"{root}: run has no base model ({base} is missing; run walt train-base)")
    files = [("base", base)]
    n = 1
    while (root / f"sr{n}" / f"sr{n}.safetensors").is_file():
        files.append((f"sr{n}", root / f"sr{n}" / f"sr{n}.safetensors"))
        n += 1
    stages = [StageEntry(name, path, sha256_file(path), {}) for name, path in files]
    for s in stages:
        s.meta = _stage_meta(s)
    data = recipe.get("data") or {}
    class_names: list[str] = []
    vocabulary: dict[str, list[str]] = {}
    if data.get("source", "shapes") == "shapes":
        from walt_cli.data.shapes import class_names as shapes_classes
        from walt_cli.data.shapes_vocab import vocabulary as shapes_vocabulary

        class_names = shapes_classes()
        vocabulary = shapes_vocabulary()
    sample = dict(recipe.get("sample") or {})
    if sample.get("fps") is None:
        sample["fps"] = float(data.get("fps") or (data.get("shapes") or {}).get("fps") or 8.0)
    base_meta = stages[0].meta
    return BundleIndex(
        root=root,
        name=str(recipe.get("name") or root.name),
        tokenizer=tok,
        tokenizer_sha256=sha256_file(tok),
        stages=stages,
        text_encoder=base_meta.get("text_encoder"),
        class_names=class_names,
        sample=sample,
        vocabulary=vocabulary,
        source="run",
    )


def _read_extra(path: Path, kind: str = "walt-transformer") -> dict[str, Any]:
    """A weight file's extra metadata and its "config" (a stage's by default), header only."""
    from walt_cli.models.checkpoint import read_metadata

    config, extra = read_metadata(path, kind=kind)
    return {**extra, "config": config}


def _stage_meta(stage: StageEntry) -> dict[str, Any]:
    """Latent statistics, resolution, factor, noise level, ... of a stage file."""
    extra = _read_extra(stage.file)
    if "latent_stats" not in extra:
        raise WaltError(f"{stage.file}: carries no latent statistics (export it with walt)")
    return {k: v for k, v in extra.items() if k != "config"}


def check_bundle(index: BundleIndex) -> None:
    """Every file present with its recorded sha256; stats and tokenizer consistent; stages chain."""
    files = [("tokenizer", index.tokenizer, index.tokenizer_sha256)]
    files += [(s.name, s.file, s.sha256) for s in index.stages]
    for name, path, digest in files:
        if not path.is_file():
            raise WaltError(f"{index.root}: {name} file {path.name} is missing")
        if index.source != "run" and sha256_file(path) != digest:
            raise WaltError(
                f"{path}: sha256 does not match the bundle index (corrupt or replaced file)"
            )
    tok_hash = index.tokenizer_sha256[:16]
    # Latents are keyed by the tokenizer file that first encoded them; a decoder fine-tuned on
    # its frozen encoder (`walt tokenize train --decoder`) names that file and the fine-tunes in
    # between, any of which may have keyed latents (`encoder_keys`).
    from walt_cli.data.latents import encoder_keys

    encoders = encoder_keys(index.tokenizer)
    previous = None
    for s in index.stages:
        extra = _stage_meta(s)
        for key in ("latent_stats", "lowres_latent_stats"):
            if key in s.meta and s.meta[key] != extra.get(key):
                raise WaltError(
                    f"{s.file}: its {key} differ from the bundle index (mismatched file)"
                )
        s.meta = {**extra, **{k: v for k, v in s.meta.items() if k not in extra}}
        trained_on = (s.meta.get("latent_stats") or {}).get("tokenizer")
        if trained_on and trained_on not in encoders:
            raise WaltError(
                f"{s.file}: {s.name} was trained on latents of tokenizer {trained_on}, the "
                f"bundle's tokenizer is {tok_hash} (mismatched files)"
            )
        if s.name != "base":
            low = s.meta.get("lowres_resolution")
            if previous is not None and low is not None and list(low) != list(previous):
                raise WaltError(
                    f"{s.file}: {s.name} takes {low[0]}x{low[1]} input, the previous stage "
                    f"makes {previous[0]}x{previous[1]}"
                )
        previous = s.meta.get("resolution")


# ---------------------------------------------------------------------------------------------
# Writing


def export_bundle(model: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a standalone bundle from a run directory (or copy a bundle): the weight files
    (EMA weights, as the run exported them), their sha256 and the index. Written into a
    temporary folder beside `out` and renamed, so a failed export leaves nothing behind.
    `force`: replace an existing bundle at `out` (only a bundle: any other folder is refused)."""
    index = read_bundle(model)
    out = Path(out)
    replace = False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise WaltError(f"--out {out}: exists and is not empty (--force replaces a bundle)")
        if not (out / INDEX_FILE).is_file():
            raise WaltError(f"--out {out}: exists and is not a bundle; refusing to replace it")
        if Path(model).resolve() == out.resolve():
            raise WaltError(f"--out {out}: is the bundle being exported")
        replace = True
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise WaltError(f"--out {out}: {out.parent} is not writable")
    if index.stages[0].meta.get("resolution") is None:
        index.stages[0].meta["resolution"] = stage_resolution(index, 0)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        names = {"tokenizer": "tokenizer.safetensors"}
        shutil.copyfile(index.tokenizer, tmp / names["tokenizer"])
        for s in index.stages:
            shutil.copyfile(s.file, tmp / f"{s.name}.safetensors")
        exported = BundleIndex(
            root=out,
            name=index.name,
            tokenizer=out / names["tokenizer"],
            tokenizer_sha256=sha256_file(tmp / names["tokenizer"]),
            stages=[
                StageEntry(
                    s.name,
                    out / f"{s.name}.safetensors",
                    sha256_file(tmp / f"{s.name}.safetensors"),
                    s.meta,
                )
                for s in index.stages
            ],
            text_encoder=index.text_encoder,
            class_names=index.class_names,
            sample=index.sample,
            vocabulary=index.vocabulary,
        )
        (tmp / INDEX_FILE).write_text(json.dumps(exported.to_json(), indent=2) + "\n")
        if replace:  # the old bundle steps aside only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def stage_resolution(index: BundleIndex, i: int) -> list[int]:
    """Output pixels (H, W) of stage i: recorded for SR stages; for the base, its latent grid
    times the tokenizer's spatial factor."""
    s = index.stages[i]
    if s.meta.get("resolution"):
        return [int(v) for v in s.meta["resolution"]]
    extra = _read_extra(s.file)  # metadata only: no tensors are read
    lat_h, lat_w = extra["config"]["latent_size"][1:]
    from safetensors import safe_open

    with safe_open(str(index.tokenizer), framework="pt") as f:
        tok_config = json.loads((f.metadata() or {}).get("walt.config", "{}"))
    factor = 2 ** (len(tok_config.get("channel_multipliers", [1, 2, 2, 4])) - 1)
    return [lat_h * factor, lat_w * factor]
