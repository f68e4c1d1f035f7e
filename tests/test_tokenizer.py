"""The causal 3D tokenizer: shapes, exact causality, chunked == unchunked, parameter count,
checkpoints and input errors (issue 3; SPEC_WALT.md §1, DESIGN §5 "Causality is exact")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from walt_cli.errors import WaltError
from walt_cli.models.checkpoint import save_weights
from walt_cli.models.layers import AdaptiveGroupNorm, CausalConv3d, DepthToSpaceUpsample3d
from walt_cli.models.tokenizer import PRESETS, CausalVideoTokenizer, latent_index

ATOL = 1e-5


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a non-trivial value (norm affines, AdaGN maps, biases), so that no
    dependence hides behind an identity or zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm) and module.affine:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Conv3d) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def video(t: int, h: int, w: int, *, b: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def tiny() -> CausalVideoTokenizer:
    torch.manual_seed(0)
    return randomize(CausalVideoTokenizer.from_preset("tiny"))


@pytest.fixture(scope="module")
def paper_sized() -> CausalVideoTokenizer:
    """The `paper` architecture (128 channels, multipliers 1,2,2,4, GroupNorm(32)) with one
    residual block per level instead of four, used on small frames."""
    torch.manual_seed(0)
    return randomize(CausalVideoTokenizer.from_preset("paper", num_res_blocks=1))


# --------------------------------------------------------------------------------------------
# Shapes


def test_shapes_video_image_and_long_clip(tiny):
    # (Decoding 17x128x128 is also checked, for every preset, on the meta device below.)
    with torch.no_grad():
        z = tiny.encode(video(17, 128, 128))
        assert z.shape == (1, 8, 5, 16, 16)
        assert tiny.decode(z[..., :4, :4]).shape == (1, 3, 17, 32, 32)

        z_img = tiny.encode(video(1, 128, 128))
        assert z_img.shape == (1, 8, 1, 16, 16)
        assert tiny.decode(z_img).shape == (1, 3, 1, 128, 128)

        z_long = tiny.encode(video(33, 32, 48, b=2))
        assert z_long.shape == (2, 8, 9, 4, 6)
        assert tiny.decode(z_long).shape == (2, 3, 33, 32, 48)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_the_paper_factors(name):
    with torch.device("meta"):
        tok = CausalVideoTokenizer.from_preset(name)
        z = tok.encode(torch.empty(1, 3, 17, 128, 128))
        assert z.shape == (1, 8, 5, 16, 16)
        assert tok.decode(z).shape == (1, 3, 17, 128, 128)
    assert (tok.spatial_factor, tok.temporal_factor, tok.latent_channels) == (8, 4, 8)
    assert [tok.num_latent_frames(t) for t in (1, 5, 17, 33)] == [1, 2, 5, 9]
    assert [tok.num_frames(t) for t in (1, 2, 5, 9)] == [1, 5, 17, 33]


def test_latent_index_maps_frames_to_the_covering_latent():
    # Latent 0 covers frame 0; latent i >= 1 covers frames 4i-3 .. 4i.
    assert latent_index(3, 4, first=True).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert latent_index(3, 2, first=True).tolist() == [0, 1, 1, 2, 2]
    assert latent_index(2, 4, first=False).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert latent_index(4, 1, first=True).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# Causality, exactly


def check_encoder_causality(tok: CausalVideoTokenizer, h: int, w: int) -> None:
    x = video(17, h, w)
    x2 = x.clone()
    x2[:, :, 9:] = video(8, h, w, seed=7)  # change input frames 9..16
    with torch.no_grad():
        z, z2 = tok.encode(x), tok.encode(x2)
        z_img = tok.encode(x[:, :, :1])
    # Latent frames 0..2 cover input frames 0..8: unchanged.
    torch.testing.assert_close(z2[:, :, :3], z[:, :, :3], atol=ATOL, rtol=0)
    # Latent frames 3 and 4 cover the changed frames: they must change (the test can fail).
    for i in (3, 4):
        assert (z2[:, :, i] - z[:, :, i]).abs().max() > 1e-3, f"latent {i} ignores its frames"
    # An image is a 1-frame video: its latent is the first latent frame of any video that
    # starts with it.
    torch.testing.assert_close(z_img[:, :, 0], z[:, :, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(z_img[:, :, 0], z2[:, :, 0], atol=ATOL, rtol=0)


def check_decoder_causality(tok: CausalVideoTokenizer, h: int, w: int, latents=(1, 2, 3, 4)):
    """Decoded frame j depends only on latent frames that cover frames <= j: changing latent
    frame i (which covers frames 4i-3 .. 4i) leaves frames 0 .. 4i-4 unchanged."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 8, 5, h, w, generator=gen)
    with torch.no_grad():
        x = tok.decode(z)
        # Decoding latent frame 0 alone gives frame 0 of the video (the image case).
        torch.testing.assert_close(tok.decode(z[:, :, :1])[:, :, 0], x[:, :, 0], atol=ATOL, rtol=0)
        for i in latents:
            z2 = z.clone()
            z2[:, :, i] += torch.randn(1, 8, h, w, generator=gen)
            x2 = tok.decode(z2)
            first_covered = 4 * i - 3
            torch.testing.assert_close(
                x2[:, :, :first_covered], x[:, :, :first_covered], atol=ATOL, rtol=0
            )
            assert (x2[:, :, first_covered] - x[:, :, first_covered]).abs().max() > 1e-3


