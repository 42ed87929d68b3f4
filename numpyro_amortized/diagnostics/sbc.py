"""Simulation-based calibration: ranks of the truth among posterior draws, and their test.

If the posterior is right, the rank of the true latent among ``L`` posterior draws, over
datasets simulated from the prior predictive, is uniform on ``{0, ..., L}`` (Talts et al. 2018).
The test here is the ECDF of the fractional ranks against simultaneous 95% bands (Säilynoja,
Bürkner & Vehtari 2022): it looks at every quantile at once, so one test per latent keeps its
level, and it returns a p-value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = ["ECDFBands", "SBCResult", "ecdf_bands", "sbc_ranks", "sbc_test"]


class SBCResult(NamedTuple):
    """Ranks and their test, per latent column.

    :param ranks: ``(M, D)`` integer ranks in ``[0, L]``.
    :param num_draws: ``L``, posterior draws per dataset.
    :param names: the column names.
    :param p_values: ``(D,)`` p-values of the ECDF test (small: not uniform).
    :param in_bands: ``(D,)`` whether each ECDF stays inside the simultaneous 95% bands.
    """

    ranks: np.ndarray
    num_draws: int
    names: list
    p_values: np.ndarray
    in_bands: np.ndarray


class ECDFBands(NamedTuple):
    """Simultaneous bands for the ECDF of ``n`` uniform draws, evaluated at ``z``."""

    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    null_gammas: np.ndarray


def sbc_ranks(draws, truths):
    """Rank of each truth among its posterior draws.

    :param draws: ``(M, L, D)`` posterior draws for ``M`` datasets.
    :param truths: ``(M, D)`` the latents that generated each dataset.
    :return: ``(M, D)`` integers: the number of draws below the truth.
    """
    draws = np.asarray(draws)
    truths = np.asarray(truths)
    return np.sum(draws < truths[:, None, :], axis=1)


def _gamma_statistic(u, z):
    """``2 min_z min(F(n ecdf(z)), 1 - F(n ecdf(z) - 1))`` with F the Binomial(n, z) CDF:
    how far into the tails the ECDF of ``u`` (columns) goes, at its worst point."""
    n = u.shape[0]
    counts = np.stack([np.sum(u <= zi, axis=0) for zi in z])  # (K, C)
    lo = stats.binom.cdf(counts, n, z[:, None])
    hi = 1.0 - stats.binom.cdf(counts - 1, n, z[:, None])
    return 2.0 * np.min(np.minimum(lo, hi), axis=0)


def ecdf_bands(n, *, num_points=None, alpha=0.05, num_null=1000, seed=0) -> ECDFBands:
    """Simultaneous ``1 - alpha`` bands for the ECDF of ``n`` uniform draws (simulation method
    of Säilynoja et al. 2022): the pointwise level ``gamma`` is chosen so that the ECDF of
    uniform draws stays inside the pointwise Binomial bands at every point with probability
    ``1 - alpha``.

    :param num_points: evaluation points ``z = 1/K, ..., (K-1)/K`` (default ``min(n, 100)``).
    """
    k = int(num_points or min(n, 100))
    z = np.arange(1, k) / k
    rng = np.random.default_rng(seed)
    null = _gamma_statistic(rng.random((n, num_null)), z)
    gamma = float(np.quantile(null, alpha))
    lower = stats.binom.ppf(gamma / 2, n, z) / n
    upper = stats.binom.ppf(1 - gamma / 2, n, z) / n
    return ECDFBands(z, lower, upper, gamma, null)


def fractional_ranks(ranks, num_draws, seed=0):
    """Ranks in ``[0, L]`` as uniform values in ``(0, 1)`` (jittered within their bin)."""
    rng = np.random.default_rng(seed)
    return (np.asarray(ranks) + rng.random(np.shape(ranks))) / (num_draws + 1)


def sbc_test(ranks, num_draws, names=None, *, alpha=0.05) -> SBCResult:
    """Test the uniformity of SBC ranks per latent with the ECDF simultaneous-band test.

    :param ranks: ``(M, D)`` ranks from :func:`sbc_ranks`.
    :param num_draws: ``L``, posterior draws per dataset.
    :return: an :class:`SBCResult`; ``p_values < alpha`` exactly where an ECDF leaves the bands.

    **Example**::

        res = sbc_test(sbc_ranks(draws, truths), draws.shape[1])
        res.p_values

    **References:** Talts, Betancourt, Simpson, Vehtari & Gelman (2018), *Validating Bayesian
    inference algorithms with simulation-based calibration*; Säilynoja, Bürkner & Vehtari
    (2022), *Graphical test for discrete uniformity and its applications in goodness-of-fit
    evaluation and multiple sample comparison*, Statistics and Computing.
    """
    ranks = np.asarray(ranks)
    m, d = ranks.shape
    u = fractional_ranks(ranks, num_draws)
    bands = ecdf_bands(m, alpha=alpha)
    gammas = _gamma_statistic(u, bands.z)
    p = np.array([(np.sum(bands.null_gammas <= g) + 1) / (len(bands.null_gammas) + 1)
                  for g in gammas])
    names = list(names) if names is not None else [f"theta[{j}]" for j in range(d)]
    return SBCResult(ranks, int(num_draws), names, p, gammas >= bands.gamma)
