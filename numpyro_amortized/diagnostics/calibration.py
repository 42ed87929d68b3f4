"""Coverage, TARP, recovery and posterior contraction, from draws and the true latents.

All functions take posterior draws ``(M, L, D)`` for ``M`` simulated datasets and the latents
``(M, D)`` that generated them, so they apply to any posterior: the amortized guide, an exact
sampler, or MCMC.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    "CoverageResult",
    "RecoveryResult",
    "TARPResult",
    "coverage",
    "recovery",
    "tarp",
]


class CoverageResult(NamedTuple):
    """Empirical coverage of central credible intervals.

    :param levels: ``(K,)`` nominal levels.
    :param coverage: ``(K, D)`` fraction of truths inside the central interval of each level.
    :param calibration_error: ``(D,)`` mean absolute difference between empirical and nominal
        coverage over the levels (0 for a calibrated posterior).
    :param stderr: ``(K,)`` binomial standard error of a coverage at each level.
    """

    levels: np.ndarray
    coverage: np.ndarray
    calibration_error: np.ndarray
    stderr: np.ndarray


def coverage(draws, truths, levels=None) -> CoverageResult:
    """Expected coverage of central credible intervals at all levels.

    :param levels: nominal levels (default 0.01, 0.02, ..., 0.99).
    :return: a :class:`CoverageResult`; under-coverage means overconfidence.
    """
    draws, truths = np.asarray(draws), np.asarray(truths)
    levels = np.arange(1, 100) / 100 if levels is None else np.asarray(levels)
    frac = np.mean(draws < truths[:, None, :], axis=1)  # (M, D) fractional rank
    lo = (1 - levels[:, None, None]) / 2
    inside = (frac[None] >= lo) & (frac[None] <= 1 - lo)
    cov = inside.mean(axis=1)
    err = np.mean(np.abs(cov - levels[:, None]), axis=0)
    se = np.sqrt(levels * (1 - levels) / len(truths))
    return CoverageResult(levels, cov, err, se)


class TARPResult(NamedTuple):
    """TARP: expected coverage of balls around random reference points.

    :param levels: ``(K,)`` credibility levels.
    :param ecp: ``(K,)`` expected coverage probability at each level.
    :param atc: area between the ECP curve and the diagonal (> 0: underconfident,
        < 0: overconfident, 0: calibrated).
    :param ks_p_value: p-value of the Kolmogorov-Smirnov test that the coverage fractions are
        uniform (small: not calibrated).
    :param fractions: ``(M,)`` per dataset, the posterior mass closer to the reference than
        the truth is.
    """

    levels: np.ndarray
    ecp: np.ndarray
    atc: float
    ks_p_value: float
    fractions: np.ndarray


def tarp(draws, truths, *, references=None, seed=0, num_levels=100) -> TARPResult:
    """Tests of Accuracy with Random Points (Lemos et al. 2023), a joint calibration test.

    Coordinates are standardized by the truths' mean and sd; reference points are drawn
    uniformly in the box the truths span (or given).

    **References:** Lemos, Coogan, Hezaveh & Perreault-Levasseur (2023), *Sampling-based
    accuracy testing of posterior estimators for general inference*, ICML.
    """
    draws, truths = np.asarray(draws, np.float64), np.asarray(truths, np.float64)
    loc, sd = truths.mean(0), truths.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    draws, truths = (draws - loc) / sd, (truths - loc) / sd
    if references is None:
        rng = np.random.default_rng(seed)
        references = rng.uniform(truths.min(0), truths.max(0), size=truths.shape)
    else:
        references = (np.asarray(references, np.float64) - loc) / sd
    d_truth = np.linalg.norm(truths - references, axis=-1)  # (M,)
    d_draws = np.linalg.norm(draws - references[:, None, :], axis=-1)  # (M, L)
    fractions = np.mean(d_draws < d_truth[:, None], axis=1)
    levels = np.linspace(0, 1, num_levels + 1)
    ecp = np.mean(fractions[None, :] < levels[:, None], axis=1)
    gap = ecp - levels
    atc = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(levels)))
    ks = stats.kstest(fractions, "uniform")
    return TARPResult(levels, ecp, atc, float(ks.pvalue), fractions)


class RecoveryResult(NamedTuple):
    """Posterior means against truths, and z-scores against contraction, per latent.

    :param mean: ``(M, D)`` posterior means; :param sd: ``(M, D)`` posterior sds.
    :param r2: ``(D,)`` R^2 of the posterior mean as a predictor of the truth.
    :param z_score: ``(M, D)`` ``(mean - truth) / sd``.
    :param contraction: ``(M, D)`` ``1 - sd_post / sd_prior``.
    :param z_score_sd: ``(D,)`` sd of the z-scores (about 1 when calibrated; > 1:
        overconfident).
    """

    mean: np.ndarray
    sd: np.ndarray
    r2: np.ndarray
    z_score: np.ndarray
    contraction: np.ndarray
    z_score_sd: np.ndarray


def recovery(draws, truths, prior_sd=None) -> RecoveryResult:
    """Recovery (posterior mean vs truth, R^2) and posterior z-score vs contraction.

    :param prior_sd: ``(D,)`` prior sds (default: the sd of the truths, which are prior draws).

    **References:** Schad, Betancourt & Vasishth (2021), *Toward a principled Bayesian
    workflow in cognitive science*; Radev et al. (2023), *BayesFlow: Amortized Bayesian
    workflows with neural networks*.
    """
    draws, truths = np.asarray(draws, np.float64), np.asarray(truths, np.float64)
    mean, sd = draws.mean(1), draws.std(1)
    resid = np.sum((mean - truths) ** 2, axis=0)
    total = np.sum((truths - truths.mean(0)) ** 2, axis=0)
    r2 = 1.0 - resid / np.where(total > 0, total, 1.0)
    prior_sd = truths.std(0) if prior_sd is None else np.asarray(prior_sd, np.float64)
    safe_sd = np.where(sd > 0, sd, np.inf)
    z = (mean - truths) / safe_sd
    contraction = 1.0 - sd / np.where(prior_sd > 0, prior_sd, 1.0)
    return RecoveryResult(mean, sd, r2, z, contraction, z.std(0))
