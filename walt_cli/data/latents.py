"""Pre-extracted latents: what `walt tokenize encode` writes and the diffusion stages read.

Layout of `runs/<name>/latents/<split>/`:

    shard-00000.safetensors   `latents` (N, c, 1 + t, h, w) float32, optional `text` (N, L, D)
                              (or (N, T, L, D) with one caption per packed image) and `text_mask`,
                              optional `lowres` (N, c, 1 + t, h/f, w/f): an SR stage's input, the
                              same clip downsampled f x; metadata: the rows' index entries,
                              per-channel sums for the statistics, the tokenizer and text-encoder
                              hashes
    index.jsonl               one line per clip: shard, row, label, caption, source, start, frames
    stats.json                per-channel latent mean and std (and `lowres` ones), keyed by the
                              tokenizer's hash, and the text encoder that wrote the states

Shards are safetensors, so readers memory-map them (nothing is unpickled). A shard is written to
a temporary name and renamed when complete, so an interrupted run leaves only whole shards, and
a rerun skips every shard already written by the same tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from walt_cli.errors import WaltError

SHARD_GLOB = "shard-*.safetensors"


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    """Short sha256 of a file (the tokenizer checkpoint): what latents and stats are keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def encoder_key(path: str | os.PathLike) -> str:
    """The key of the latents a tokenizer file encodes: the file that first encoded them, which a
    fine-tuned decoder (`walt tokenize train --decoder`, its encoder frozen) names as
    `encoder_of`, else the file's own short sha256."""
    from walt_cli.models.checkpoint import read_metadata
    from walt_cli.models.tokenizer import CHECKPOINT_KIND

    _, extra = read_metadata(path, kind=CHECKPOINT_KIND)  # the header alone
    return extra.get("encoder_of") or file_hash(path)


def encoder_keys(path: str | os.PathLike) -> frozenset[str]:
    """Every key latents of this file's encoder may carry: its own short sha256, the file that
    first encoded them (`encoder_of`) and the fine-tuned decoders between the two
    (`encoder_files`), all of which share the frozen encoder. `walt tokenize encode` keys new
    latents by `encoder_key`; the others are accepted for latents (and stages trained on them)
    written before it did, when a fine-tuned decoder given as `tokenizer.checkpoint` keyed them
    by its own hash."""
    from walt_cli.models.checkpoint import read_metadata
    from walt_cli.models.tokenizer import CHECKPOINT_KIND

    _, extra = read_metadata(path, kind=CHECKPOINT_KIND)
    first = extra.get("encoder_of")
    keys = {file_hash(path), *extra.get("encoder_files", [])}
    return frozenset(keys | {first} if first else keys)


@dataclass(frozen=True)
class ShardInfo:
    rows: list[dict]
    tokenizer: str
    channel_sum: list[float]
    channel_sumsq: list[float]
    channel_count: int  # values per channel in the shard
    text_encoder: str | None = None  # hash of the encoder that wrote `text` (None: no text)
    lowres: ShardInfo | None = None  # the moments of the `lowres` latents (SR stages)


def channel_moments(latents: torch.Tensor, *, rows: list[dict], tokenizer: str) -> ShardInfo:
    """Per-channel sums of latents (N, c, t, h, w), the statistics' raw material (float64)."""
    per_channel = latents.detach().transpose(0, 1).reshape(latents.shape[1], -1).double().cpu()
    return ShardInfo(
        rows=rows,
        tokenizer=tokenizer,
        channel_sum=per_channel.sum(1).tolist(),
        channel_sumsq=per_channel.pow(2).sum(1).tolist(),
        channel_count=per_channel.shape[1],
    )