def test_encoder_is_causal_tiny(tiny):
    check_encoder_causality(tiny, 32, 32)


def test_decoder_is_causal_tiny(tiny):
    check_decoder_causality(tiny, 4, 4, latents=(1, 2, 4))


def test_encoder_is_causal_paper_sized(paper_sized):
    check_encoder_causality(paper_sized, 16, 16)


def test_decoder_is_causal_paper_sized(paper_sized):
    check_decoder_causality(paper_sized, 2, 2, latents=(1, 3))


def test_adaptive_groupnorm_is_per_frame_and_uses_its_control_frame():
    torch.manual_seed(0)
    norm = randomize(AdaptiveGroupNorm(64, 8, num_groups=32))
    x, cond = torch.randn(2, 64, 5, 6, 6), torch.randn(2, 8, 5, 3, 3)
    y = norm(x, cond)
    x2, cond2 = x.clone(), cond.clone()
    x2[:, :, 3:] *= 5
    cond2[:, :, 3:] += 1
    y2 = norm(x2, cond2)
    torch.testing.assert_close(y2[:, :, :3], y[:, :, :3], atol=ATOL, rtol=0)
    assert (y2[:, :, 3:] - y[:, :, 3:]).abs().max() > 1e-2


def test_causal_conv_pads_before_only():
    conv = CausalConv3d(2, 3, 3, stride=(2, 1, 1))
    x = torch.randn(1, 2, 9, 4, 4)
    y = conv(x)
    assert y.shape == (1, 3, 5, 4, 4)  # 1 + 2m -> 1 + m
    # Output frame i sees input frames 2i-2 .. 2i: the same as an explicit left zero pad.
    ref = nn.functional.conv3d(
        nn.functional.pad(x, (1, 1, 1, 1, 2, 0)), conv.conv.weight, conv.conv.bias, stride=(2, 1, 1)
    )
    torch.testing.assert_close(y, ref)


def test_depth_to_space_drops_the_leading_frames():
    up = randomize(DepthToSpaceUpsample3d(32, temporal=True))
    x = torch.randn(1, 32, 4, 3, 3)
    with torch.no_grad():
        y = up(x)
        assert y.shape == (1, 32, 7, 6, 6)  # 1 + m -> 1 + 2m
        # Output frame j comes from input frame ceil(j / 2): changing input frame i changes
        # frames 2i-1 on, never before.
        for i in (1, 2, 3):
            x2 = x.clone()
            x2[:, :, i] += 1
            y2 = up(x2)
            torch.testing.assert_close(y2[:, :, : 2 * i - 1], y[:, :, : 2 * i - 1])
            assert (y2[:, :, 2 * i - 1] - y[:, :, 2 * i - 1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Chunked == unchunked


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_chunked_encode_equals_unchunked(tiny, chunk):
    x = video(21, 32, 32)
    calls = []
    with torch.no_grad():
        full = tiny.encode(x)
        chunked = tiny.encode(x, chunk_frames=chunk, callback=lambda d, n: calls.append((d, n)))
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=1e-5)
    # Frame 0 plus `chunk` frames, then `chunk` at a time: 21 frames in 5, 3 or 1 chunks.
    n_chunks = {4: 5, 8: 3, 32: 1}[chunk]
    assert calls == [(k + 1, n_chunks) for k in range(n_chunks)]


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_decode_equals_unchunked(tiny, chunk):
    z = torch.randn(2, 8, 6, 2, 3)
    with torch.no_grad():
        full = tiny.decode(z)
        chunked = tiny.decode(z, chunk_latents=chunk)
    assert chunked.shape == (2, 3, 21, 16, 24)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=1e-5)


