"""Fréchet distance between Gaussians fitted to detector features (FVD, FID): the pure maths.

Two pieces, both in float64:

* :class:`FeatureStats` accumulates the mean and the centred scatter matrix of a stream of feature
  vectors (Welford / Chan et al.), and merges exactly with the statistics of another process.
  Its state packs into one flat vector, which is what a torchmetrics state reduced across DDP
  ranks needs (:func:`merge_packed`).
* :func:`frechet_distance` evaluates
  ``||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})``.

The trace of the matrix square root is computed from symmetric eigendecompositions: with
``S_1 = V diag(l) V^T`` and ``R = V diag(sqrt(l)) V^T``, ``S_1 S_2`` is similar to the symmetric
positive semi-definite ``R S_2 R``, so ``tr((S_1 S_2)^{1/2})`` is the sum of the square roots of
the eigenvalues of ``R S_2 R``. This stays exact when both covariances are singular (N clips
against D > N feature dimensions), where a general ``sqrtm`` of the non-symmetric product can
return complex parts or lose digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from walt_cli.errors import WaltError


def packed_size(dim: int) -> int:
    """Length of the flat vector holding (n, mean, scatter) for `dim`-dimensional features."""
    return 1 + dim + dim * dim


def packed_dim(length: int) -> int:
    """Inverse of :func:`packed_size`."""
    dim = int(round((-1 + math.sqrt(1 + 4 * (length - 1))) / 2))
    if packed_size(dim) != length:
        raise ValueError(f"{length} is not the length of packed feature statistics")
    return dim


def _merge(
    n_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise merge of (count, mean, centred scatter)."""
    n = n_a + n_b
    if float(n) == 0:
        return n, mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
    return n, mean, m2


def merge_packed(stacked: torch.Tensor) -> torch.Tensor:
    """Merge packed statistics stacked along dim 0 (the torchmetrics `dist_reduce_fx` contract)."""
    if stacked.ndim == 1:
        return stacked
    dim = packed_dim(stacked.shape[-1])
    out = stacked[0]
    for other in stacked[1:]:
        n, mean, m2 = _merge(*_unpack(out, dim), *_unpack(other, dim))
        out = _pack(n, mean, m2)
    return out


def _unpack(vec: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return vec[0], vec[1 : 1 + dim], vec[1 + dim :].view(dim, dim)


def _pack(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    return torch.cat([n.reshape(1), mean.reshape(-1), m2.reshape(-1)])


class FeatureStats:
    """Streaming mean and covariance of feature vectors, in float64, mergeable across processes.

    >>> s = FeatureStats(400); s.update(feats_a); s.update(feats_b)   # feats: (B, 400)
    >>> mu, sigma = s.mean, s.cov()              # unbiased (N - 1) covariance, as np.cov
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        self.dim = dim
        self.vector = torch.zeros(packed_size(dim), dtype=torch.float64, device=device)

    @classmethod
    def from_packed(cls, vector: torch.Tensor) -> FeatureStats:
        """Wrap a packed vector (as kept in a metric state); the vector is shared, not copied."""
        out = cls.__new__(cls)
        out.dim = packed_dim(vector.numel())
        out.vector = vector
        return out

    @classmethod
    def from_features(cls, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        """Statistics of a whole (N, D) feature matrix."""
        feats = torch.as_tensor(feats)
        out = cls(feats.shape[1])
        out.update(feats)
        return out

    @property
    def num(self) -> int:
        return int(self.vector[0].item())

    @property
    def mean(self) -> np.ndarray:
        return self.vector[1 : 1 + self.dim].cpu().numpy().copy()

    def cov(self, ddof: int = 1) -> np.ndarray:
        """Covariance: the scatter matrix over (N - ddof). ddof=1 is np.cov's unbiased default."""
        n = self.num
        if n - ddof <= 0:
            raise WaltError(f"a covariance needs more than {ddof} sample(s), got {n}")
        m2 = self.vector[1 + self.dim :].view(self.dim, self.dim).cpu().numpy()
        return m2 / (n - ddof)

    def update(self, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of feature vectors (B, D); accumulation is float64 on the state's device."""
        feats = torch.as_tensor(feats).to(device=self.vector.device, dtype=torch.float64)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(
                f"expected features of shape (B, {self.dim}), got {tuple(feats.shape)}"
            )
        if feats.shape[0] == 0:
            return self
        n_b = torch.tensor(float(feats.shape[0]), dtype=torch.float64, device=feats.device)
        mean_b = feats.mean(0)
        centred = feats - mean_b
        m2_b = centred.T @ centred
        merged = _merge(*_unpack(self.vector, self.dim), n_b, mean_b, m2_b)
        self.vector.copy_(_pack(*merged))
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold in the statistics of another stream (e.g. another rank's); exact, order-free."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self.vector.copy_(merge_packed(torch.stack([self.vector, other.vector.to(self.vector)])))
        return self


def _psd_eigvals(vals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with the numerically-zero ones set to exactly zero.

    Rounding leaves the null space of a singular covariance with eigenvalues of order
    eps * lambda_max of either sign; their square roots (~1e-8 * sqrt(lambda_max) each, hundreds
    of them for N << D) would bias the trace. The cut is numpy's matrix_rank tolerance.
    """
    cut = max(float(vals.max(initial=0.0)), 0.0) * vals.shape[0] * np.finfo(np.float64).eps
    return np.where(vals > cut, vals, 0.0)


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(_psd_eigvals(vals))) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 @ sigma2)^{1/2}) for symmetric PSD matrices, exact for singular ones too."""
    root = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(_psd_eigvals(vals)).sum())


@dataclass(frozen=True)
class FrechetTerms:
    """The two parts of the distance: ||mu_1 - mu_2||^2 and the covariance term."""

    mean_term: float
    cov_term: float

    @property
    def distance(self) -> float:
        return self.mean_term + self.cov_term


def frechet_terms(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> FrechetTerms:
    """Both terms of the Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise WaltError("feature covariance has NaN/inf entries (the detector saw NaN inputs?)")
    diff = mu1 - mu2
    cov = np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return FrechetTerms(float(diff @ diff), float(cov))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), in float64."""
    return frechet_terms(mu1, sigma1, mu2, sigma2).distance


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats, *, ddof: int = 1) -> float:
    """Fréchet distance between two :class:`FeatureStats` (each needs at least two samples)."""
    for name, s in (("first", a), ("second", b)):
        if s.num < 2:
            raise WaltError(
                f"the {name} set has {s.num} sample(s); a Fréchet distance needs at least 2 per side"
            )
    return frechet_distance(a.mean, a.cov(ddof), b.mean, b.cov(ddof))
