"""Figures of the diagnostics: one panel per latent where that is the question, one figure
per diagnostic. Every function returns a matplotlib ``Figure``."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from numpyro_amortized.diagnostics.sbc import ecdf_bands, fractional_ranks

__all__ = [
    "plot_coverage",
    "plot_misspecification",
    "plot_rank_histogram",
    "plot_recovery",
    "plot_sbc_ecdf",
    "plot_tarp",
    "plot_z_score_contraction",
]


def _grid(n, size=2.6):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.4, size * rows + 0.4),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    return fig, axes.ravel()[:n]


def plot_sbc_ecdf(sbc, *, alpha=0.05):
    """ECDF of the fractional SBC ranks minus the uniform CDF, with simultaneous ``1 - alpha``
    bands (Säilynoja et al. 2022), one panel per latent. Outside the band: not calibrated;
    a U-shape below zero then above means overconfidence, a hump means underconfidence."""
    u = fractional_ranks(sbc.ranks, sbc.num_draws)
    m = u.shape[0]
    bands = ecdf_bands(m, alpha=alpha)
    fig, axes = _grid(len(sbc.names))
    for j, ax in enumerate(axes):
        ecdf = np.array([np.mean(u[:, j] <= zi) for zi in bands.z])
        ax.fill_between(bands.z, bands.lower - bands.z, bands.upper - bands.z, color="0.85",
                        label=f"{100 * (1 - alpha):.0f}% band")
        ax.plot(bands.z, ecdf - bands.z, color="tab:blue" if sbc.in_bands[j] else "tab:red",
                label="ECDF difference")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_title(f"{sbc.names[j]} (p = {sbc.p_values[j]:.2f})", fontsize=9)
        ax.set_xlabel("fractional rank")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("SBC: ECDF difference")
    fig.tight_layout()
    return fig


def plot_rank_histogram(sbc, *, num_bins=20):
    """Histograms of the SBC ranks with the 99% band of a uniform histogram."""
    from scipy import stats

    m = sbc.ranks.shape[0]
    fig, axes = _grid(len(sbc.names))
    lo, hi = stats.binom.ppf([0.005, 0.995], m, 1 / num_bins)
    for j, ax in enumerate(axes):
        ax.axhspan(lo, hi, color="0.85")
        ax.hist(sbc.ranks[:, j], bins=np.linspace(0, sbc.num_draws + 1, num_bins + 1),
                color="tab:blue", alpha=0.8)
        ax.set_title(sbc.names[j], fontsize=9)
        ax.set_xlabel("rank")
    fig.suptitle("SBC rank histograms")
    fig.tight_layout()
    return fig


def plot_coverage(cov, names):
    """Empirical against nominal coverage of central intervals, per latent."""
    fig, axes = _grid(len(names))
    band = 2 * cov.stderr
    for j, ax in enumerate(axes):
        ax.fill_between(cov.levels, cov.levels - band, cov.levels + band, color="0.85")
        ax.plot([0, 1], [0, 1], color="0.4", lw=0.8)
        ax.plot(cov.levels, cov.coverage[:, j], color="tab:blue")
        ax.set_title(f"{names[j]} (error {cov.calibration_error[j]:.3f})", fontsize=9)
        ax.set_xlabel("nominal")
        ax.set_ylabel("empirical")
    fig.suptitle("Coverage of central credible intervals")
    fig.tight_layout()
    return fig


def plot_tarp(res):
    """TARP expected coverage probability against credibility level."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="0.4", lw=0.8)
    ax.plot(res.levels, res.ecp, color="tab:blue")
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    ax.set_title(f"TARP: ATC {res.atc:+.3f}, KS p = {res.ks_p_value:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_recovery(rec, truths, names):
    """Posterior mean (with +-1 sd) against the true value, per latent, with R^2."""
    truths = np.asarray(truths)
    fig, axes = _grid(len(names))
    for j, ax in enumerate(axes):
        ax.errorbar(truths[:, j], rec.mean[:, j], yerr=rec.sd[:, j], fmt="o", ms=2,
                    alpha=0.4, color="tab:blue", elinewidth=0.5)
        lo, hi = truths[:, j].min(), truths[:, j].max()
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8)
        ax.set_title(f"{names[j]} (R^2 = {rec.r2[j]:.3f})", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("posterior mean")
    fig.suptitle("Recovery")
    fig.tight_layout()
    return fig


def plot_z_score_contraction(rec, names):
    """Posterior z-score against posterior contraction, per latent (BayesFlow's diagnostic):
    good posteriors sit at high contraction with |z| mostly below 2."""
    fig, axes = _grid(len(names))
    for j, ax in enumerate(axes):
        c = rec.contraction[:, j]
        ax.scatter(c, rec.z_score[:, j], s=3, alpha=0.4, color="tab:blue")
        ax.axhspan(-2, 2, color="0.9", zorder=0)
        ax.set_xlim(max(-1.0, min(0.0, float(np.min(c)))), 1.0)
        off = int(np.sum(c < -1.0))  # posteriors wider than twice the prior sd
        ax.set_title(f"{names[j]} (sd of z = {rec.z_score_sd[j]:.2f})"
                     + (f", {off} left of -1" if off else ""), fontsize=9)
        ax.set_xlabel("contraction")
        ax.set_ylabel("z-score")
    fig.suptitle("Posterior z-score vs contraction")
    fig.tight_layout()
    return fig


def plot_misspecification(res):
    """The observed MMD against its null distribution, and the first two summary dimensions."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4))
    ax1.hist(res.null, bins=30, color="0.6", label="simulated (null)")
    ax1.axvline(res.mmd, color="tab:red", label="observed")
    ax1.set_xlabel("MMD^2 of summary statistics")
    ax1.set_title(f"p = {res.p_value:.3f}", fontsize=9)
    ax1.legend(fontsize=7)
    ref, obs = res.reference_embeddings, res.observed_embeddings
    j = 1 if ref.shape[1] > 1 else 0
    ax2.scatter(ref[:, 0], ref[:, j], s=3, color="0.6", alpha=0.5, label="simulated")
    ax2.scatter(obs[:, 0], obs[:, j], s=12, color="tab:red", label="observed")
    ax2.set_xlabel("summary 0")
    ax2.set_ylabel(f"summary {j}")
    ax2.legend(fontsize=7)
    fig.suptitle("Misspecification check")
    fig.tight_layout()
    return fig