def test_chunked_equals_unchunked_paper_sized(paper_sized):
    x = video(9, 16, 16)
    with torch.no_grad():
        z = paper_sized.encode(x)
        torch.testing.assert_close(paper_sized.encode(x, chunk_frames=4), z, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(
            paper_sized.decode(z, chunk_latents=1), paper_sized.decode(z), atol=ATOL, rtol=1e-5
        )


def test_chunk_size_must_be_a_multiple_of_the_temporal_factor(tiny):
    with pytest.raises(WaltError, match="chunk_frames must be a positive multiple of 4, got 3"):
        tiny.encode(video(9, 16, 16), chunk_frames=3)
    with pytest.raises(WaltError, match="chunk_latents must be a positive integer, got 0"):
        tiny.decode(torch.zeros(1, 8, 3, 2, 2), chunk_latents=0)


# --------------------------------------------------------------------------------------------
# Parameter count (closed form)


def closed_form_params(
    base: int, mults: tuple[int, ...], blocks: int, temporal: tuple[bool, ...], c: int = 8
) -> int:
    """Parameters of the architecture in SPEC §1, from channels, multipliers and block counts.

    3x3x3 kernels (27 weights per channel pair). ResBlock(a -> b): two GroupNorm affines (2a,
    2b), two bias-free convs (27ab, 27b^2) and a bias-free 1x1x1 shortcut (ab) when a != b.
    Encoder: bias-free conv_in 3 -> C, per level N ResBlocks, a strided conv (with bias) after
    every level but the last, N middle ResBlocks, GroupNorm and a 1x1x1 conv (with bias) to c.
    Decoder: conv_in c -> C_top (bias), N middle ResBlocks; per level (deepest first) an adaptive
    GroupNorm (two c -> C linear maps), N ResBlocks, and for every level but the first a conv
    (with bias) to C * s_t * 4 channels for depth-to-space; GroupNorm and conv_out C_0 -> 3.
    """
    widths = [base * m for m in mults]

    def res(a: int, b: int) -> int:
        return 2 * a + 27 * a * b + 2 * b + 27 * b * b + (a * b if a != b else 0)

    top = widths[-1]
    enc = 27 * 3 * base
    prev = base
    for i, wd in enumerate(widths):
        enc += res(prev, wd) + (blocks - 1) * res(wd, wd)
        prev = wd
        if i < len(widths) - 1:
            enc += 27 * wd * wd + wd
    enc += blocks * res(top, top) + 2 * top + top * c + c

    dec = 27 * c * top + top + blocks * res(top, top)
    prev = top
    for i in reversed(range(len(widths))):
        wd = widths[i]
        dec += 2 * (c * prev + prev)
        dec += res(prev, wd) + (blocks - 1) * res(wd, wd)
        prev = wd
        if i > 0:
            up = wd * 4 * (2 if temporal[i - 1] else 1)
            dec += 27 * wd * up + up
    dec += 2 * widths[0] + 27 * widths[0] * 3 + 3
    return enc + dec


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_closed_form(name):
    with torch.device("meta"):
        tok = CausalVideoTokenizer.from_preset(name)
    p = PRESETS[name]
    expected = closed_form_params(
        p["base_channels"], p["channel_multipliers"], p["num_res_blocks"], p["temporal_downsample"]
    )
    assert tok.num_parameters() == expected


def test_paper_presets_follow_table_8():
    assert PRESETS["paper"]["base_channels"] == PRESETS["paper-image"]["base_channels"] == 128
    assert PRESETS["paper"]["channel_multipliers"] == (1, 2, 2, 4)
    assert PRESETS["paper-image"]["channel_multipliers"] == (1, 1, 2, 4)
    assert PRESETS["paper"]["num_res_blocks"] == 4
    with torch.device("meta"):
        assert CausalVideoTokenizer.from_preset("paper").num_parameters() == 370_373_259
        assert CausalVideoTokenizer.from_preset("tiny").num_parameters() < 2_000_000


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tiny.save(tmp_path / "tok.safetensors")
    loaded = CausalVideoTokenizer.from_checkpoint(path)
    assert loaded.config == tiny.config
    assert not loaded.training
    x = video(5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), tiny.encode(x), atol=0, rtol=0)


def test_checkpoint_rebuilds_a_non_default_architecture(tmp_path):
    tok = CausalVideoTokenizer.from_preset(
        "tiny", latent_channels=4, channel_multipliers=(1, 1, 2), temporal_downsample=(False, True)
    )
    tok.save(tmp_path / "t.safetensors")
    loaded = CausalVideoTokenizer.from_checkpoint(tmp_path / "t.safetensors")
    assert loaded.config == tok.config
    assert (loaded.spatial_factor, loaded.temporal_factor, loaded.latent_channels) == (4, 2, 4)


