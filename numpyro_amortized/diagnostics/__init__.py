"""Diagnostics of amortized posteriors.

- :func:`diagnose`: the default set on a trained guide, in one call, with figures.
- SBC (:func:`sbc_ranks`, :func:`sbc_test` with simultaneous ECDF bands), :func:`coverage`,
  :func:`tarp`, :func:`recovery` (with z-score and contraction): from posterior draws and the
  latents that generated each dataset, so they apply to any posterior.
- :func:`misspecification_test` (MMD in summary space) and :func:`ppc_p_values`.
- :func:`c2st` and :func:`mmd`: two-sample tests between sets of draws.
"""

from numpyro_amortized.diagnostics.c2st import c2st
from numpyro_amortized.diagnostics.calibration import (
    CoverageResult,
    RecoveryResult,
    TARPResult,
    coverage,
    recovery,
    tarp,
)
from numpyro_amortized.diagnostics.misspecification import (
    MisspecificationResult,
    misspecification_test,
    ppc_p_values,
)
from numpyro_amortized.diagnostics.mmd import mmd
from numpyro_amortized.diagnostics.plots import (
    plot_coverage,
    plot_misspecification,
    plot_rank_histogram,
    plot_recovery,
    plot_sbc_ecdf,
    plot_tarp,
    plot_z_score_contraction,
)
from numpyro_amortized.diagnostics.report import DiagnosticsReport, calibration_draws, diagnose
from numpyro_amortized.diagnostics.sbc import SBCResult, ecdf_bands, sbc_ranks, sbc_test

__all__ = [
    "CoverageResult",
    "DiagnosticsReport",
    "MisspecificationResult",
    "RecoveryResult",
    "SBCResult",
    "TARPResult",
    "c2st",
    "calibration_draws",
    "coverage",
    "diagnose",
    "ecdf_bands",
    "misspecification_test",
    "mmd",
    "plot_coverage",
    "plot_misspecification",
    "plot_rank_histogram",
    "plot_recovery",
    "plot_sbc_ecdf",
    "plot_tarp",
    "plot_z_score_contraction",
    "ppc_p_values",
    "recovery",
    "sbc_ranks",
    "sbc_test",
    "tarp",
]
