"""The generation pipeline and its commands on tiny cascades (CPU): determinism across batch
sizes, sidecar regeneration, exported bundles, image-to-video, clip continuation, extension,
and the one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from pipeline_helpers import FakeTextEncoder, make_run

from walt_cli.data.shapes_vocab import vocabulary
from walt_cli.errors import WaltError
from walt_cli.pipelines import Pipeline, export_bundle, read_bundle


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    """Tokenizer + class-conditional base (9x32x32) + x2 SR stage (9x64x64)."""
    return make_run(tmp_path_factory.mktemp("cascade") / "cascade", sample="steps: [2, 1]")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Tokenizer + class-conditional base only (9x32x32)."""
    return make_run(tmp_path_factory.mktemp("base") / "base", sr=False, sample="steps: [3]")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def _image(h: int = 40, w: int = 56) -> np.ndarray:
    """A smooth colour image (gradients and a disc), not square, so cover + crop is exercised."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, 128 + 0 * x], -1)
    img[(y - h / 2) ** 2 + (x - w / 3) ** 2 < (h / 4) ** 2] = (250, 40, 40)
    return img.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The pipeline


def test_seed_per_sample_is_independent_of_the_batch_through_sr(cascade):
    pipe = Pipeline.from_bundle(cascade, device="cpu")
    assert pipe.conditioning == "class" and [s.name for s in pipe.stages] == ["base", "sr1"]
    assert pipe.resolution == (64, 64) and pipe.clip_frames == 9
    four = pipe.generate(seeds=[5, 6, 7, 8], labels=[1, 2, 3, 4])
    assert four.shape == (4, 9, 64, 64, 3) and four.dtype == torch.uint8
    one = pipe.generate(seeds=[7], labels=[3])
    assert torch.equal(four[2:3], one)  # identical bytes at batch 4 and batch 1
    assert not torch.equal(four[0], four[1])
    assert set(pipe.timings) >= {"base", "sr1", "decode"}


def test_super_resolve_refines_a_given_low_res_latent(cascade):
    """SR stages alone from a low-res latent (what SR training previews use): deterministic by
    seed, batch-invariant on CPU, the SR stage's resolution, and low-res input that matters."""
    full = Pipeline.from_bundle(cascade, device="cpu")
    sr = full.stages[1]
    refiner = Pipeline(full.tokenizer, [sr], refine_only=True)
    with pytest.raises(WaltError, match="no base stage: use super_resolve"):
        refiner.generate(seeds=[0])
    with pytest.raises(WaltError, match="needs a base stage first"):
        Pipeline(full.tokenizer, [sr])
    torch.manual_seed(3)
    z_lr = torch.randn(3, 8, 3, 4, 4)  # raw latents of three 9x32x32 clips
    labels = [1, 2, 3] if sr.net.num_classes else None
    three = refiner.super_resolve(z_lr, seeds=[4, 5, 6], labels=labels, steps=2)
    assert three.shape == (3, 9, 64, 64, 3) and three.dtype == torch.uint8
    one = refiner.super_resolve(
        z_lr[1:2], seeds=[5], labels=labels[1:2] if labels else None, steps=2
    )
    assert torch.equal(three[1:2], one)
    other = refiner.super_resolve(
        z_lr[1:2] + 3.0, seeds=[5], labels=labels[1:2] if labels else None, steps=2
    )
    assert not torch.equal(other, one)  # the output follows its low-res input
    # The full cascade's SR stage refines a base output the same way.
    assert full.super_resolve(z_lr[1:2], seeds=[5], labels=labels[1:2] if labels else None,
                              steps=[1, 2]).equal(one)  # fmt: skip


def test_an_sr_stage_reads_only_the_conditions_it_was_built_for(tmp_path):
    run = make_run(tmp_path / "run", sr_cond=False, sample="steps: [1, 1]")
    pipe = Pipeline.from_bundle(run, device="cpu")
    assert pipe.stages[1].net.num_classes == 0
    video = pipe.generate(seeds=[0], labels=[1], guidance=[2.0, 2.0])
    assert video.shape == (1, 9, 64, 64, 3)


def test_guidance_values_per_stage(cascade):
    pipe = Pipeline.from_bundle(cascade, device="cpu")
    with pytest.raises(WaltError, match="one value or one per stage"):
        pipe.generate(seeds=[0], labels=[1], guidance=[2.0, 1.0, 1.0])
    plain = pipe.generate(seeds=[0], labels=[1], steps=[2, 1], guidance=1.0)
    again = pipe.generate(seeds=[0], labels=[1], steps=[2, 1], guidance=[1.0, 1.0])
    guided = pipe.generate(seeds=[0], labels=[1], steps=[2, 1], guidance=[3.0, 1.0])
    assert torch.equal(plain, again)
    assert not torch.equal(plain, guided)


