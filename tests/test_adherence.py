"""The text-adherence probe reads held-out shapes clips correctly and rejects wrong captions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from walt_cli.data.shapes import COLOURS, DIRECTIONS, HELD_OUT, SHAPES, ShapesDataset, render
from walt_cli.data.video import tensor_to_frames
from walt_cli.errors import WaltError
from walt_cli.metrics.adherence import (
    ATTRIBUTES,
    Attributes,
    accuracy,
    parse_caption,
    read_video,
    score,
    score_batch,
    swap_attribute,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest and contention-proof
    yield
    torch.set_num_threads(threads)


def _heldout(n: int, frames: int, size: int) -> list[tuple[np.ndarray, str]]:
    ds = ShapesDataset(
        num_items=n, num_frames=frames, height=size, width=size, seed=9, combinations="heldout"
    )
    return [(tensor_to_frames(it["video"]), it["caption"]) for it in (ds[i] for i in range(n))]


def test_parse_caption():
    assert parse_caption(
        "a small red circle moving up-left slowly and a blue square moving up quickly "
        "on a gray background"
    ) == Attributes("red", "circle", "up-left", "gray")
    assert parse_caption("An orange cross moving down-right") == Attributes(
        "orange", "cross", "down-right", None
    )
    assert parse_caption("a large white diamond moving left quickly on a navy background") == (
        Attributes("white", "diamond", "left", "navy")
    )
    with pytest.raises(WaltError, match="names no '<colour> <shape> moving <direction>'"):
        parse_caption("a pink hexagon moving left")


def test_swap_attribute_changes_one_word_of_the_first_object():
    cap = (
        "a small red circle moving up-left slowly and a blue square moving up on a gray background"
    )
    assert swap_attribute(cap, "colour") == cap.replace("red", "green", 1)
    assert swap_attribute(cap, "shape") == cap.replace("circle", "square", 1)
    assert swap_attribute(cap, "direction") == cap.replace("up-left", "up-right", 1)
    assert swap_attribute(cap, "background") == cap.replace("gray", "navy")
    # The article follows the new word; the last word of a vocabulary wraps to the first.
    assert swap_attribute("a purple cross moving left", "colour") == "an orange cross moving left"
    assert swap_attribute("an orange cross moving left", "colour") == "a white cross moving left"
    assert swap_attribute("a cyan cross moving down-right", "direction") == (
        "a cyan cross moving left"
    )
    assert swap_attribute("a cyan cross moving left", "shape") == "a cyan circle moving left"
    for attribute in ATTRIBUTES:  # every swap is read back as a different value
        got = parse_caption(swap_attribute(cap, attribute))
        assert getattr(got, attribute) != getattr(parse_caption(cap), attribute)
    with pytest.raises(WaltError, match="names no background"):
        swap_attribute("a red circle moving left", "background")
    with pytest.raises(WaltError, match="attribute must be one of"):
        swap_attribute(cap, "speed")


# (size, frames, clips): every held-out clip is read right (measured: 1.0 on each attribute at
# both sizes, and on 200 clips in BENCHMARKS.md); the bounds leave a margin.
@pytest.mark.parametrize(("size", "frames", "clips"), [(64, 17, 40), (128, 17, 20)])
def test_probe_reads_held_out_clips(size: int, frames: int, clips: int):
    data = _heldout(clips, frames, size)
    acc = accuracy(score_batch(np.stack([v for v, _ in data]), [c for _, c in data]))
    assert acc["colour"] >= 0.95 and acc["direction"] >= 0.9 and acc["shape"] >= 0.85, acc
    assert acc["background"] >= 0.95, acc


def test_probe_rejects_wrong_captions():
    """Change one attribute of the caption: that attribute fails, the others still pass."""
    data = _heldout(20, 17, 64)
    colours, shapes, directions = list(COLOURS), list(SHAPES), list(DIRECTIONS)
    opposite = {"left": "right", "up": "down", "up-left": "down-right", "up-right": "down-left"}
    opposite |= {v: k for k, v in opposite.items()}
    for k, (video, caption) in enumerate(data):
        want = parse_caption(caption)
        wrong = {
            "colour": colours[(colours.index(want.colour) + 1 + k % 7) % 8],
            "shape": shapes[(shapes.index(want.shape) + 1 + k % 4) % 5],
            "direction": opposite[want.direction]
            if k % 2
            else directions[(directions.index(want.direction) + 1 + k % 7) % 8],
        }
        for attribute, value in wrong.items():
            lie = dataclasses.replace(want, **{attribute: value})
            text = f"a {lie.colour} {lie.shape} moving {lie.direction} on a {lie.background} background"
            got = score(video, text)
            assert not got[attribute], (caption, text)
            assert all(got[a] for a in got if a != attribute), (caption, text, got)


def test_static_empty_and_bad_input():
    scene = ShapesDataset(num_items=1, num_frames=1, height=64, width=64, seed=0).scene(0)
    still = dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(o, step=0.0) for o in scene.objects)
    )
    reading = read_video(tensor_to_frames(render(still, 9, 64, 64)))
    assert reading.direction == "static" and reading.travel < 0.01
    empty = np.full((9, 64, 64, 3), 110, dtype=np.uint8)  # gray background, nothing on it
    blank = read_video(empty)
    assert blank.background == "gray" and blank.colour is blank.shape is blank.direction is None
    assert score(empty, "a red circle moving left on a gray background") == {
        "colour": False,
        "shape": False,
        "direction": False,
        "background": True,
    }
    with pytest.raises(WaltError, match="uint8 video"):
        read_video(np.zeros((9, 64, 64, 3), dtype=np.float32))
    with pytest.raises(WaltError, match="2 videos but 1 captions"):
        score_batch(np.zeros((2, 9, 64, 64, 3), dtype=np.uint8), ["a red circle moving left"])


def _load_bench(monkeypatch, name: str, pipeline=None):
    """bench/NAME.py as a module, with `walt_cli.pipelines.Pipeline` replaced by a stand-in
    (when one is given)."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    if pipeline is not None:
        monkeypatch.setitem(
            sys.modules, "walt_cli.pipelines", types.SimpleNamespace(Pipeline=pipeline)
        )
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_model_mode_scores_what_the_pipeline_returns(monkeypatch, capsys):
    """`bench/probe_text_adherence.py --model` asks the pipeline for one sample per held-out
    caption with fixed seeds and scores it beside the real clips. The pipeline here is a stand-in
    that draws nothing: the model row reads no object, the real row every one."""
    import sys

    calls = []

    class Blank:
        @classmethod
        def from_bundle(cls, path):
            calls.append(("bundle", path))
            return cls()

        def generate(self, *, prompts, seeds, **kwargs):
            calls.append(("generate", list(prompts), list(seeds), kwargs))
            return torch.full((len(prompts), 5, 32, 32, 3), 12, dtype=torch.uint8)  # black

    bench = _load_bench(monkeypatch, "probe_text_adherence", Blank)
    argv = ["x", "--model", "default", "--num", "6", "--batch", "4", "--steps", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--guidance", "2,1", "--seed", "10"])
    bench.main()
    out = capsys.readouterr().out
    assert calls[0] == ("bundle", "default")
    (_, p1, s1, kw), (_, p2, s2, _) = calls[1:]
    assert s1 + s2 == list(range(10, 16)) and len(p1) == 4 and len(p2) == 2
    assert kw == {"steps": 3, "guidance": (2.0, 1.0)}
    asked = [parse_caption(p) for p in p1 + p2]
    assert [(a.colour, a.shape, a.direction) for a in asked] == list(HELD_OUT[:6])
    assert "| model `default` (steps 3, guidance 2,1) | 6 | 5x32x32 | 0.0% | 0.0% | 0.0% |" in out
    assert "| real held-out clips | 6 | 5x32x32 | 100.0% | 100.0% | 100.0% |" in out
    # --offset: the same captions and seeds as the tail of a longer run.
    del calls[:]
    monkeypatch.setattr(sys, "argv", ["x", "--model", "default", "--num", "3", "--offset", "3"])
    bench.main()
    ((_, prompts, seeds, _),) = calls  # the pipeline is cached: one generate call
    assert seeds == [3, 4, 5] and prompts == p1[3:] + p2
    assert "| real held-out clips | 3 | 5x32x32 | 100.0% | 100.0% | 100.0% |" in (
        capsys.readouterr().out
    )


def test_bench_through_scores_real_clips_after_one_part_of_the_model(monkeypatch, capsys):
    """`--through tokenizer --no-sample` scores the real held-out clips after encode + decode of
    the model's tokenizer, at the model's clip size, and samples nothing. Here the stand-in's
    tokenizer keeps the clip (the row equals the real one) or blanks it (the row reads nothing);
    a part the model does not have is refused."""
    import sys

    from walt_cli.errors import WaltError

    class Stage:
        name, is_sr = "base", False

    class Standin:
        resolution, clip_frames, stages = (32, 32), 5, [Stage()]
        blank = False

        @classmethod
        def from_bundle(cls, path):
            return cls()

        def encode(self, video):
            return video

        def decode(self, z):
            return torch.full_like(z, -0.9) if self.blank else z

        def generate(self, **kwargs):
            raise AssertionError("--no-sample draws no sample")

    bench = _load_bench(monkeypatch, "probe_text_adherence", Standin)
    argv = ["x", "--model", "m", "--num", "4", "--through", "tokenizer", "--no-sample"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    assert "| real clips through `tokenizer` | 4 | 5x32x32 | 100.0% | 100.0% | 100.0% |" in out
    assert "| real held-out clips | 4 | 5x32x32 | 100.0% | 100.0% | 100.0% |" in out
    assert "model `m`" not in out
    Standin.blank = True
    bench._pipeline.cache_clear()
    bench.main()
    assert "| real clips through `tokenizer` | 4 | 5x32x32 | 0.0% | 0.0% | 0.0% |" in (
        capsys.readouterr().out
    )
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "sr1", "--no-sample"])
    with pytest.raises(WaltError, match="--through sr1: not a part of m"):
        bench.main()