def write_shard(
    path: Path,
    latents: torch.Tensor,
    rows: list[dict],
    *,
    tokenizer: str,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    text_encoder: str | None = None,
    lowres: torch.Tensor | None = None,
) -> None:
    """Write one shard atomically. latents: (N, c, t, h, w); rows: one index entry per clip;
    text (N, [T,] L, D) + text_mask from the encoder whose hash is `text_encoder`; lowres
    (N, c, t, h/f, w/f) for an SR stage."""
    from safetensors.torch import save_file

    if latents.shape[0] != len(rows):
        raise ValueError(f"{len(rows)} rows for {latents.shape[0]} latents")
    z = latents.detach().float().cpu().contiguous()
    moments = channel_moments(z, rows=rows, tokenizer=tokenizer)
    meta = {
        "walt.rows": json.dumps(rows),
        "walt.tokenizer": tokenizer,
        "walt.channel_sum": json.dumps(moments.channel_sum),
        "walt.channel_sumsq": json.dumps(moments.channel_sumsq),
        "walt.channel_count": str(moments.channel_count),
    }
    tensors = {"latents": z}
    if text is not None:
        tensors["text"] = text.detach().float().cpu().contiguous()
        if text_mask is not None:
            tensors["text_mask"] = text_mask.detach().to(torch.bool).cpu().contiguous()
        if text_encoder is not None:
            meta["walt.text_encoder"] = text_encoder
    if lowres is not None:
        low = lowres.detach().float().cpu().contiguous()
        tensors["lowres"] = low
        m = channel_moments(low, rows=rows, tokenizer=tokenizer)
        meta["walt.lowres_moments"] = json.dumps([m.channel_sum, m.channel_sumsq, m.channel_count])
    from walt_cli.runio import atomic_path

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_shard_info(path: Path) -> ShardInfo:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise WaltError(f"{path}: not a readable latent shard ({err})") from None
    if "walt.rows" not in meta:
        raise WaltError(f"{path}: not a walt latent shard (no index in its metadata)")
    rows = json.loads(meta["walt.rows"])
    lowres = None
    if "walt.lowres_moments" in meta:
        low_sum, low_sumsq, low_count = json.loads(meta["walt.lowres_moments"])
        lowres = ShardInfo(rows, meta["walt.tokenizer"], low_sum, low_sumsq, int(low_count))
    return ShardInfo(
        rows=rows,
        tokenizer=meta["walt.tokenizer"],
        channel_sum=json.loads(meta["walt.channel_sum"]),
        channel_sumsq=json.loads(meta["walt.channel_sumsq"]),
        channel_count=int(meta["walt.channel_count"]),
        text_encoder=meta.get("walt.text_encoder"),
        lowres=lowres,
    )


def combine_stats(infos: Iterable[ShardInfo]) -> dict:
    """Per-channel mean and (population) std over every latent value of every shard, with the
    text encoder that wrote their states and, where the shards hold SR pairs, the statistics of
    the low-res latents (`lowres`)."""
    infos = list(infos)
    stats = _moments_to_stats(infos)
    encoders = {info.text_encoder for info in infos}
    if len(encoders) > 1:
        raise WaltError("shards hold text states of different encoders; re-encode")
    stats["text_encoder"] = encoders.pop() if encoders else None
    if infos and all(info.lowres is not None for info in infos):
        low = _moments_to_stats([info.lowres for info in infos])  # type: ignore[misc]
        stats["lowres"] = {"mean": low["mean"], "std": low["std"]}
    return stats


def _moments_to_stats(infos: list[ShardInfo]) -> dict:
    s = ss = None
    count = clips = 0
    tokenizers = set()
    for info in infos:
        a = torch.tensor(info.channel_sum, dtype=torch.float64)
        b = torch.tensor(info.channel_sumsq, dtype=torch.float64)
        s, ss = (a, b) if s is None else (s + a, ss + b)
        count += info.channel_count
        clips += len(info.rows)
        tokenizers.add(info.tokenizer)
    if s is None or count == 0:
        raise WaltError("no latents to measure statistics on")
    if len(tokenizers) != 1:
        raise WaltError(f"shards come from {len(tokenizers)} different tokenizers; re-encode")
    mean = s / count
    var = (ss / count - mean.pow(2)).clamp_min(0)
    return {
        "tokenizer": tokenizers.pop(),
        "mean": mean.tolist(),
        "std": var.sqrt().tolist(),
        "values_per_channel": count,
        "clips": clips,
    }


