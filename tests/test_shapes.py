"""`shapes`: deterministic under a seed, and every caption says what is drawn."""

from __future__ import annotations

import math

import pytest
import torch

from walt_cli.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapesDataset,
    render,
    sample_scene,
)


def test_deterministic_under_seed():
    a = ShapesDataset(num_items=6, num_frames=5, height=32, width=48, seed=11)
    b = ShapesDataset(num_items=6, num_frames=5, height=32, width=48, seed=11)
    c = ShapesDataset(num_items=6, num_frames=5, height=32, width=48, seed=12)
    for i in range(6):
        assert torch.equal(a[i]["video"], b[i]["video"]) and a[i]["caption"] == b[i]["caption"]
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(6))
    # reading order does not matter: item 5 alone equals item 5 after the others
    assert torch.equal(
        ShapesDataset(num_items=6, num_frames=5, height=32, width=48, seed=11)[5]["video"],
        a[5]["video"],
    )


def test_item_format_and_range():
    item = ShapesDataset(num_items=2, num_frames=9, height=24, width=40)[1]
    assert item["video"].shape == (3, 9, 24, 40)
    assert float(item["video"].min()) >= -1.0 and float(item["video"].max()) <= 1.0
    assert 0 <= item["label"] < len(SHAPES) * len(DIRECTIONS)
    assert item["caption"].startswith(("a ", "an ")) and "background" in item["caption"]


def test_scenes_are_varied():
    scenes = [sample_scene(0, i, max_objects=3) for i in range(400)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.direction for o in objs} == set(DIRECTIONS)
    assert {o.speed for o in objs} == {"slowly", "quickly"}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def _object_mask(frame: torch.Tensor, colour: str) -> torch.Tensor:
    """Pixels (fully or mostly covered) of the named colour. frame: (3, H, W) in [-1, 1]."""
    rgb = (frame + 1) * 127.5
    ref = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1)
    return (rgb - ref).norm(dim=0) < 30


def _shape_of(mask: torch.Tensor) -> str:
    """Tell the five shapes apart: fill ratio of the bounding box, vertical asymmetry (a triangle's
    mass sits low in its box) and a diagonal probe (inside a diamond, outside a cross)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h = int(ys.max() - ys.min() + 1)
    w = int(xs.max() - xs.min() + 1)
    fill = mask.sum().item() / (h * w)
    if fill > 0.92:
        return "square"
    if fill > 0.7:
        return "circle"
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    if (ys.float().mean() - cy) / h > 0.08:
        return "triangle"
    dy, dx = int(round(cy.item() + 0.2 * h)), int(round(cx.item() + 0.2 * w))
    return "diamond" if mask[dy, dx] else "cross"


@pytest.mark.parametrize("seed", [0, 1])
def test_captions_match_what_is_drawn(seed: int):
    """For one-object scenes: the named colour is there, the named shape is drawn, and its
    centroid moves in the named direction at the named speed (quickly > slowly)."""
    checked = 0
    travelled = {"slowly": [], "quickly": []}
    for index in range(40):
        scene = sample_scene(seed, index, max_objects=1)
        (obj,) = scene.objects
        if obj.size == "small":
            continue  # too few pixels at 64 px to tell shapes apart reliably
        video = render(scene, 17, 64, 64)
        first, last = _object_mask(video[:, 0], obj.colour), _object_mask(video[:, -1], obj.colour)
        assert first.sum() > 20 and last.sum() > 20, scene.caption
        assert _shape_of(first) == obj.shape, scene.caption

        def centroid(m):
            ys, xs = torch.nonzero(m, as_tuple=True)
            return torch.stack([xs.float().mean(), ys.float().mean()])

        move = centroid(last) - centroid(first)
        want = torch.tensor(DIRECTIONS[obj.direction])
        cos = float(move @ want / (move.norm() + 1e-6))
        assert cos > 0.95, f"{scene.caption}: moved {move.tolist()}"
        travelled[obj.speed].append(move.norm().item())
        assert f"{obj.colour} {obj.shape} moving {obj.direction} {obj.speed}" in scene.caption
        checked += 1
    assert checked >= 20
    assert min(travelled["quickly"]) > max(travelled["slowly"]) * 1.2


def test_objects_stay_inside_the_frame():
    for index in range(60):
        scene = sample_scene(3, index, max_objects=2, aspect=2.0)
        for o in scene.objects:
            for t in (0, 16):
                x = o.start[0] + DIRECTIONS[o.direction][0] * o.step * t
                y = o.start[1] + DIRECTIONS[o.direction][1] * o.step * t
                assert x >= -1e-6 and x <= 2.0 + 1e-6 and -1e-6 <= y <= 1.0 + 1e-6
        assert not math.isnan(scene.objects[0].start[0])


def test_multiscale_crops_are_deterministic_crops_of_larger_renders():
    from walt_cli.data.shapes import ShapesDataset

    def make(random_crop):
        return ShapesDataset(
            num_items=8,
            num_frames=5,
            height=32,
            width=32,
            seed=3,
            render_sizes=[64, 128],
            random_crop=random_crop,
        )

    a, b = make(True), make(True)
    for i in range(8):
        v = a[i]["video"]
        assert v.shape == (3, 5, 32, 32)
        assert torch.equal(v, b[i]["video"])  # a pure function of (seed, index)
    # Validation: the centre 32x32 of the scene rendered at the first size.
    from walt_cli.data.shapes import render

    full = render(make(False).scene(0), 5, 64, 64)
    assert torch.equal(make(False)[0]["video"], full[:, :, 16:48, 16:48])
    # Random crops come from both scales and from different places.
    crops = {tuple(a[i]["video"][:, 0].flatten()[:50].tolist()) for i in range(8)}
    assert len(crops) > 1


def test_render_sizes_smaller_than_the_crop_are_refused():
    from walt_cli.data.shapes import ShapesDataset
    from walt_cli.errors import WaltError

    with pytest.raises(WaltError, match="must each be >= the crop 64x64"):
        ShapesDataset(num_items=1, num_frames=1, height=64, width=64, render_sizes=[32])
