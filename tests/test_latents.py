"""`walt tokenize encode` and walt_cli/data/latents.py: shards decode back to the clips, the
statistics match a direct computation, reruns skip finished shards, unreadable files are dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from walt_cli.config import load_recipe
from walt_cli.data.datasets import build_dataset
from walt_cli.data.latents import (
    LatentShards,
    combine_stats,
    file_hash,
    load_stats,
    read_shard_info,
    shard_path,
    write_shard,
)
from walt_cli.errors import WaltError
from walt_cli.models.tokenizer import CausalVideoTokenizer
from walt_cli.systems.encode import encode_batch, encode_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    return CausalVideoTokenizer.from_preset("tiny").save(tmp_path / "tok.safetensors")


def tiny(tmp_path: Path, weights: Path, *overrides: str):
    return load_recipe(
        TINY, [f"run_dir={tmp_path}/run", f"tokenizer.checkpoint={weights}", *overrides]
    )


def test_shards_decode_back_to_the_clips_and_stats_match(tmp_path: Path, weights: Path):
    recipe = tiny(tmp_path, weights)  # 8 shapes clips of 9x32x32, shards of 3
    summary = encode_dataset(recipe, split="train", progress=False)
    folder = Path(summary["folder"])
    assert folder == tmp_path / "run" / "latents" / "train"
    assert sorted(p.name for p in folder.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    assert summary["clips"] == 8 and summary["encoded"] == 8 and summary["skipped_shards"] == 0

    tok = CausalVideoTokenizer.from_checkpoint(weights)
    data = build_dataset(recipe.data, "train", augment=False)
    shards = LatentShards(folder)
    assert len(shards) == 8
    latents = []
    for i in range(8):
        item, clip = shards[i], data[i]
        assert (item["source"], item["label"], item["caption"]) == (
            clip["source"],
            clip["label"],
            clip["caption"],
        )
        assert (item["start"], item["frames"], item["is_image"]) == (clip["start"], 9, False)
        z = item["latent"]  # (8, 3, 4, 4)
        assert tuple(z.shape) == (8, 3, 4, 4)
        with torch.no_grad():
            direct = tok(clip["video"][None])[0]
            decoded = tok.decode(z[None])[0]
        # Decoding the stored latent is the tokenizer's own round trip of the clip.
        torch.testing.assert_close(decoded, direct, atol=1e-4, rtol=1e-4)
        latents.append(z)

    z = torch.stack(latents).double()  # (8, c, t, h, w)
    per_channel = z.transpose(0, 1).reshape(8, -1)
    stats = load_stats(folder, tokenizer=file_hash(weights))
    torch.testing.assert_close(
        torch.tensor(stats["mean"], dtype=torch.float64), per_channel.mean(1)
    )
    torch.testing.assert_close(
        torch.tensor(stats["std"], dtype=torch.float64), per_channel.std(1, unbiased=False)
    )
    assert stats["clips"] == 8 and stats["tokenizer"] == file_hash(weights)
    index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert [(r["shard"], r["row"]) for r in index] == [(k // 3, k % 3) for k in range(8)]


def test_rerun_skips_finished_shards_and_redoes_the_rest(tmp_path: Path, weights: Path):
    recipe = tiny(tmp_path, weights)
    first = encode_dataset(recipe, progress=False)
    folder = Path(first["folder"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    again = encode_dataset(recipe, progress=False)
    assert again["skipped_shards"] == 3 and again["encoded"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")} == mtimes
    assert again["stats"] == first["stats"]

    shard_path(folder, 1).unlink()  # an interrupted run: shard 1 never finished
    partial = encode_dataset(recipe, progress=False)
    assert partial["skipped_shards"] == 2 and partial["encoded"] == 3
    assert partial["stats"]["mean"] == pytest.approx(first["stats"]["mean"], abs=1e-6)

    torch.manual_seed(2)  # other weights at the same path: every shard is re-encoded
    CausalVideoTokenizer.from_preset("tiny").save(weights)
    redone = encode_dataset(recipe, progress=False)
    assert redone["skipped_shards"] == 0 and redone["encoded"] == 8
    assert redone["tokenizer"] == file_hash(weights) != first["tokenizer"]
    assert read_shard_info(shard_path(folder, 0)).tokenizer == redone["tokenizer"]


def test_a_fine_tuned_decoder_encodes_under_its_encoders_key(tmp_path: Path, weights: Path):
    """A decoder fine-tuned on the frozen encoder (`encoder_of`) encodes the same latents: they
    keep the first file's key, so its shards are reused and the stages trained on them fit."""
    first = encode_dataset(tiny(tmp_path, weights), progress=False)
    tok = CausalVideoTokenizer.from_checkpoint(weights)
    with torch.no_grad():
        next(tok.decoder.parameters()).add_(0.1)
    tuned = tok.save(tmp_path / "tuned.safetensors", extra={"encoder_of": file_hash(weights)})
    again = encode_dataset(tiny(tmp_path, tuned), progress=False)
    assert again["skipped_shards"] == 3 and again["encoded"] == 0
    assert again["tokenizer"] == first["tokenizer"] == file_hash(weights)
    folder = Path(first["folder"])
    assert load_stats(folder, tokenizer={file_hash(tuned), file_hash(weights)})["clips"] == 8
    with pytest.raises(WaltError, match=r"measured with tokenizer \w+, not a or b; re-encode"):
        load_stats(folder, tokenizer={"b", "a"})