def test_corrupt_checkpoint_is_a_clear_error(tiny, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(WaltError, match="junk.safetensors: not a readable safetensors"):
        CausalVideoTokenizer.from_checkpoint(junk)
    good = tiny.save(tmp_path / "good.safetensors")
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WaltError, match="truncated.safetensors: not a readable safetensors"):
        CausalVideoTokenizer.from_checkpoint(cut)
    with pytest.raises(WaltError, match="checkpoint not found"):
        CausalVideoTokenizer.from_checkpoint(tmp_path / "missing.safetensors")


def test_read_metadata_is_load_weights_without_the_tensors(tiny, tmp_path):
    from walt_cli.models.checkpoint import load_weights, read_metadata

    good = save_weights(
        tmp_path / "good.safetensors", tiny, kind="tokenizer", config=tiny.config,
        extra={"encoder_of": "abc"},
    )  # fmt: skip
    config, _, extra = load_weights(good, kind="tokenizer")
    assert read_metadata(good, kind="tokenizer") == (config, extra) == (tiny.config, extra)
    assert extra == {"encoder_of": "abc"}
    with pytest.raises(WaltError, match="holds a 'tokenizer' model, expected a 'walt-transformer'"):
        read_metadata(good, kind="walt-transformer")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:6])
    with pytest.raises(WaltError, match="cut.safetensors: not a readable safetensors"):
        read_metadata(cut, kind="tokenizer")


def test_mismatched_checkpoint_is_a_clear_error(tiny, tmp_path):
    # Weights of `tiny` under the config of a wider model.
    wrong = save_weights(
        tmp_path / "wrong.safetensors",
        tiny,
        kind="tokenizer",
        config={**tiny.config, "base_channels": 64},
    )
    with pytest.raises(
        WaltError, match=r"wrong.safetensors: weights do not fit the model: .*shape mismatches"
    ):
        CausalVideoTokenizer.from_checkpoint(wrong)
    # Another model family.
    other = save_weights(tmp_path / "other.safetensors", tiny, kind="transformer", config={})
    with pytest.raises(
        WaltError, match="holds a 'transformer' model, expected a 'tokenizer' model"
    ):
        CausalVideoTokenizer.from_checkpoint(other)
    # A config this version cannot build.
    unknown = save_weights(
        tmp_path / "unknown.safetensors",
        tiny,
        kind="tokenizer",
        config={**tiny.config, "quantizer": "lfq"},
    )
    with pytest.raises(WaltError, match="config does not fit this version.*quantizer"):
        CausalVideoTokenizer.from_checkpoint(unknown)
    invalid = save_weights(
        tmp_path / "invalid.safetensors",
        tiny,
        kind="tokenizer",
        config={**tiny.config, "num_groups": 7},
    )
    with pytest.raises(WaltError, match="invalid tokenizer config .*not divisible by num_groups=7"):
        CausalVideoTokenizer.from_checkpoint(invalid)


# --------------------------------------------------------------------------------------------
# Bad input: one line that names the problem


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 0, 16, 16), "too few frames: 0"),
        ((1, 3, 6, 16, 16), "has 6 frames, which is not 1 \\+ 4k \\(use 5 or 9 frames\\)"),
        ((1, 3, 16, 16, 16), "has 16 frames, which is not 1 \\+ 4k \\(use 13 or 17 frames\\)"),
        ((1, 4, 5, 16, 16), "has 4 channels, expected 3 \\(RGB\\)"),
        ((1, 1, 5, 16, 16), "has 1 channels, expected 3 \\(RGB\\)"),
        ((1, 3, 5, 20, 16), "frames are 20x16, but height and width must be multiples of 8"),
        ((3, 5, 16, 16), "must be a video batch \\(B, 3, T, H, W\\), got shape \\(3, 5, 16, 16\\)"),
    ],
)
def test_bad_video_input_is_a_one_line_error(tiny, shape, message):
    with pytest.raises(WaltError, match=message) as info:
        tiny.encode(torch.zeros(shape))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 4, 3, 2, 2), "latent has 4 channels, expected 8"),
        ((1, 8, 0, 2, 2), "latent has too few frames"),
        ((8, 3, 2, 2), "latent must be \\(B, 8, t, h, w\\)"),
    ],
)
def test_bad_latent_input_is_a_one_line_error(tiny, shape, message):
    with pytest.raises(WaltError, match=message) as info:
        tiny.decode(torch.zeros(shape))
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_config_are_clear_errors():
    with pytest.raises(
        WaltError,
        match="unknown tokenizer preset 'huge' \\(choose from tiny, shapes, paper, paper-image\\)",
    ):
        CausalVideoTokenizer.from_preset("huge")
    with pytest.raises(
        WaltError, match="temporal_downsample needs one entry per downsampling step"
    ):
        CausalVideoTokenizer.from_preset("tiny", temporal_downsample=(True,))
