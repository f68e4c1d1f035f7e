"""Text adherence on `shapes`: read the main object's colour, shape and direction from pixels.

The probe sees only uint8 frames (T, H, W, 3), never the scene that made them:

1. background: the median of the border pixels (all frames); its name is the nearest palette
   background (shapes.BACKGROUNDS);
2. main object: per frame, the largest 8-connected region of pixels more than `FOREGROUND_DISTANCE`
   (RGB) away from the background;
3. colour: the median of the quarter of that region's pixels farthest from the background (its
   antialiased or blurred edges are mixtures with the background), named by the nearest palette
   colour (shapes.COLOURS);
4. outline: the pixels of (or next to) that region at least half-way from the background to
   that colour along the line between them (the coverage of an antialiased edge), so that the
   outline does not depend on the contrast;
5. shape: the silhouette seen from its centroid at the scale sqrt(area), resampled on a 24 x 24
   grid and averaged over frames, compared with one mean silhouette per shape (nearest centroid).
   The mean silhouettes are fitted at the clip's resolution on rendered TRAINING scenes (seed 0,
   held-out triples excluded), never on model outputs;
6. direction: a least-squares line through the centroid track; the 8-way direction nearest its
   displacement over the clip, or "static" where it moves less than `MIN_TRAVEL` frame heights.

`score(video, caption)` compares the reading with the first object the caption names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from walt_cli.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    render,
    sample_scene,
)
from walt_cli.data.video import tensor_to_frames
from walt_cli.errors import WaltError

ATTRIBUTES = ("colour", "shape", "direction", "background")
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background; drawn colours are >= 110 away
MIN_TRAVEL = 0.05  # frame heights over the clip; the slowest object travels 0.25
GRID = 24  # silhouette samples per side
EXTENT = 1.0  # the silhouette grid spans +-EXTENT * sqrt(area) around the centroid
FIT_SEED = 0  # training scenes the shape templates are fitted on
FIT_PER_SHAPE = 16  # training clips per shape
FIT_FRAMES = 5  # frames per training clip


@dataclass(frozen=True)
class Attributes:
    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class Reading(Attributes):
    """What the probe read, with the measurements behind it."""

    travel: float = 0.0  # centroid displacement over the clip, in frame heights
    area: float = 0.0  # mean object area, in pixels


def _alternatives(words) -> str:
    # Longest first, so that "up-left" wins over "up" and "left".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT = re.compile(
    rf"\b({_alternatives(COLOURS)})\s+({_alternatives(SHAPES)})\s+moving\s+"
    rf"({_alternatives(DIRECTIONS)})\b"
)
_BACKGROUND = re.compile(rf"\bon an? ({_alternatives(BACKGROUNDS)}) background\b")


def parse_caption(caption: str) -> Attributes:
    """The first object a shapes caption names: "a small red circle moving left slowly ... on a
    gray background" -> Attributes("red", "circle", "left", "gray")."""
    text = caption.lower()
    m = _OBJECT.search(text)
    if m is None:
        raise WaltError(
            f"caption {caption!r} names no '<colour> <shape> moving <direction>' "
            "of the shapes vocabulary"
        )
    bg = _BACKGROUND.search(text)
    return Attributes(m[1], m[2], m[3], bg[1] if bg else None)


SWAP_VOCABULARY = {  # the words `swap_attribute` cycles through, in order
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "direction": list(DIRECTIONS),
    "background": list(BACKGROUNDS),
}


def swap_attribute(caption: str, attribute: str) -> str:
    """The caption with one attribute of its first object (or its background) replaced by the
    next word of that vocabulary, cyclically: "a red circle moving left ..." -> colour ->
    "a green circle moving left ...". The article before a changed word follows it (a / an).
    What a text-sensitivity probe feeds a model in place of the true caption."""
    if attribute not in SWAP_VOCABULARY:
        raise WaltError(f"attribute must be one of {sorted(SWAP_VOCABULARY)}, got {attribute!r}")
    if attribute == "background":
        m, group = _BACKGROUND.search(caption.lower()), 1
    else:
        m, group = (
            _OBJECT.search(caption.lower()),
            ("colour", "shape", "direction").index(attribute),
        )
        group += 1
    if m is None:
        raise WaltError(f"caption {caption!r} names no {attribute} of the shapes vocabulary")
    words = SWAP_VOCABULARY[attribute]
    new = words[(words.index(m[group]) + 1) % len(words)]
    start, end = m.span(group)
    head = caption[:start]
    # "a orange" -> "an orange": the article right before the replaced word (none in between).
    article = re.search(r"\b(an?) $", head, flags=re.IGNORECASE)
    if article is not None:
        head = head[: article.start(1)] + ("an" if new[0] in "aeiou" else "a") + " "
    return head + new + caption[end:]