def test_unreadable_files_are_dropped_not_duplicated(
    tmp_path: Path, weights: Path, videos_dir: Path
):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("mmaction2_test.avi", "decord_flipping_a_pancake.mkv"):
        (folder / name).symlink_to(videos_dir / name)
    (folder / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 100)
    recipe = tiny(
        tmp_path,
        weights,
        "data.source=folder",
        f"data.path={folder}",
        "data.val_fraction=0.0",
        "data.random_crop=true",
    )
    summary = encode_dataset(recipe, progress=False)
    assert summary["clips"] == 2 and summary["dropped_files"] == 1
    rows = LatentShards(summary["folder"]).rows
    assert sorted(Path(r["source"]).name for r in rows) == [
        "decord_flipping_a_pancake.mkv",
        "mmaction2_test.avi",
    ]
    # Deterministic (no random crop or start even with data.random_crop): a rerun elsewhere agrees.
    again = encode_dataset(
        load_recipe(
            TINY,
            [
                f"run_dir={tmp_path}/run2",
                f"tokenizer.checkpoint={weights}",
                "data.source=folder",
                f"data.path={folder}",
                "data.val_fraction=0.0",
                "data.random_crop=true",
            ],
        ),
        progress=False,
    )
    a, b = LatentShards(summary["folder"]), LatentShards(again["folder"])
    for i in range(2):
        torch.testing.assert_close(a[i]["latent"], b[i]["latent"])


def test_packed_images_are_encoded_one_by_one(weights: Path):
    tok = CausalVideoTokenizer.from_checkpoint(weights)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z = encode_batch(tok, video, torch.tensor([True, True]))  # two packs of 5 images
    assert tuple(z.shape) == (2, 8, 5, 2, 2)
    with torch.no_grad():
        one = tok.encode(video[1:2, :, 3:4])  # image 3 of pack 1, alone
    torch.testing.assert_close(z[1, :, 3:4], one[0], atol=1e-5, rtol=1e-5)
    zv = encode_batch(tok, video, torch.tensor([False, False]))  # as videos: 1 + 4/4 latents
    assert tuple(zv.shape) == (2, 8, 2, 2, 2)
    with pytest.raises(WaltError, match="mixes latent shapes"):
        encode_batch(tok, video, torch.tensor([True, False]))


def test_shard_helpers(tmp_path: Path):
    a, b = torch.randn(3, 8, 2, 2, 2), torch.randn(2, 8, 2, 2, 2) * 3 + 1
    rows = lambda n, k: [{"shard": k, "row": i, "label": -1} for i in range(n)]  # noqa: E731
    text = torch.randn(3, 7, 16)
    write_shard(
        tmp_path / "s0.safetensors",
        a,
        rows(3, 0),
        tokenizer="h1",
        text=text,
        text_mask=torch.ones(3, 7, dtype=torch.bool),
    )
    write_shard(tmp_path / "s1.safetensors", b, rows(2, 1), tokenizer="h1")
    stats = combine_stats([read_shard_info(tmp_path / f"s{k}.safetensors") for k in (0, 1)])
    flat = torch.cat([a, b]).double().transpose(0, 1).reshape(8, -1)
    assert stats["mean"] == pytest.approx(flat.mean(1).tolist(), abs=1e-9)
    assert stats["std"] == pytest.approx(flat.std(1, unbiased=False).tolist(), abs=1e-9)
    assert stats["clips"] == 5
    write_shard(tmp_path / "s2.safetensors", b, rows(2, 2), tokenizer="h2")
    with pytest.raises(WaltError, match="different tokenizers"):
        combine_stats([read_shard_info(tmp_path / f"s{k}.safetensors") for k in (0, 2)])
    with pytest.raises(ValueError):
        write_shard(tmp_path / "bad.safetensors", a, rows(2, 0), tokenizer="h1")
    # the text-embedding slot reads back row by row
    (tmp_path / "lat").mkdir()
    write_shard(
        shard_path(tmp_path / "lat", 0),
        a,
        rows(3, 0),
        tokenizer="h1",
        text=text,
        text_mask=torch.ones(3, 7, dtype=torch.bool),
    )
    (tmp_path / "lat" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(3, 0)))
    item = LatentShards(tmp_path / "lat")[2]
    torch.testing.assert_close(item["latent"], a[2])
    torch.testing.assert_close(item["text"], text[2])
    (tmp_path / "lat" / "stats.json").write_text(json.dumps({"tokenizer": "h1"}))
    with pytest.raises(WaltError, match="re-encode"):
        load_stats(tmp_path / "lat", tokenizer="other")


def test_cli_encode(cli, tmp_path: Path, weights: Path):
    result = cli("tokenize", "encode", TINY, f"run_dir={tmp_path}/run", "--no-progress")
    assert result.exit_code == 2
    assert "no tokenizer weights" in result.output and "walt tokenize train" in result.output
    result = cli(
        "tokenize",
        "encode",
        TINY,
        f"run_dir={tmp_path}/run",
        f"tokenizer.checkpoint={weights}",
        "--split",
        "val",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "clips/s" in result.output
    assert (tmp_path / "run" / "latents" / "val" / "stats.json").is_file()
    result = cli("tokenize", "encode", TINY, f"run_dir={tmp_path}/run", "--split", "test")
    assert result.exit_code == 2 and "--split 'test'" in result.output
