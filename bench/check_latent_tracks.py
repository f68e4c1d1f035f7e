"""Do the cached latents of a shapes run move the way their captions say? A data check for the
base stage's text conditioning: a direction word the base cannot learn might be a caption that
does not match its clip.

    python bench/check_latent_tracks.py ~/.cache/walt/runs/shapes/latents/train --num 1500

For each one-object clip among the first --num rows of the shards (`walt tokenize encode`), the
main object is read in latent space alone: per latent frame, the cells whose distance from the
clip's background (the per-channel median over the frame) is at least a third of the frame's
largest, weighted by that distance; their centroid's displacement from the first latent frame
to the last is given the nearest of the eight caption directions. Prints the share read as the
caption says and the confusion per direction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def track_direction(z) -> str:
    """The caption direction nearest the main object's track in one clip's latents (c, t, h, w)."""
    import torch

    from walt_cli.metrics.adherence import nearest_direction

    background = z.flatten(2).median(-1).values[:, :, None, None]  # (c, t, 1, 1)
    dist = (z - background).pow(2).sum(0)  # (t, h, w)
    dist = dist * (dist >= dist.amax(dim=(1, 2), keepdim=True) / 3)
    _, h, w = dist.shape
    mass = dist.sum((1, 2))  # (t,)
    x = (dist * torch.arange(w, dtype=dist.dtype)).sum((1, 2)) / mass
    y = (dist * torch.arange(h, dtype=dist.dtype)[:, None]).sum((1, 2)) / mass
    return nearest_direction(torch.stack([x[-1] - x[0], y[-1] - y[0]]))  # image axes, y down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("latents", type=Path, help="a latent split folder (shards + index.jsonl)")
    ap.add_argument("--num", type=int, default=1500, help="rows of the index to look at")
    args = ap.parse_args()
    from walt_cli.data.latents import LatentShards
    from walt_cli.data.shapes_vocab import DIRECTIONS
    from walt_cli.metrics.adherence import parse_caption

    shards = LatentShards(args.latents)
    rows = shards.rows[: args.num]
    confusion: dict[str, dict[str, int]] = {d: {} for d in DIRECTIONS}
    for i, row in enumerate(rows):
        caption = row.get("caption") or ""
        if not caption or " and " in caption:
            continue  # no caption, or two objects
        said = parse_caption(caption).direction
        read = track_direction(shards[i]["latent"].float())
        confusion[said][read] = confusion[said].get(read, 0) + 1
    n = sum(sum(c.values()) for c in confusion.values())
    if n == 0:
        sys.exit(f"no one-object captioned clips in the first {len(rows)} rows of {args.latents}")
    right = sum(c.get(d, 0) for d, c in confusion.items())
    print(
        f"| one-object clips | track goes the caption's way |\n| ---: | ---: |\n| {n} | {right / n:.1%} |"
    )
    print("\n| caption says | read from the latents |\n| --- | --- |")
    for d, c in confusion.items():
        print(
            f"| {d} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
            + " |"
        )


if __name__ == "__main__":
    main()
