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

Then the scale of `bench/probe_text_sensitivity.py`'s gaps at t = 1: how much an ideal
prediction of the clean latent from the caption alone (what the base stage must output at t = 1
under zero terminal SNR, where the v-loss is the x0-loss) would lose when one word is swapped.
The ideal is approximated by a least-squares fit of the latents (normalised by the split's
stats.json, as the base stage sees them) on one-hot words: colour, shape, direction,
background, speed and size, each an additive effect. The gap of a word is the mean of
|effect(swapped word) - effect(word)|^2 over the clips, as a share of the fit's residual loss,
both cross-fitted on two halves of the clips (`ideal_gaps`). The swapped word is the
vocabulary's next, as in the probe (`metrics.adherence.SWAP_VOCABULARY`). A base stage that has learnt a word's main effect shows at least about this
gap in the probe.
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
    import numpy as np
    import torch

    from walt_cli.data.latents import LatentShards, load_stats
    from walt_cli.data.shapes_vocab import DIRECTIONS, SIZES, SPEEDS
    from walt_cli.metrics.adherence import SWAP_VOCABULARY, parse_caption

    shards = LatentShards(args.latents)
    stats = load_stats(args.latents)  # the base stage sees normalised latents
    mean, std = (
        torch.tensor(stats[k], dtype=torch.float64).view(-1, 1, 1, 1) for k in ("mean", "std")
    )
    rows = shards.rows[: args.num]
    confusion: dict[str, dict[str, int]] = {d: {} for d in DIRECTIONS}
    flat, words = [], []
    for i, row in enumerate(rows):
        caption = row.get("caption") or ""
        if not caption or " and " in caption or row.get("is_image"):
            continue  # no caption, two objects, or an image
        z = shards[i]["latent"].double()
        said = parse_caption(caption).direction
        read = track_direction(z)
        confusion[said][read] = confusion[said].get(read, 0) + 1
        flat.append(((z - mean) / std).flatten().numpy())
        words.append(_words(caption))
    n = len(words)
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

    vocab = {**SWAP_VOCABULARY, "speed": list(SPEEDS), "size": list(SIZES)}  # "" is medium
    gaps = ideal_gaps(np.stack(flat), words, vocab)
    print(
        f"\n| word swapped | an ideal t = 1 prediction's loss gap (additive fit, {n} clips, "
        "normalised latents) |\n| --- | ---: |"
    )
    for a in SWAP_VOCABULARY:
        print(f"| {a} | {gaps[a]:+.1%} |")


def ideal_gaps(latents, words: list[dict[str, str]], vocab: dict[str, list[str]]) -> dict:
    """The relative loss gap of an additive caption-to-latent fit when one word is swapped (see
    the module docstring): latents (N, D) float64 numpy, words[i] the i-th clip's word per
    attribute of `vocab`. Returns {attribute: gap} for every attribute of `vocab`.

    Cross-fitted so that noise does not inflate the gaps: the words' effects are fitted on two
    disjoint halves A and B, a squared effect difference |d|^2 is estimated by d_A . d_B
    (unbiased, where |d_A|^2 would add both fits' noise), and the residual loss is each half's
    error under the other half's fit."""
    import numpy as np

    columns = [(a, w) for a in vocab for w in vocab[a]]
    onehot = np.array([[1.0] + [float(c[a] == w) for a, w in columns] for c in words])
    order = np.random.default_rng(0).permutation(len(words))
    halves = order[: len(order) // 2], order[len(order) // 2 :]
    coefs = [np.linalg.lstsq(onehot[h], latents[h], rcond=None)[0] for h in halves]
    residual = np.mean(
        [
            ((latents[h] - onehot[h] @ c) ** 2).sum(1).mean()
            for h, c in zip(halves, coefs[::-1], strict=True)
        ]
    )
    effects = [{col: c[1 + j] for j, col in enumerate(columns)} for c in coefs]
    gaps = {}
    for a, options in vocab.items():
        lost = []
        for clip in words:
            pair = (a, clip[a]), (a, options[(options.index(clip[a]) + 1) % len(options)])
            d_a, d_b = (e[pair[1]] - e[pair[0]] for e in effects)
            lost.append(float(d_a @ d_b))
        gaps[a] = float(np.mean(lost) / residual)
    return gaps


def _words(caption: str) -> dict[str, str]:
    """Every word of a one-object shapes caption the additive fit uses ("" for medium size)."""
    from walt_cli.data.shapes_vocab import SIZES, SPEEDS
    from walt_cli.metrics.adherence import parse_caption

    first = parse_caption(caption)
    text = f" {caption.lower()} "
    return {
        "colour": first.colour,
        "shape": first.shape,
        "direction": first.direction,
        "background": first.background,
        "speed": next(w for w in SPEEDS if f" {w} " in text),
        "size": next((w for w in SIZES if w and f" {w} " in text), ""),
    }


if __name__ == "__main__":
    main()