def test_bf16_casts_the_bundles_weights_once_and_stays_close_to_fp32(cascade):
    """`precision="bf16"` is honoured on the CPU (it once ran fp32 there silently): the bundle's
    networks and tokenizer are loaded in bf16 and run without autocast, which would cast every
    weight again at every call; the video stays close to fp32's."""
    fp32 = Pipeline.from_bundle(cascade, device="cpu", precision="fp32")
    bf16 = Pipeline.from_bundle(cascade, device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    seen = {"fp32": [], "bf16": []}
    for name, pipe in (("fp32", fp32), ("bf16", bf16)):
        want = torch.float32 if name == "fp32" else torch.bfloat16
        assert {p.dtype for p in pipe.tokenizer.parameters()} == {want}
        for stage in pipe.stages:
            assert {p.dtype for p in stage.net.parameters()} == {want}
            stage.net.register_forward_hook(
                lambda m, i, o, key=name: seen[key].append((torch.is_autocast_enabled("cpu"),
                                                            i[0].dtype, o.dtype))
            )  # fmt: skip
    a = fp32.generate(seeds=[3], labels=[1])
    b = bf16.generate(seeds=[3], labels=[1])
    assert set(seen["fp32"]) == {(False, torch.float32, torch.float32)}
    assert set(seen["bf16"]) == {(False, torch.bfloat16, torch.bfloat16)}
    assert a.shape == b.shape and b.dtype == torch.uint8
    assert _psnr(a.numpy(), b.numpy()) > 25


def test_fp32_weights_sample_under_autocast_at_bf16(cascade):
    """A pipeline built around live fp32 networks (the training previews) keeps their weights
    and runs them under bf16 autocast when asked for bf16."""
    loaded = Pipeline.from_bundle(cascade, device="cpu", precision="fp32")
    pipe = Pipeline(loaded.tokenizer, loaded.stages, precision="bf16")
    seen = []
    pipe.base.net.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), i[0].dtype))
    )
    pipe.generate(seeds=[3], labels=[1], steps=[2, 1])
    assert set(seen) == {(True, torch.float32)}
    assert {p.dtype for p in pipe.base.net.parameters()} == {torch.float32}


def test_guided_batch_invariant_sampling_runs_each_samples_two_rows_together(cascade):
    """Batch-invariant guidance runs a sample's conditional and unconditional rows as one batch
    of two (half the calls of one row at a time) and still gives every seed the same bytes at
    any batch size; unguided calls stay one row at a time."""
    pipe = Pipeline.from_bundle(cascade, device="cpu")
    calls = {"base": [], "sr1": []}
    for stage in pipe.stages:
        stage.net.register_forward_hook(
            lambda m, i, o, key=stage.name: calls[key].append(i[2].labels.tolist())
        )
    three = pipe.generate(seeds=[5, 6, 7], labels=[1, 2, 3], steps=[2, 1], guidance=[3.0, 1.0])
    null = -1
    assert calls["base"] == [[1, null], [2, null], [3, null]] * 2  # two guided steps
    assert calls["sr1"] == [[1], [2], [3]]  # unguided (scale 1): one row at a time
    one = pipe.generate(seeds=[6], labels=[2], steps=[2, 1], guidance=[3.0, 1.0])
    assert torch.equal(three[1:2], one)


def test_extension_keeps_the_unextended_clip(base_run):
    pipe = Pipeline.from_bundle(base_run, device="cpu")
    short = pipe.generate(seeds=[3], labels=[2])
    long = pipe.generate(seeds=[3], labels=[2], num_frames=17)  # 9 -> 13 -> 17
    assert long.shape[1] == 17
    assert torch.equal(long[:, :9], short)
    with pytest.raises(WaltError, match="use 9 or 13"):
        pipe.generate(seeds=[3], labels=[2], num_frames=11)


def test_animate_first_frame_is_the_image_through_the_cascade(cascade):
    from walt_cli.data.video import frames_to_tensor, resize_crop, tensor_to_frames

    pipe = Pipeline.from_bundle(cascade, device="cpu")
    image = _image()
    video = pipe.animate(torch.from_numpy(image), seeds=[0], labels=[1])
    assert video.shape == (1, 9, 64, 64, 3)
    target = resize_crop(frames_to_tensor(image[None]), "cover", (64, 64))  # (3, 1, 64, 64)
    with torch.no_grad():
        recon = pipe.tokenizer(target[None])[0]
    want = tensor_to_frames(target)[0]
    own = _psnr(tensor_to_frames(recon)[0], want)
    got = _psnr(video[0, 0].numpy(), want)
    assert got >= own - 0.5, (got, own)