def _nearest(value: torch.Tensor, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names], dtype=torch.float32)
    return names[int((ref - value).norm(dim=1).argmin())]


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """The maximum over each pixel's 3x3 neighbourhood of (T, H, W), as two separable passes of
    shifted maxima (an order of magnitude faster than max_pool2d on a CPU)."""
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _largest_region(mask: torch.Tensor) -> torch.Tensor:
    """Per frame, the largest 8-connected region of a (T, H, W) bool mask.

    Connected components by label propagation (every pixel takes the largest label in its 3x3
    neighbourhood until nothing changes), so that the probe needs torch alone, not scipy."""
    t, h, w = mask.shape
    # float labels are exact integers up to 2**24 (float64 beyond)
    dtype = torch.float32 if t * h * w < 2**24 else torch.float64
    fg = mask.to(dtype)
    labels = torch.arange(1, t * h * w + 1, dtype=dtype).view(t, h, w) * fg
    while True:
        grown = labels
        for _ in range(4):  # a few steps per convergence check: the check costs as much as one
            grown = _max3x3(grown) * fg
        if torch.equal(grown, labels):
            break
        labels = grown
    out = torch.zeros_like(mask)
    for k in range(t):
        ids, counts = labels[k][mask[k]].unique(return_counts=True)
        if len(ids):
            out[k] = labels[k] == ids[counts.argmax()]
    return out


def _centroids(mask: torch.Tensor) -> torch.Tensor:
    """(K, 2): the (x, y) centroid of each frame of a (K, H, W) mask, in pixels."""
    _, h, w = mask.shape
    m = mask.float()
    area = m.flatten(1).sum(1)
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    return torch.stack([(m.sum(1) * xs).sum(1) / area, (m.sum(2) * ys).sum(1) / area], dim=1)


def _silhouette(mask: torch.Tensor) -> torch.Tensor | None:
    """(GRID, GRID): the mask around its centroid at scale sqrt(area), averaged over frames."""
    _, h, w = mask.shape
    area = mask.flatten(1).sum(1).float()  # (T,)
    keep = area >= 4
    if not bool(keep.any()):
        return None
    m = mask[keep].float()  # (K, H, W)
    cx, cy = _centroids(mask[keep]).unbind(1)  # (K,) each
    a = area[keep]
    u = torch.linspace(-EXTENT, EXTENT, GRID)
    scale = a.sqrt()[:, None]
    px = cx[:, None] + scale * u  # (K, GRID) pixel coordinates
    py = cy[:, None] + scale * u
    # grid_sample wants [-1, 1] over the image's outer edges (align_corners=False).
    gx = (px / w * 2 - 1)[:, None, :].expand(-1, GRID, -1)
    gy = (py / h * 2 - 1)[:, :, None].expand(-1, -1, GRID)
    grid = torch.stack([gx, gy], dim=-1)  # (K, GRID, GRID, 2)
    sampled = F.grid_sample(m[:, None], grid, mode="bilinear", align_corners=False)
    return sampled[:, 0].mean(0)


def _as_frames(video) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(video.cpu() if isinstance(video, torch.Tensor) else video))
    if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise WaltError(f"the probe reads uint8 video (T, H, W, 3), got {v.dtype} {tuple(v.shape)}")
    return v.float()