def test_bench_through_base_scores_at_the_base_resolution(monkeypatch, capsys):
    """`--through base` downsamples the real clips by the SR stages' factors, passes them through
    the tokenizer there and scores them at that size (here a stand-in that keeps them: the row
    reads what the real clips show)."""
    import sys
    from types import SimpleNamespace

    base = SimpleNamespace(name="base", is_sr=False)
    sr1 = SimpleNamespace(name="sr1", is_sr=True, net=SimpleNamespace(lowres_factor=2))
    seen = []

    class Standin:
        resolution, clip_frames, stages = (64, 64), 5, [base, sr1]

        @classmethod
        def from_bundle(cls, path):
            return cls()

        def encode(self, video):
            seen.append(tuple(video.shape[2:]))
            return video

        def decode(self, z):
            return z

    bench = _load_bench(monkeypatch, "probe_text_adherence", Standin)
    monkeypatch.setattr(
        sys, "argv", ["x", "--model", "m", "--num", "4", "--through", "base", "--no-sample"]
    )
    bench.main()
    out = capsys.readouterr().out
    assert seen and set(seen) == {(5, 32, 32)}
    assert "| real clips through `base` | 4 | 5x32x32 | 100.0% | 100.0% | 100.0% |" in out
    assert "| real held-out clips | 4 | 5x64x64 | 100.0% | 100.0% | 100.0% |" in out