def test_continuing_a_clip_starts_with_its_last_frames(base_run):
    from walt_cli.data.video import frames_to_tensor, tensor_to_frames

    pipe = Pipeline.from_bundle(base_run, device="cpu")
    g = torch.Generator().manual_seed(0)
    clip = (torch.rand(12, 32, 32, 3, generator=g) * 255).to(torch.uint8)
    clip[:, 8:24, 8:24] = 200  # some structure beside the noise
    out = pipe.continue_video(clip, seeds=[1], labels=[4])
    assert out.shape == (1, 9, 32, 32, 3)
    last = clip[-5:].numpy()
    with torch.no_grad():
        recon = tensor_to_frames(pipe.tokenizer(frames_to_tensor(last)[None])[0])
    own = _psnr(recon, last)
    assert _psnr(out[0, :5].numpy(), last) >= own - 0.5


def test_loss_input_builder_is_what_the_pipeline_feeds(base_run, monkeypatch):
    """The pipeline's frame-conditioned steps go through diffusion.inputs.model_input."""
    import walt_cli.diffusion.samplers as samplers

    calls = []
    real = samplers.model_input

    def spy(*args, **kwargs):
        calls.append(kwargs.get("frame_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "model_input", spy)
    pipe = Pipeline.from_bundle(base_run, device="cpu")
    pipe.animate(torch.from_numpy(_image()), seeds=[0], labels=[0], steps=2)
    assert len(calls) == 2 and all(m is not None and m[:, 0].all() for m in calls)


def test_text_models_take_prompts_and_refuse_classes(tmp_path):
    run = make_run(tmp_path / "t2v", sr=False, text=True, sample="steps: [2]")
    pipe = Pipeline.from_bundle(run, device="cpu", text_encoder=FakeTextEncoder())
    assert pipe.conditioning == "text"
    a = pipe.generate(seeds=[0, 1], prompts=["a red circle", "a blue square"])
    b = pipe.generate(seeds=[1], prompts=["a blue square"])
    assert torch.equal(a[1:], b)
    assert torch.equal(pipe.generate(seeds=[2], prompts=[None]), pipe.generate(seeds=[2]))
    with pytest.raises(WaltError, match="not class-conditional"):
        pipe.generate(seeds=[0], labels=[1])


# ---------------------------------------------------------------------------------------------
# Bundles


def test_exported_bundle_samples_as_the_run_and_checks_its_files(cascade, tmp_path):
    out = export_bundle(cascade, tmp_path / "bundle")
    index = json.loads((out / "walt_bundle.json").read_text())
    assert index["format"] == "walt-bundle" and [s["name"] for s in index["stages"]] == [
        "base",
        "sr1",
    ]
    assert index["stages"][0]["resolution"] == [32, 32] and index["sample"]["steps"] == [2, 1]
    assert index["vocabulary"] == vocabulary()  # a shapes run: its caption words
    assert read_bundle(out).hashes == read_bundle(cascade).hashes
    from_run = Pipeline.from_bundle(cascade, device="cpu").generate(seeds=[4], labels=[2])
    from_bundle = Pipeline.from_bundle(out, device="cpu").generate(seeds=[4], labels=[2])
    assert torch.equal(from_run, from_bundle)

    with pytest.raises(WaltError, match="not empty"):
        export_bundle(cascade, out)

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = bytearray((broken / "sr1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "sr1.safetensors").write_bytes(bytes(data))
    with pytest.raises(WaltError, match="sha256"):
        read_bundle(broken)
    (broken / "sr1.safetensors").unlink()
    with pytest.raises(WaltError, match="sr1 file sr1.safetensors is missing"):
        read_bundle(broken)


def test_a_stage_from_another_tokenizer_is_refused(tmp_path):
    a = make_run(tmp_path / "a", sr=False)
    from walt_cli.models.tokenizer import CausalVideoTokenizer

    tok = CausalVideoTokenizer.from_preset("tiny", eps=1e-5)
    tok.save(a / "tokenizer" / "tokenizer.safetensors")
    with pytest.raises(WaltError, match="trained on latents of tokenizer"):
        read_bundle(a)


def test_the_default_model_is_a_clear_error_until_installed(cli, tmp_path, monkeypatch):
    import walt_cli.pipelines.bundle as bundle

    monkeypatch.setattr(bundle, "default_model_dir", lambda: tmp_path / "nothing")
    result = cli("sample", "--class", "1", "--out", tmp_path / "x.mp4", "--no-progress")
    assert result.exit_code == 2
    assert "default model is not installed" in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Commands


def test_sample_cli_is_deterministic_across_batch_sizes_and_from_its_sidecar(
    cli, base_run, tmp_path
):
    args = ["sample", "--model", base_run, "--class", "circle moving left", "-n", "4"]
    a = cli(*args, "--batch-size", "4", "--out", tmp_path / "a", "--no-progress")
    assert a.exit_code == 0, a.output
    b = cli(*args, "--batch-size", "1", "--out", tmp_path / "b", "--no-progress")
    assert b.exit_code == 0, b.output
    files = sorted((tmp_path / "a").glob("*.mp4"))
    assert len(files) == 4
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    side = json.loads(files[2].with_suffix(".json").read_text())
    assert side["samples"] == [
        {"prompt": None, "class": 0, "class_name": "circle moving left", "seed": 2}
    ]
    assert side["model_hashes"]["base"] and side["steps"] == [3] and side["fps"] == 8.0
    assert {"base", "decode"} <= set(side["timings_s"]) and side["walt_version"]
    c = cli("sample", "--from", files[2].with_suffix(".json"), "--out", tmp_path / "c.mp4",
            "--no-progress")  # fmt: skip
    assert c.exit_code == 0, c.output
    assert (tmp_path / "c.mp4").read_bytes() == files[2].read_bytes()


def test_extended_file_has_the_requested_frames_and_fps(cli, base_run, tmp_path):
    import decord

    out = tmp_path / "long.mp4"
    r = cli("sample", "--model", base_run, "--class", "3", "--frames", "17", "--fps", "12",
            "--out", out, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    reader = decord.VideoReader(str(out))
    assert len(reader) == 17 and reader.get_avg_fps() == pytest.approx(12.0)
    sheet = tmp_path / "sheet.png"
    r = cli("sample", "--model", base_run, "--class", "3", "-n", "2", "--out", sheet,
            "--steps", "1", "--no-progress")  # fmt: skip
    assert r.exit_code == 0 and sheet.is_file() and sheet.with_suffix(".json").is_file()


def test_animate_cli_and_its_errors(cli, base_run, tmp_path):
    from walt_cli.data.video import write_image

    img = write_image(tmp_path / "in.png", _image())
    out = tmp_path / "anim.gif"
    r = cli("animate", img, "--model", base_run, "--class", "2", "--steps", "2", "--out", out,
            "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["request"]["kind"] == "animate" and side["request"]["input_sha256"]
    again = cli("sample", "--from", out.with_suffix(".json"), "--out", tmp_path / "again.gif",
                "--no-progress")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.gif").read_bytes() == out.read_bytes()

    fake = tmp_path / "notimage.png"
    fake.write_text("hello")
    r = cli("animate", fake, "--model", base_run, "--out", tmp_path / "x.mp4", "--no-progress")
    assert r.exit_code == 2 and "not an image" in r.output
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class", "1", "--frames", "11"], "use 9 or 13"),
        (["--class", "1", "--guidance", "1,2"], "one value or one per stage"),
        (["--class", "1", "--steps", "0"], "--steps: 0 is below 1"),
        (["--class", "1", "--guidance", "two"], "--guidance: 'two' is not a number"),
        (["--class", "no such class"], "unknown class"),
        (["--class", "99"], "class ids run from 0 to 9"),
        (["a red circle"], "class-conditional"),
        ([], "pass --class"),
        (["--class", "1", "--out", "FILE/sub/x.mp4"], "not a writable directory"),
        (["--prompts", "EMPTY"], "holds no prompts"),
    ],
)
def test_sample_errors_are_one_line_and_leave_nothing(cli, base_run, tmp_path, args, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "EMPTY").write_text("\n\n")
    args = [str(tmp_path / a) if a in ("FILE/sub/x.mp4", "EMPTY") else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    r = cli("sample", "--model", base_run, *args, *out, "--no-progress")
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_text_model_without_its_encoder_is_a_one_line_error(cli, tmp_path):
    run = make_run(tmp_path / "t2v", sr=False, text=True, sample="steps: [1]")
    r = cli("sample", "a red circle", "--model", run, "--out", tmp_path / "o", "--no-progress")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    r = cli("sample", "--class", "1", "--model", run, "--out", tmp_path / "o", "--no-progress")
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_export_cli(cli, base_run, tmp_path):
    r = cli("export", base_run, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "walt_bundle.json").is_file()
    # A rerun (make default-model) replaces a bundle only when asked, and nothing but a bundle.
    before = (tmp_path / "b" / "walt_bundle.json").read_text()
    r = cli("export", base_run, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "--force" in r.output
    (tmp_path / "b" / "base.safetensors").write_bytes(b"stale")
    r = cli("export", base_run, "--out", tmp_path / "b", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "walt_bundle.json").read_text() == before
    assert read_bundle(tmp_path / "b").hashes == read_bundle(base_run).hashes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = cli("export", base_run, "--out", other, "--force")
    assert r.exit_code == 2 and "not a bundle" in r.output
    assert (other / "keep.txt").read_text() == "mine"
    r = cli("export", tmp_path / "missing", "--out", tmp_path / "c")
    assert r.exit_code == 2 and not (tmp_path / "c").exists()


def test_model_samples_for_fvd_resume_and_follow_the_real_labels(base_run, tmp_path):
    from walt_cli.pipelines.evaluation import generate_set

    real = tmp_path / "real.jsonl"
    real.write_text(
        '{"path": "a.mp4", "label": 3}\n{"path": "b.mp4", "label": "circle moving up"}\n'
    )
    out = tmp_path / "samples"
    info = generate_set(str(base_run), str(real), out, num_samples=2, steps=[1], accelerator="cpu")
    assert (info["made"], info["kept"], info["task"]) == (2, 0, "class")
    assert "2 labelled real clips" in info["conditions"]
    assert (out / "samples-2.txt").read_text().split() == ["sample-000000", "sample-000001"]
    stamp = (out / "sample-000000" / "0000.png").stat().st_mtime_ns
    info = generate_set(str(base_run), str(real), out, num_samples=3, steps=[1], accelerator="cpu")
    assert (info["made"], info["kept"]) == (1, 2)
    assert len(list((out / "sample-000002").glob("*.png"))) == 9
    assert (out / "sample-000000" / "0000.png").stat().st_mtime_ns == stamp
    with pytest.raises(WaltError, match="other settings"):
        generate_set(str(base_run), str(real), out, num_samples=3, steps=[2], accelerator="cpu")


@pytest.mark.slow
def test_eval_fvd_of_a_models_samples_writes_json_and_resumes(
    cli, base_run, tmp_path, monkeypatch, assets
):
    from walt_cli.data.video import write_video

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WALT_ASSETS", str(assets))
    real = tmp_path / "real"
    g = np.random.default_rng(0)
    for k in range(3):
        write_video(real / f"r{k}.mp4", g.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8))
    fake, out = tmp_path / "samples", tmp_path / "fvd.json"
    args = ["eval-fvd", "--model", base_run, "--real", real, "--fake", fake, "--protocol",
            "raw", "--steps", "1", "--json", out]  # fmt: skip
    r = cli(*args, "-n", "2", "--max-fvd", "1e9")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "raw" and data["num_samples"] == 2 and data["num_fake"] == 2
    assert data["model"]["model_hashes"] == read_bundle(base_run).hashes
    assert data["model"]["task"] == "class" and data["passed"] is True
    assert data["model"]["made"] == 2 and data["model"]["kept"] == 0
    first = sorted((fake / "sample-000000").glob("*.png"))
    assert len(first) == 9
    stamp = first[0].stat().st_mtime_ns
    r = cli(*args, "-n", "3")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert (data["model"]["made"], data["model"]["kept"], data["num_fake"]) == (1, 2, 3)
    assert first[0].stat().st_mtime_ns == stamp  # kept, not rewritten
    r = cli(*args[:-1], tmp_path / "other.json", "-n", "3", "--guidance", "2")
    assert r.exit_code == 2 and "other settings" in r.output


def test_tiled_decoding_blends_to_the_whole_for_a_local_decoder():
    """With a decoder that maps each latent pixel to its own 8x8 block, tiles blended back
    equal decoding the whole grid; a grid within one tile is decoded whole."""
    from walt_cli.pipelines.cascade import decode_tiled

    def decode(z):
        return z[:, :3].repeat_interleave(8, -2).repeat_interleave(8, -1)

    z = torch.randn(2, 8, 3, 20, 28)
    whole = decode(z)
    tiled = decode_tiled(decode, z, tile=8, overlap=3, factor=8)
    assert tiled.shape == (2, 3, 3, 160, 224)
    torch.testing.assert_close(tiled, whole)
    calls = []
    decode_tiled(lambda p: calls.append(p.shape) or decode(p), z, tile=32, overlap=8, factor=8)
    assert calls == [z.shape]
