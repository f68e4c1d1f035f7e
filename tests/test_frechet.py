"""Fréchet maths: streaming statistics against numpy, the distance against scipy's sqrtm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from walt_cli.errors import WaltError
from walt_cli.metrics.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_stats,
    merge_packed,
    trace_sqrt_product,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


def _scipy_fd(a: np.ndarray, b: np.ndarray, ddof: int = 1) -> float:
    """The reference: np.mean / np.cov and scipy.linalg.sqrtm of the product, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    )


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("ddof", [0, 1])
def test_streaming_stats_equal_numpy(ddof):
    x = _feats(203, 16, 0, shift=3.0)
    stats = FeatureStats(16)
    for chunk in np.array_split(x, [1, 50, 51, 130]):  # uneven chunks, one of size 1
        stats.update(torch.from_numpy(chunk))
    assert stats.num == 203
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        stats.cov(ddof), np.cov(x, rowvar=False, ddof=ddof), rtol=1e-12, atol=1e-12
    )


def test_merge_is_exact_and_order_free():
    x = _feats(90, 12, 1)
    parts = [FeatureStats.from_features(p) for p in np.array_split(x, [10, 55])]
    whole = FeatureStats.from_features(x)
    merged = merge_packed(torch.stack([p.vector for p in parts]))
    reversed_ = merge_packed(torch.stack([p.vector for p in parts[::-1]]))
    torch.testing.assert_close(merged, whole.vector, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(reversed_, whole.vector, rtol=1e-12, atol=1e-10)
    a = FeatureStats.from_features(x[:40]).merge(FeatureStats.from_features(x[40:]))
    np.testing.assert_allclose(a.cov(), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-12)
    # merging with an empty stream changes nothing
    torch.testing.assert_close(
        merge_packed(torch.stack([whole.vector, FeatureStats(12).vector])), whole.vector
    )


def test_large_offset_keeps_precision():
    # Raw-moment sums (sum x x^T - n mu mu^T) lose every digit here; the centred merge does not.
    x = _feats(64, 8, 2) + 1e7
    stats = FeatureStats(8)
    for chunk in np.array_split(x, 8):
        stats.update(chunk)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n, d", [(500, 20), (30, 64), (12, 400)])  # full rank, then singular
def test_distance_matches_scipy_sqrtm(n, d):
    a, b = _feats(n, d, 3), _feats(n, d, 4, shift=0.5)
    ours = frechet_distance_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))
    ref = _scipy_fd(a, b)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6 * np.trace(np.cov(a, rowvar=False)))


@pytest.mark.parametrize("na, nb", [(11, 11), (12, 30), (300, 200)])
def test_trace_term_is_exact_for_singular_covariances(na, nb):
    # With S = A^T A / (n - 1) for centred A, tr((S1 S2)^{1/2}) is the nuclear norm of
    # A B^T / sqrt((na - 1)(nb - 1)): an exact reference where sqrtm loses ~1e-7 (relative).
    a, b = _feats(na, 400, 8), _feats(nb, 400, 9, shift=0.3)
    ca, cb = a - a.mean(0), b - b.mean(0)
    exact = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((na - 1) * (nb - 1))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-12)
    assert trace_sqrt_product(s2, s1) == pytest.approx(exact, rel=1e-12)


def test_distance_of_a_set_to_itself_is_zero_and_symmetric():
    a, b = _feats(40, 400, 5), _feats(40, 400, 6, shift=0.2)
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    tr = np.trace(sa.cov())
    assert abs(frechet_distance_from_stats(sa, sa)) <= 1e-6 * tr
    ab, ba = frechet_distance_from_stats(sa, sb), frechet_distance_from_stats(sb, sa)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-12)


def test_closed_forms():
    # Equal covariances: only the mean term is left.
    s = np.cov(_feats(50, 10, 7), rowvar=False)
    mu1, mu2 = np.zeros(10), np.arange(10.0)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(mu2 @ mu2), rel=1e-9)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 for the covariance term.
    a, b = np.diag([1.0, 4.0, 0.0]), np.diag([9.0, 1.0, 0.0])
    assert frechet_distance(np.zeros(3), a, np.zeros(3), b) == pytest.approx(4.0 + 1.0)
    assert trace_sqrt_product(a, b) == pytest.approx(3.0 + 2.0)


def test_too_few_samples_is_a_clear_error():
    one = FeatureStats.from_features(np.ones((1, 4)))
    two = FeatureStats.from_features(np.eye(4)[:2])
    with pytest.raises(WaltError, match="at least 2"):
        frechet_distance_from_stats(one, two)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        two.update(np.ones((3, 5)))
