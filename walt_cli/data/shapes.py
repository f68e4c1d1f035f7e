"""`shapes`: a procedural data set of captioned videos of coloured shapes moving over backgrounds.

It is the embedded default data set: demos and CPU training need no download. Each item is a
pure function of (seed, index), so item i is the same video on every machine and every epoch.
Captions name what is drawn, object by object:

    "a small red circle moving left slowly and a blue square moving up quickly on a gray background"

which makes it a fair test of text conditioning: colour, shape, size, direction, speed, count and
background all vary and all appear in the caption. Class labels (for class-conditional recipes)
are (shape, direction) of the first object: `len(SHAPES) * len(DIRECTIONS)` classes.

Held-out combinations: `HELD_OUT` is a fixed set of 40 (colour, shape, direction) triples that
a model trained with `data.shapes.holdout: true` never sees on any object (`combinations="seen"`
redraws such an object), and that `combinations="heldout"` shows alone, one object per scene: a
test of compositional text conditioning (walt_cli/metrics/adherence.py reads them back).

Shapes are rasterised analytically with one-pixel antialiasing: coverage is the clamped signed
distance to the shape's edges (exact for the circle, the half-plane distance for polygons).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from walt_cli.data.shapes_vocab import (  # noqa: F401  (re-exported: the caption tables)
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
)
from walt_cli.errors import WaltError

_MIN_CONTRAST = 110.0  # RGB distance between an object and its background


def _held_out_triples() -> tuple[tuple[str, str, str], ...]:
    """One held-out direction per (colour, shape) pair: colour i, shape j -> direction (3i + j) % 8.

    40 of the 8 x 5 x 8 = 320 triples (12.5%). Every pair of attributes still appears in
    training: a (colour, shape) pair loses one of its 8 directions, a (shape, direction) pair one
    of its 8 colours (3 is invertible mod 8, so each colour exactly once) and a (colour, direction)
    pair at most one of its 5 shapes. So a model must compose what it saw apart to draw these.
    """
    dirs = list(DIRECTIONS)
    return tuple(
        (colour, shape, dirs[(3 * i + j) % len(dirs)])
        for i, colour in enumerate(COLOURS)
        for j, shape in enumerate(SHAPES)
    )


HELD_OUT = _held_out_triples()
_HELD_OUT_SET = frozenset(HELD_OUT)
COMBINATIONS = ("all", "seen", "heldout")  # ShapesDataset(combinations=...): see the module doc


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    start: tuple[float, float]  # centre at frame 0 (x, y), in frame heights
    step: float  # distance moved per frame, in frame heights


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ShapeSpec, ...]
    background: str

    @property
    def caption(self) -> str:
        parts = []
        for o in self.objects:
            noun = " ".join(w for w in (o.size, o.colour, o.shape) if w)
            article = "an" if noun[0] in "aeiou" else "a"
            parts.append(f"{article} {noun} moving {o.direction} {o.speed}")
        return " and ".join(parts) + f" on a {self.background} background"

    @property
    def label(self) -> int:
        return class_index(self.objects[0].shape, self.objects[0].direction)


def class_index(shape: str, direction: str) -> int:
    return SHAPES.index(shape) * len(DIRECTIONS) + list(DIRECTIONS).index(direction)


def class_names() -> list[str]:
    return [f"{s} moving {d}" for s in SHAPES for d in DIRECTIONS]


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b)))


def _contrasting(background: str) -> list[str]:
    """The colours that stand out enough from a background to be drawn on it."""
    bg = BACKGROUNDS[background]
    return [c for c in COLOURS if _contrast(COLOURS[c], bg) >= _MIN_CONTRAST]


def _place(
    rng: np.random.Generator, size: str, direction: str, speed: str, aspect: float
) -> tuple[tuple[float, float], float]:
    """Start (x, y) and per-frame step so that the whole 17-frame path stays inside the frame
    (longer clips may leave it). Where the named speed cannot fit, the object moves as fast as
    fits."""
    r = SIZES[size]
    dx, dy = DIRECTIONS[direction]
    room = [
        (aspect - 2 * r) / abs(dx) if dx else math.inf,
        (1 - 2 * r) / abs(dy) if dy else math.inf,
    ]
    travel = min(SPEEDS[speed], *room)
    x0 = float(rng.uniform(r - min(dx, 0) * travel, aspect - r - max(dx, 0) * travel))
    y0 = float(rng.uniform(r - min(dy, 0) * travel, 1 - r - max(dy, 0) * travel))
    return (x0, y0), travel / 16


def sample_scene(
    seed: int,
    index: int,
    *,
    max_objects: int = 2,
    aspect: float = 1.0,
    exclude: frozenset[tuple[str, str, str]] | set = frozenset(),
) -> SceneSpec:
    """The scene of item `index`: a pure function of (seed, index).

    An object whose (colour, shape, direction) is in `exclude` is drawn again from the same
    random stream until it is not; with nothing excluded the scene is the one it always was."""
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, max_objects + 1))
    colours = _contrasting(background)
    objects = []
    for _ in range(n):
        while True:
            shape = str(rng.choice(SHAPES))
            colour = str(rng.choice(colours))
            size = str(rng.choice(list(SIZES)))
            direction = str(rng.choice(list(DIRECTIONS)))
            speed = str(rng.choice(list(SPEEDS)))
            if (colour, shape, direction) not in exclude:
                break
        start, step = _place(rng, size, direction, speed, aspect)
        objects.append(ShapeSpec(shape, colour, size, direction, speed, start, step))
    return SceneSpec(tuple(objects), background)


def sample_heldout_scene(seed: int, index: int, *, aspect: float = 1.0) -> SceneSpec:
    """One object whose (colour, shape, direction) is held-out triple `index % 40`, so that every
    40 consecutive items show each triple once; background, size, speed and path are drawn from
    (seed, index) as in training."""
    colour, shape, direction = HELD_OUT[index % len(HELD_OUT)]
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice([b for b in BACKGROUNDS if colour in _contrasting(b)]))
    size = str(rng.choice(list(SIZES)))
    speed = str(rng.choice(list(SPEEDS)))
    start, step = _place(rng, size, direction, speed, aspect)
    return SceneSpec((ShapeSpec(shape, colour, size, direction, speed, start, step),), background)


def _coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Antialiased coverage in [0, 1] of a shape of radius r (pixels) centred at the origin."""
    if shape == "circle":
        sd = r - torch.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        s = r * 0.85
        sd = s - torch.maximum(dx.abs(), dy.abs())
    elif shape == "diamond":
        sd = (r - (dx.abs() + dy.abs())) * math.sqrt(0.5)
    elif shape == "triangle":
        # Equilateral, pointing up, circumradius r: inradius r/2 and outward edge normals
        # (0, 1), (+sqrt(3)/2, -1/2), (-sqrt(3)/2, -1/2); inside distance = inradius - n.p.
        c = math.sqrt(0.75)
        sd = torch.minimum(
            r / 2 - dy, torch.minimum(r / 2 - (c * dx - 0.5 * dy), r / 2 - (-c * dx - 0.5 * dy))
        )
    elif shape == "cross":
        arm, half = r, r * 0.33
        bar_h = torch.minimum(arm - dx.abs(), half - dy.abs())
        bar_v = torch.minimum(half - dx.abs(), arm - dy.abs())
        sd = torch.maximum(bar_h, bar_v)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (sd + 0.5).clamp(0.0, 1.0)


