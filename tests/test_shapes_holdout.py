"""Held-out (colour, shape, direction) triples: never in training with data.shapes.holdout, the
only content of the "heldout" split, and nothing changes with the key off."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from walt_cli.config import load_recipe
from walt_cli.data.datasets import build_dataset
from walt_cli.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    ShapesDataset,
    sample_heldout_scene,
    sample_scene,
)
from walt_cli.errors import WaltError

REPO = Path(__file__).resolve().parent.parent


def _triples(scene):
    return [(o.colour, o.shape, o.direction) for o in scene.objects]


def test_held_out_triples_are_fixed_and_leave_every_pair_in_training():
    assert len(set(HELD_OUT)) == len(HELD_OUT) == 40  # 12.5% of 8 x 5 x 8
    assert HELD_OUT[:3] == (
        ("red", "circle", "left"),
        ("red", "square", "right"),
        ("red", "triangle", "up"),
    )
    held = set(HELD_OUT)
    for (a, names_a), (b, names_b) in itertools.combinations(
        enumerate((list(COLOURS), list(SHAPES), list(DIRECTIONS))), 2
    ):
        for x, y in itertools.product(names_a, names_b):
            # How many completions of this pair of attributes are held out: at most one, never all.
            completions = [t for t in held if t[a] == x and t[b] == y]
            assert len(completions) <= 1, (x, y)
    # Each (colour, shape) and (shape, direction) pair loses exactly one completion.
    assert {(c, s) for c, s, _ in HELD_OUT} == set(itertools.product(COLOURS, SHAPES))
    assert {(s, d) for _, s, d in HELD_OUT} == set(itertools.product(SHAPES, DIRECTIONS))


def test_without_holdout_the_scenes_are_the_ones_they_always_were():
    # Golden value: the scenes of seed 0 before held-out triples existed (commit c1032dc).
    text = "".join(repr(sample_scene(0, i, max_objects=2)) for i in range(200))
    assert (
        hashlib.sha256(text.encode()).hexdigest()
        == "fe413b5ff2ef25efe8297b1343eb5174e8b18fb9e554c08f673b3c5afb025c37"
    )
    a = ShapesDataset(num_items=4, num_frames=5, height=32, width=32, seed=3)
    b = ShapesDataset(num_items=4, num_frames=5, height=32, width=32, seed=3, combinations="all")
    assert all(a.scene(i) == b.scene(i) for i in range(4))


def test_seen_scenes_never_show_a_held_out_triple():
    held = set(HELD_OUT)
    redrawn = kept = 0
    seen_objects = []
    for index in range(600):
        before = sample_scene(1, index, max_objects=3)
        after = sample_scene(1, index, max_objects=3, exclude=held)
        assert not held & set(_triples(after))
        seen_objects += after.objects
        if held & set(_triples(before)):
            redrawn += 1
            assert after != before
        else:
            kept += 1
            assert after == before  # only scenes that showed a held-out triple change
        assert after == sample_scene(1, index, max_objects=3, exclude=held)  # deterministic
    assert redrawn > 50 and kept > 300
    # Every colour, shape and direction alone is still trained on.
    assert {o.colour for o in seen_objects} == set(COLOURS)
    assert {o.shape for o in seen_objects} == set(SHAPES)
    assert {o.direction for o in seen_objects} == set(DIRECTIONS)


def test_heldout_scenes_show_each_triple_alone():
    scenes = [sample_heldout_scene(5, i) for i in range(80)]
    assert [_triples(s)[0] for s in scenes] == list(HELD_OUT) * 2
    for s in scenes:
        (o,) = s.objects
        bg = BACKGROUNDS[s.background]
        assert sum((x - y) ** 2 for x, y in zip(COLOURS[o.colour], bg, strict=True)) >= 110**2
        for t in (0, 16):  # the path stays inside the frame, as in training
            x = o.start[0] + DIRECTIONS[o.direction][0] * o.step * t
            y = o.start[1] + DIRECTIONS[o.direction][1] * o.step * t
            assert -1e-6 <= x <= 1 + 1e-6 and -1e-6 <= y <= 1 + 1e-6
    assert len({s.background for s in scenes}) > 1 and len({s.objects[0].size for s in scenes}) == 3
    assert scenes[7] == sample_heldout_scene(5, 7)
    with pytest.raises(WaltError, match="combinations must be one of"):
        ShapesDataset(num_items=1, num_frames=1, height=8, width=8, combinations="unseen")


def test_recipe_key_selects_the_splits():
    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml",
        ["data.shapes.holdout=true", "data.shapes.num_items=64", "data.shapes.max_objects=3"],
    )
    held = set(HELD_OUT)
    train, val = build_dataset(recipe.data, "train"), build_dataset(recipe.data, "val")
    for ds in (train, val):
        assert ds.combinations == "seen"
        assert not any(held & set(_triples(ds.scene(i))) for i in range(len(ds)))
    heldout = build_dataset(recipe.data, "heldout")
    assert len(heldout) == 64 and heldout.combinations == "heldout"
    item = heldout[3]
    h, w = recipe.data.resolution
    assert item["video"].shape == (3, recipe.data.num_frames, h, w)
    colour, shape, direction = HELD_OUT[3]
    assert f"{colour} {shape} moving {direction} " in item["caption"]
    assert item["caption"] not in {train[i]["caption"] for i in range(len(train))}

    off = load_recipe(REPO / "recipes" / "tiny.yaml")
    with pytest.raises(WaltError, match="needs data.source=shapes and data.shapes.holdout=true"):
        build_dataset(off.data, "heldout")


def test_holdout_key_is_for_shapes_only(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("data:\n  source: folder\n  path: clips\n  shapes:\n    holdout: true\n")
    with pytest.raises(WaltError, match="data.shapes.holdout: applies to data.source=shapes only"):
        load_recipe(f)