def write_latents(
    folder: Path,
    encode: Callable[[dict], torch.Tensor | dict[str, torch.Tensor]],
    batches: Callable[[int, int], Iterable[dict]],
    num_items: int,
    *,
    shard_size: int,
    tokenizer: str,
    text_encoder: str | None = None,
    lowres: bool = False,
    on_shard: Callable[[int, int, bool], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Encode a data set into shards, skipping shards already written by the same tokenizer
    and text encoder (and holding low-res pairs when `lowres`).

    encode(batch) -> latents (B, c, t, h, w), or a dict of `latents` and, as the shard format
    says, `text` + `text_mask` (written by the encoder with hash `text_encoder`) and `lowres`;
    batches(start, stop) yields collated batches of the items start..stop-1 (unreadable items
    already dropped; None for a batch with none left); on_shard(k, n_shards, skipped) reports
    each shard, on_batch(items) each encoded batch. Writes index.jsonl and stats.json at the end
    and returns the stats.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(num_items / shard_size)
    infos = []
    for k in range(n_shards):
        path = shard_path(folder, k)
        if path.is_file():
            info = read_shard_info(path)
            same = info.tokenizer == tokenizer and info.text_encoder == text_encoder
            if same and (info.lowres is not None) == lowres:
                infos.append(info)
                if on_shard:
                    on_shard(k, n_shards, True)
                continue
        start, stop = k * shard_size, min((k + 1) * shard_size, num_items)
        chunks, rows = [], []
        for batch in batches(start, stop):
            if batch is None:
                continue
            out = encode(batch)
            out = out if isinstance(out, dict) else {"latents": out}
            z = out["latents"]
            if on_batch:
                on_batch(z.shape[0])
            chunks.append(out)
            for i in range(z.shape[0]):
                label = batch["label"][i]
                rows.append(
                    {
                        "shard": k,
                        "row": len(rows),
                        "label": label.tolist() if label.ndim else int(label),
                        "caption": batch["caption"][i],
                        "source": batch["source"][i],
                        "start": int(batch["start"][i]),
                        "frames": int(batch["frames"][i])
                        if "frames" in batch
                        else int(batch["video"].shape[2]),
                        "is_image": bool(batch["is_image"][i]),
                        **({"flip": bool(batch["flip"][i])} if "flip" in batch else {}),
                    }
                )
        if not rows:
            continue  # every item of this shard was unreadable
        shapes = {tuple(c["latents"].shape[1:]) for c in chunks}
        if len(shapes) != 1:
            raise WaltError(
                f"clips of different latent shapes {sorted(shapes)} in one data set: give images "
                "through data.images (packed) rather than mixed with videos"
            )
        parts = {key: [c[key] for c in chunks] for key in chunks[0]}
        if "text" in parts:  # packs carry a caption per image: broadcast videos' to (T, L, D)
            frames = next(iter(shapes))[1]
            parts["text"], parts["text_mask"] = per_frame_text(
                parts["text"], parts["text_mask"], frames
            )
        write_shard(
            path,
            torch.cat(parts["latents"]),
            rows,
            tokenizer=tokenizer,
            text=torch.cat(parts["text"]) if "text" in parts else None,
            text_mask=torch.cat(parts["text_mask"]) if "text" in parts else None,
            text_encoder=text_encoder if "text" in parts else None,
            lowres=torch.cat(parts["lowres"]) if "lowres" in parts else None,
        )
        infos.append(read_shard_info(path))
        if on_shard:
            on_shard(k, n_shards, False)
    from walt_cli.runio import write_text

    index = "".join(json.dumps(row) + "\n" for info in infos for row in info.rows)
    write_text(folder / "index.jsonl", index)
    stats = combine_stats(infos)
    write_text(folder / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def per_frame_text(
    texts: list[torch.Tensor], masks: list[torch.Tensor], frames: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batches of text states (B, L, D) or (B, T, L, D) and their masks: unchanged when all
    have one ndim, else every (B, L, D) repeated to (B, T, L, D) so they concatenate."""
    if len({t.ndim for t in texts}) == 1:
        return texts, masks
    texts = [t if t.ndim == 4 else t[:, None].expand(-1, frames, -1, -1) for t in texts]
    masks = [m if m.ndim == 3 else m[:, None].expand(-1, frames, -1) for m in masks]
    return texts, masks


def load_stats(folder: Path, tokenizer: str | Collection[str] | None = None) -> dict:
    """stats.json of a latent folder; with `tokenizer` (a key, or the keys of one encoder:
    `encoder_keys`), check it belongs to that tokenizer."""
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise WaltError(f"{path}: no latent statistics; run `walt tokenize encode` first")
    from walt_cli.runio import load_error

    try:
        stats = json.loads(path.read_text())
        if not isinstance(stats, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, TypeError) as err:
        raise load_error(path, err, "latent statistics file") from None
    keys = {tokenizer} if isinstance(tokenizer, str) else set(tokenizer or ())
    if tokenizer is not None and stats.get("tokenizer") not in keys:
        want = " or ".join(sorted(keys))
        raise WaltError(
            f"{path}: measured with tokenizer {stats.get('tokenizer')}, not {want}; re-encode"
        )
    try:
        if not {"mean", "std", "tokenizer"} <= stats.keys():
            raise ValueError("no mean, std and tokenizer keys")
        if len(stats["mean"]) != len(stats["std"]) or not stats["mean"]:
            raise ValueError("mean and std of different lengths")
    except (ValueError, TypeError) as err:
        raise load_error(path, err, "latent statistics file") from None
    return stats


class LatentShards(Dataset):
    """The clips of a latent folder: dict(latent (c, t, h, w), label, caption, ..., text?).

    Shards are opened lazily and memory-mapped, one handle per shard per process.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "index.jsonl"
        if not index.is_file():
            raise WaltError(f"{self.folder}: no index.jsonl; run `walt tokenize encode` first")
        try:
            self.rows = [
                json.loads(line) for line in index.read_text().splitlines() if line.strip()
            ]
            for row in self.rows:
                int(row["shard"]), int(row["row"]), row["label"]  # noqa: B018 (checks the keys)
        except (OSError, ValueError, TypeError, KeyError) as err:
            from walt_cli.runio import load_error

            raise load_error(index, err, "latent index") from None
        if not self.rows:
            raise WaltError(f"{index}: empty")
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            path = shard_path(self.folder, k)
            try:
                self._handles[k] = safe_open(str(path), framework="pt")
            except Exception as err:  # missing, truncated or foreign file
                from walt_cli.runio import load_error

                raise load_error(path, err, "latent shard") from None
        return self._handles[k]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        shard = self._shard(row["shard"])
        item = dict(row)
        try:
            item["latent"] = shard.get_slice("latents")[row["row"]]
            keys = shard.keys()
            if "text" in keys:
                item["text"] = shard.get_slice("text")[row["row"]]
                item["text_mask"] = shard.get_slice("text_mask")[row["row"]]
            if "lowres" in keys:
                item["lowres"] = shard.get_slice("lowres")[row["row"]]
        except Exception as err:
            from walt_cli.runio import load_error

            path = shard_path(self.folder, row["shard"])
            raise load_error(path, err, f"latent shard (row {row['row']})") from None
        return item

    def __getstate__(self):  # handles are per process: workers reopen them
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