def _measure(video) -> tuple[Reading, torch.Tensor | None]:
    frames = _as_frames(video)  # (T, H, W, 3)
    t, h, w, _ = frames.shape
    border = torch.cat(
        [frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], dim=1
    ).reshape(-1, 3)
    bg = border.median(dim=0).values  # (3,)
    background = _nearest(bg, BACKGROUNDS)
    offset = frames - bg  # (T, H, W, 3)
    region = _largest_region((offset * offset).sum(-1) > FOREGROUND_DISTANCE**2)  # (T, H, W)
    if not bool(region.any()):
        return Reading(background=background), None
    # The object's own colour sits where it stands out most from the background: the median of
    # the quarter of its pixels farthest from it (antialiased or blurred edges are mixtures).
    far = (offset * offset).sum(-1)[region]  # (N,)
    pixels = frames[region][far >= far.quantile(0.75)]  # (N / 4, 3)
    fill = pixels.median(dim=0).values
    colour = _nearest(fill, COLOURS)
    # Coverage of each pixel along the line background -> fill: the antialiasing model of render.
    axis = fill - bg
    coverage = (offset @ axis) / axis.dot(axis).clamp_min(1.0)  # (T, H, W)
    near = _max3x3(region.float()) > 0
    obj = (coverage >= 0.5) & near  # (T, H, W): the region's pixels at least half covered
    area = obj.flatten(1).sum(1).float()  # (T,)
    present = area > 0
    silhouette = _silhouette(obj)
    direction, travel = None, 0.0
    if int(present.sum()) >= 2:
        track = _centroids(obj[present])  # (K, 2)
        time = torch.arange(t, dtype=torch.float32)[present]
        tc = time - time.mean()
        slope = (tc[:, None] * (track - track.mean(0))).sum(0) / tc.square().sum()  # px / frame
        move = slope * (t - 1) / h  # (2,): displacement over the clip, in frame heights
        travel = float(move.norm())
        direction = "static" if travel < MIN_TRAVEL else nearest_direction(move)
    reading = Reading(colour, None, direction, background, travel, float(area[present].mean()))
    return reading, silhouette


def nearest_direction(move: torch.Tensor) -> str:
    """The caption direction closest in angle to a displacement (2,): (x right, y down)."""
    units = torch.tensor(list(DIRECTIONS.values()), dtype=move.dtype)  # (8, 2)
    return list(DIRECTIONS)[int((units @ move).argmax())]


def read_video(video) -> Reading:
    """What a shapes clip shows: uint8 (T, H, W, 3) -> colour, shape, direction, background."""
    reading, silhouette = _measure(video)
    if silhouette is None:
        return reading
    _, h, w, _ = np.shape(video)
    templates = shape_templates(h, w)  # (S, GRID, GRID)
    shape = SHAPES[int((templates - silhouette).flatten(1).norm(dim=1).argmin())]
    return dataclasses.replace(reading, shape=shape)


@functools.lru_cache(maxsize=8)
def shape_templates(height: int, width: int) -> torch.Tensor:
    """(len(SHAPES), GRID, GRID): the mean silhouette of each shape in rendered training clips
    (one object, held-out triples excluded) at this resolution."""
    got: dict[str, list[torch.Tensor]] = {s: [] for s in SHAPES}
    index = 0
    while min(len(v) for v in got.values()) < FIT_PER_SHAPE:
        scene = sample_scene(
            FIT_SEED, index, max_objects=1, aspect=width / height, exclude=frozenset(HELD_OUT)
        )
        index += 1
        shape = scene.objects[0].shape
        if len(got[shape]) >= FIT_PER_SHAPE:
            continue
        _, silhouette = _measure(tensor_to_frames(render(scene, FIT_FRAMES, height, width)))
        if silhouette is not None:
            got[shape].append(silhouette)
    return torch.stack([torch.stack(got[s]).mean(0) for s in SHAPES])


def score(video, caption: str) -> dict[str, bool]:
    """Per attribute: does the clip show what the caption's first object asks for? (A caption
    without a background scores the background as correct.)"""
    want = parse_caption(caption)
    got = read_video(video)
    return {
        a: getattr(got, a) == getattr(want, a) or (a == "background" and want.background is None)
        for a in ATTRIBUTES
    }


def score_batch(videos, captions: Sequence[str]) -> list[dict[str, bool]]:
    """`score` for each of uint8 (B, T, H, W, 3) and B captions."""
    if len(videos) != len(captions):
        raise WaltError(f"{len(videos)} videos but {len(captions)} captions")
    return [score(v, c) for v, c in zip(videos, captions, strict=True)]


def accuracy(scores: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Share of clips correct per attribute."""
    if not scores:
        raise WaltError("no scores to average")
    return {a: sum(s[a] for s in scores) / len(scores) for a in ATTRIBUTES}


__all__ = [
    "ATTRIBUTES",
    "Attributes",
    "Reading",
    "accuracy",
    "parse_caption",
    "read_video",
    "score",
    "score_batch",
    "shape_templates",
]