def _sensitivity_rows(monkeypatch, capsys, net, conditioning: str, encoder, argv):
    """Run `bench/probe_text_sensitivity.py` with `argv` on a stand-in pipeline whose base
    stage is `net` (conditioned on "text" through `encoder`, or on "class" labels), its
    tokenizer a subsampling; returns the module and its table as {first cell: other cells}."""
    import sys
    import types

    from walt_cli.diffusion.schedules import make_schedule

    stage = types.SimpleNamespace(resolution=(32, 32), normalize=lambda z: z, net=net)

    class Standin:
        clip_frames, stages = 5, [stage]
        text_encoder, schedule = encoder, make_schedule()

        @classmethod
        def from_bundle(cls, path, precision="auto"):
            assert precision == "fp32"  # the probe reads the losses of the fp32 weights
            return cls()

        def encode(self, video):
            return video[:, :, :, ::8, ::8]  # (B, 3, 5, 4, 4)

    Standin.conditioning = conditioning
    bench = _load_bench(monkeypatch, "probe_text_sensitivity", Standin)
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = {
        line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    return bench, rows


def test_bench_text_sensitivity_pairs_the_noise_across_captions(monkeypatch, capsys):
    """`bench/probe_text_sensitivity.py` takes the loss of every caption variant under the same
    diffusion times and noise. A stand-in net that reads the colour word alone shows a gap where
    the colour changes (swapped, shuffled, no caption) and exactly none for the other swaps."""
    import sys

    colours = list(COLOURS)

    class Encoder:
        def encode(self, captions):
            states = torch.zeros(len(captions), 1, len(colours))
            for i, c in enumerate(captions):
                if c:
                    states[i, 0, colours.index(parse_caption(c).colour)] = 1.0
            return states, torch.ones(len(captions), 1, dtype=torch.bool)

    def net(x_in, t, cond):  # v = 0.1 x the index of the colour word, everywhere
        seen = cond.text[:, 0] * cond.text_mask[:, :1]
        level = 0.1 * (seen * torch.arange(len(colours))).sum(-1)
        return level.view(-1, 1, 1, 1, 1) * torch.ones_like(x_in[:, :3])

    argv = ["x", "--model", "m", "--num", "12", "--repeats", "2", "--times", "random,0.9"]
    bench, rows = _sensitivity_rows(monkeypatch, capsys, net, "text", Encoder(), argv)
    assert list(rows)[:2] == ["caption", "loss, true caption"]
    assert rows["caption"] == ["t random", "t = 0.9", "text states moved"]
    for same in ("shape swapped", "direction swapped", "background swapped"):
        assert rows[same] == ["+0.0% +- 0.0%"] * 2 + ["0.0%"], same
    for changed in ("colour swapped", "shuffled (another clip's)", "no caption"):
        assert all(cell != "+0.0% +- 0.0%" for cell in rows[changed][:2]), changed
    # one-hot colour states: a swap moves them by |e_a - e_b| / |e_a| = sqrt(2)
    assert rows["colour swapped"][2] == "141.4%" and rows["no caption"][2] == "masked"
    monkeypatch.setattr(sys, "argv", [*argv, "--cond-frames", "5"])
    with pytest.raises(WaltError, match="--cond-frames must be in 0..4, got 5"):
        bench.main()


def test_bench_text_sensitivity_reads_class_models_by_label(monkeypatch, capsys):
    """For a class-conditioned shapes base, `bench/probe_text_sensitivity.py` reads each caption
    as the class label of its first object (shape x direction). A stand-in net that reads the
    direction part of the label alone shows a gap where the direction changes and exactly none
    where only the shape does; colour and background, not in the label, are not swapped."""
    from walt_cli.data.shapes import DIRECTIONS

    def net(x_in, t, cond):  # v = 0.1 x the direction index of the label, everywhere
        assert cond.text is None
        level = 0.1 * torch.remainder(cond.labels, len(DIRECTIONS)).float()
        return level.view(-1, 1, 1, 1, 1) * torch.ones_like(x_in[:, :3])

    argv = ["x", "--model", "m", "--num", "12", "--repeats", "1", "--times", "0.9,1.0"]
    _, rows = _sensitivity_rows(monkeypatch, capsys, net, "class", None, argv)
    assert list(rows) == [
        "label",
        "loss, true label",
        "shape swapped",
        "direction swapped",
        "shuffled (another clip's)",
        "no label (null class)",
    ]
    assert rows["label"] == ["t = 0.9", "t = 1"]
    assert rows["shape swapped"] == ["+0.0% +- 0.0%"] * 2
    assert all(cell != "+0.0% +- 0.0%" for cell in rows["direction swapped"])


def test_bench_latent_tracks_reads_a_moving_blob_in_every_direction(monkeypatch):
    """`bench/check_latent_tracks.py` reads a blob's direction from latents alone: a 2x2 blob of
    different channel values moving one cell per latent frame over a textured background."""
    from walt_cli.data.shapes_vocab import DIRECTIONS

    bench = _load_bench(monkeypatch, "check_latent_tracks")
    g = torch.Generator().manual_seed(0)
    for name, (dx, dy) in DIRECTIONS.items():
        step = (round(dx * 1.4), round(dy * 1.4))  # one cell a frame along each moving axis
        z = 0.1 * torch.randn(8, 5, 16, 16, generator=g)  # (c, t, h, w) background
        for k in range(5):
            x, y = 7 + k * step[0], 7 + k * step[1]
            z[:, k, y : y + 2, x : x + 2] += 3.0
        assert bench.track_direction(z) == name, name


def test_bench_ideal_gaps_measure_each_words_effect_without_noise_bias(monkeypatch):
    """`check_latent_tracks.ideal_gaps` on synthetic latents, noise plus an additive effect of
    the direction word alone: the direction gap matches the one computed from the true effects,
    and a word without effect (shape) reads about zero, not the positive bias a plain fit's
    squared effect differences would give."""
    import numpy as np

    bench = _load_bench(monkeypatch, "check_latent_tracks")
    rng = np.random.default_rng(1)
    vocab = {"shape": ["circle", "square", "star"], "direction": ["left", "right", "up", "down"]}
    n, dim, sigma = 4000, 64, 1.0
    words = [{a: str(rng.choice(v)) for a, v in vocab.items()} for _ in range(n)]
    effect = {d: rng.normal(0, 0.3, dim) for d in vocab["direction"]}
    latents = np.stack([effect[w["direction"]] for w in words]) + rng.normal(0, sigma, (n, dim))
    gaps = bench.ideal_gaps(latents, words, vocab)

    nxt = {d: vocab["direction"][(i + 1) % 4] for i, d in enumerate(vocab["direction"])}
    want = np.mean(
        [((effect[nxt[w["direction"]]] - effect[w["direction"]]) ** 2).sum() for w in words]
    )
    want /= dim * sigma**2
    assert gaps["direction"] == pytest.approx(want, rel=0.1)
    # |d_A|^2 in place of d_A . d_B reads +0.31% here; the cross-fitted estimate -0.06%.
    assert abs(gaps["shape"]) < 0.0015


def test_synthetic_direction_clips_move_the_way_their_label_says(monkeypatch):
    """`bench/probe_direction_synthetic.py`: every clip's blob moves in the direction its label
    names, as `check_latent_tracks` reads it; the path stays inside the grid."""
    from walt_cli.data.shapes_vocab import DIRECTIONS

    synth = _load_bench(monkeypatch, "probe_direction_synthetic")
    tracks = _load_bench(monkeypatch, "check_latent_tracks")
    grid = (5, 8, 8)
    clips, labels, (_, _, starts) = synth.make_clips(
        64, grid, 8, torch.Generator().manual_seed(0), speed=1.0, sigma=0.7
    )
    assert clips.shape == (64, 8, *grid) and sorted(set(labels.tolist())) == list(range(8))
    names = list(DIRECTIONS)
    for clip, label, (x, y) in zip(clips, labels.tolist(), starts, strict=True):
        assert tracks.track_direction(clip) == names[label]
        dx, dy = DIRECTIONS[names[label]]
        for k in range(grid[0]):
            assert 1 - 1e-6 <= x + dx * k <= 7 + 1e-6 and 1 - 1e-6 <= y + dy * k <= 7 + 1e-6


def test_synthetic_direction_blind_ideal_is_the_label_free_optimum(monkeypatch):
    """The blind ideal keeps frame 0, averages the directions that fit (each its clip exactly
    when alone) and beats both dropping the object and every single guessed direction."""
    synth = _load_bench(monkeypatch, "probe_direction_synthetic")
    grid, draw = (5, 8, 8), dict(speed=1.0, sigma=0.7)
    clips, labels, parts = synth.make_clips(48, grid, 8, torch.Generator().manual_seed(1), **draw)
    blind = synth.blind_ideal(parts, grid, **draw)
    assert torch.allclose(blind[:, :, 0], clips[:, :, 0], atol=1e-5)
    background = parts[0][:, :, None, None, None].expand_as(clips)
    ideal = synth.later_frames_mse(blind, clips)
    assert 0 < ideal < synth.later_frames_mse(background, clips)
    bg, obj, starts = parts
    for d in range(8):  # one guessed direction for every clip (paths may leave the grid)
        guess = torch.stack(
            [synth.render(bg[i], obj[i], starts[i], d, grid, **draw) for i in range(48)]
        )
        assert synth.later_frames_mse(guess, clips) > ideal
    # At 1.5 cells a frame only "right" (label 1) fits a start at the middle of the left edge.
    fast = dict(speed=1.5, sigma=0.7)
    alone = synth.blind_ideal((bg[:1], obj[:1], [(1.0, 4.0)]), grid, **fast)
    right = synth.render(bg[0], obj[0], (1.0, 4.0), 1, grid, **fast)
    assert torch.allclose(alone[0], right, atol=1e-5)


def test_synthetic_direction_probe_trains_a_recipe_network(monkeypatch, capsys):
    """Two steps of a small recipe network: one table row per evaluation, and the references in
    their order (blind ideal < background only < zeros)."""
    synth = _load_bench(monkeypatch, "probe_direction_synthetic")
    synth.main(
        ["--steps", "2", "--eval-every", "1", "--threads", "1"]
        + ["base.depth=2", "base.width=32", "base.heads=2", "base.batch_size=2"]
    )
    out = capsys.readouterr().out.splitlines()
    refs = dict(
        (k.strip(), float(v))
        for k, v in (part.rsplit(" ", 1) for part in out[1].split(": ", 1)[1].split(", ")[:3])
    )
    assert refs["blind ideal"] < refs["background only"] < refs["zeros"]
    rows = [line for line in out if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2"]
    assert len(rows[0].split(" | ")) == 9


def test_synthetic_direction_probe_net_overrides_change_only_the_named_keywords(monkeypatch):
    """`--net KEY=VALUE` rebuilds the recipe's network with those constructor keywords (values
    read as YAML) and everything else as the recipe has it; a keyword WALT does not take stops
    the script with a usage error."""
    from walt_cli.config import load_recipe

    synth = _load_bench(monkeypatch, "probe_direction_synthetic")
    overrides = synth.parse_net_overrides(
        ["full_attention=true", "relative_position_bias=false", "adaln_lora_rank=0"]
    )
    assert overrides == dict(full_attention=True, relative_position_bias=False, adaln_lora_rank=0)
    small = ["base.depth=2", "base.width=32", "base.heads=2"]
    recipe = load_recipe(REPO / "recipes" / "shapes.yaml", small)
    plain = synth._network(recipe, (5, 8, 8), 8)
    net = synth._network(recipe, (5, 8, 8), 8, overrides)
    changed = {k for k in net.config if net.config[k] != plain.config[k]}
    assert changed == {"full_attention", "relative_position_bias", "adaln_lora_rank"}
    assert all(block.attn.bias is None and block.adaln_rank == 0 for block in net.blocks)
    assert plain.blocks[1].attn.bias is not None
    # The inits, which are not part of the config, can be named too (the recipe's locality
    # prior puts -2 x distance in the first head's table; Swin's start is N(0, 0.02)).
    swin = synth._network(recipe, (5, 8, 8), 8, {"bias_init": "random"})
    assert swin.blocks[1].attn.bias.table.abs().max() < 0.1
    assert plain.blocks[1].attn.bias.table.abs().max() > 1
    # An override that changes nothing starts the very network the recipe's would be.
    torch.manual_seed(3)
    same = synth._network(recipe, (5, 8, 8), 8, {"qk_norm": True}).state_dict()
    torch.manual_seed(3)
    want = synth._network(recipe, (5, 8, 8), 8).state_dict()
    assert same.keys() == want.keys()
    assert all(torch.equal(same[k], want[k]) for k in want)

    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--steps", "1", "--net", "no_such_key=1"])
    assert exit_info.value.code == 2
