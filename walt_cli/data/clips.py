"""K clips per video for `tokenize encode` (`data.clips_per_video`).

Encoding one centred, unflipped clip per video makes each clip of a small data set recur
thousands of times in base training (UCF-101: ~1,600 times over 60k steps of 256). The training
split is instead encoded as K clips per video, each at a random start and crop and flipped
horizontally with probability 1/2 (the augmentation of video diffusion training), drawn from a
generator seeded by (run seed, video, clip): the same K clips on every run and machine.
Validation keeps one centred clip per video.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch.utils.data import Dataset

from walt_cli.data.datasets import ClipDataset, JointDataset
from walt_cli.data.video import ClipTooShortError, VideoDecodeError
from walt_cli.errors import WaltError

log = logging.getLogger("walt.data")


class ClipsPerVideo(Dataset):
    """Item i = clip i % k of video i // k of `videos` (None where the file is unreadable)."""

    def __init__(self, videos: ClipDataset, k: int, seed: int) -> None:
        self.videos = videos
        self.spec = dataclasses.replace(videos.spec, random=True)  # random start and crop
        self.k, self.seed = int(k), int(seed)
        self.skipped = videos.skipped

    def __len__(self) -> int:
        return self.k * len(self.videos.entries)

    def __getitem__(self, index: int) -> dict | None:
        from walt_cli.systems.rng import rank_seed

        v, j = divmod(index, self.k)
        entry = self.videos.entries[v]
        if str(entry.path) in self.skipped:
            return None
        g = torch.Generator().manual_seed(rank_seed(self.seed, v, j))
        saved, self.videos.spec = self.videos.spec, self.spec
        try:
            item = self.videos.load(entry, g)
        except (VideoDecodeError, ClipTooShortError) as err:
            self.skipped[str(entry.path)] = str(err)
            log.warning("skipping %s", err)
            return None
        finally:
            self.videos.spec = saved
        flip = bool(torch.rand((), generator=g) < 0.5)
        if flip:
            item["video"] = item["video"].flip(-1)  # (C, T, H, W): mirror the width
        item["flip"] = flip
        return item


def clips_per_video(dataset: Dataset, k: int, seed: int) -> Dataset:
    """`dataset` (a training split) with K clips per video; unchanged for k = 1."""
    if k == 1:
        return dataset
    if isinstance(dataset, ClipDataset):
        return ClipsPerVideo(dataset, k, seed)
    if isinstance(dataset, JointDataset) and isinstance(dataset.videos, ClipDataset):
        return JointDataset(
            ClipsPerVideo(dataset.videos, k, seed), dataset.packs, dataset.image_ratio
        )
    raise WaltError(
        f"data.clips_per_video={k} takes clips from video files (data.source folder or "
        "manifest); this data set has none (shapes: raise data.shapes.num_items instead)"
    )