def render(scene: SceneSpec, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Draw a scene as float (3, T, H, W) in [-1, 1]."""
    side = float(height)  # unit length: the frame height (x runs to width / height)
    ys = torch.arange(height, dtype=torch.float32).view(height, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, width) + 0.5
    bg = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32).view(3, 1, 1)
    video = bg.expand(3, height, width).repeat(num_frames, 1, 1, 1)  # (T, 3, H, W)
    for o in scene.objects:
        colour = torch.tensor(COLOURS[o.colour], dtype=torch.float32).view(3, 1, 1)
        ux, uy = DIRECTIONS[o.direction]
        r = SIZES[o.size] * side
        for t in range(num_frames):
            cx = (o.start[0] + ux * o.step * t) * side
            cy = (o.start[1] + uy * o.step * t) * side
            a = _coverage(o.shape, xs - cx, ys - cy, r)  # (H, W)
            video[t] = video[t] * (1 - a) + colour * a
    return (video / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """Captioned moving-shape videos. Item: dict(video, label, caption, source, start, is_image)."""

    def __init__(
        self,
        *,
        num_items: int,
        num_frames: int,
        height: int,
        width: int,
        seed: int = 0,
        max_objects: int = 2,
        fps: float = 8.0,
        render_sizes: Sequence[int] | None = None,
        random_crop: bool = False,
        combinations: str = "all",
    ) -> None:
        if combinations not in COMBINATIONS:
            raise WaltError(
                f"shapes combinations must be one of {COMBINATIONS}, got {combinations!r}"
            )
        # all: every (colour, shape, direction); seen: the HELD_OUT triples never appear (training
        # and validation with data.shapes.holdout); heldout: one object, a HELD_OUT triple.
        self.combinations = combinations
        sizes = list(render_sizes or [])
        if any(int(s) < min(height, width) for s in sizes):
            raise WaltError(
                f"shapes render sizes {sizes} must each be >= the crop {height}x{width}"
            )
        self.render_sizes = [int(s) for s in sizes]
        self.random_crop = random_crop
        self.num_items = num_items
        self.num_frames = num_frames
        self.height, self.width = height, width
        self.seed = seed
        self.max_objects = max_objects
        self.fps = fps
        self.class_names = class_names()
        self.skipped: dict[str, str] = {}  # never any: every item renders

    def __len__(self) -> int:
        return self.num_items

    def scene(self, index: int) -> SceneSpec:
        aspect = self.width / self.height
        if self.combinations == "heldout":
            return sample_heldout_scene(self.seed, index, aspect=aspect)
        exclude = _HELD_OUT_SET if self.combinations == "seen" else frozenset()
        return sample_scene(
            self.seed, index, max_objects=self.max_objects, aspect=aspect, exclude=exclude
        )

    def _render(self, scene: SceneSpec, index: int) -> torch.Tensor:
        """(3, T, H, W): the scene at the crop size, or (multi-scale training) rendered with its
        short side at one of `render_sizes` and cropped to (H, W): at random where `random_crop`
        (a pure function of (seed, index), like the scene), else centred at the first size."""
        h, w = self.height, self.width
        if not self.render_sizes:
            return render(scene, self.num_frames, h, w)
        rng = np.random.default_rng([self.seed, index, 1])
        side = int(rng.choice(self.render_sizes)) if self.random_crop else self.render_sizes[0]
        # The scene is laid out for the crop's aspect ratio; the render keeps it.
        rh, rw = (side, round(side * w / h)) if h <= w else (round(side * h / w), side)
        video = render(scene, self.num_frames, rh, rw)
        if self.random_crop:
            top, left = int(rng.integers(0, rh - h + 1)), int(rng.integers(0, rw - w + 1))
        else:
            top, left = (rh - h) // 2, (rw - w) // 2
        return video[:, :, top : top + h, left : left + w].contiguous()

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        scene = self.scene(index)
        return {
            "video": self._render(scene, index),
            "label": scene.label,
            "caption": scene.caption,
            "source": f"shapes:{self.seed}:{index}",
            "start": 0,
            "is_image": self.num_frames == 1,
            "fps": self.fps,
        }
