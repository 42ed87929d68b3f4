"""One call for the default diagnostics of a trained guide: SBC, coverage, TARP, recovery,
z-score/contraction and, given observed data, a misspecification check."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.diagnostics import plots
from numpyro_amortized.diagnostics.calibration import coverage, recovery, tarp
from numpyro_amortized.diagnostics.misspecification import misspecification_test
from numpyro_amortized.diagnostics.sbc import sbc_ranks, sbc_test
from numpyro_amortized.transforms import flatten_draws

__all__ = ["DiagnosticsReport", "calibration_draws", "diagnose"]


class DiagnosticsReport(NamedTuple):
    """The diagnostics of a guide.

    :param summary: one row per latent column: ``sbc_p_value``, ``sbc_in_bands``,
        ``calibration_error`` (coverage), ``r2``, ``z_score_sd``, ``mean_contraction``.
    :param sbc: :class:`~numpyro_amortized.diagnostics.sbc.SBCResult`.
    :param coverage: :class:`~numpyro_amortized.diagnostics.calibration.CoverageResult`.
    :param tarp: :class:`~numpyro_amortized.diagnostics.calibration.TARPResult`.
    :param recovery: :class:`~numpyro_amortized.diagnostics.calibration.RecoveryResult`.
    :param misspecification: a
        :class:`~numpyro_amortized.diagnostics.misspecification.MisspecificationResult`, or
        ``None`` without observed data.
    :param figures: dict name -> matplotlib ``Figure`` (empty with ``make_plots=False``).
    :param num_dropped: simulations dropped for being non-finite.
    """

    summary: pd.DataFrame
    sbc: object
    coverage: object
    tarp: object
    recovery: object
    misspecification: object
    figures: dict
    num_dropped: int

    def __str__(self):
        lines = ["Diagnostics per latent:", self.summary.to_string(
            float_format=lambda v: f"{v:.3f}")]
        lines.append(f"TARP: ATC {self.tarp.atc:+.3f}, KS p = {self.tarp.ks_p_value:.3f}")
        if self.misspecification is not None:
            m = self.misspecification
            lines.append(f"Misspecification: MMD^2 {m.mmd:.4f}, p = {m.p_value:.3f}"
                         + ("  (the model does not describe these data)" if m.p_value < 0.05
                            else ""))
        return "\n".join(lines)


def calibration_draws(guide, params, rng_key, *args, num_simulations=1000,
                      num_samples=1000, test_quantities=None, **kwargs):
    """Simulate datasets from the prior predictive and draw the guide's posterior for all of
    them in one vectorized call.

    :param test_quantities: optional dict name -> function of the latents dict (applied with
        leading batch axes, e.g. ``lambda z: z["beta"][..., 1] / z["sigma"]``); each becomes
        an extra column.
    :return: ``(draws (M, L, D), truths (M, D), names, num_dropped)``.
    """
    k_sim, k_post = jax.random.split(rng_key)
    m, n = int(num_simulations), int(num_samples)
    sims = jit_once(lambda k: guide.simulate(k, m, *args, **kwargs))(k_sim)
    valid = np.asarray(sims.valid)
    post = guide.sample_posterior_batch(k_post, params, guide.simulation_data(sims),
                                        sample_shape=(n,),
                                        num_obs=sims.num_obs)
    latents = dict(sims.latents)
    for name, fn in (test_quantities or {}).items():
        latents[name] = fn(latents)
        post[name] = fn(post)
    names = list(latents)
    truths, cols = flatten_draws(latents, names)
    flat_post = {k: np.reshape(np.asarray(v), (m * n,) + np.shape(v)[2:]) for k, v in
                 post.items()}
    draws = flatten_draws(flat_post, names)[0].reshape(m, n, -1)
    return draws[valid], truths[valid], cols, int((~valid).sum())


def diagnose(guide, params, rng_key, *args, num_simulations=1000, num_samples=1000,
             test_quantities=None, observed=None, observed_num_obs=None, make_plots=True,
             progress_bar=True, **kwargs) -> DiagnosticsReport:
    """Run the default diagnostics of a trained guide.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters.
    :param rng_key: a PRNG key.
    :param args: the model's arguments for one dataset, as given to ``fit``.
    :param num_simulations: prior-predictive datasets (``M``).
    :param num_samples: posterior draws per dataset (``L``).
    :param test_quantities: extra scalar quantities to calibrate (see
        :func:`calibration_draws`).
    :param observed: optional observed datasets (leading dataset axis) for the
        misspecification check.
    :param make_plots: make the figures.
    :return: a :class:`DiagnosticsReport`; ``print(report)`` shows the numbers.

    **Example**::

        report = diagnose(guide, params, key, x=jnp.zeros(15), y=jnp.zeros(15))
        print(report); report.figures["sbc_ecdf"]
    """
    steps = ["posterior draws", "SBC", "coverage and TARP", "recovery"]
    steps += ["misspecification"] if observed is not None else []
    steps += ["figures"] if make_plots else []
    bar = tqdm(total=len(steps), desc="diagnostics", disable=not progress_bar)
    k_draws, k_miss = jax.random.split(rng_key)

    def step(label):
        bar.set_postfix_str(label)

    step(steps[0])
    draws, truths, names, dropped = calibration_draws(
        guide, params, k_draws, *args, num_simulations=num_simulations,
        num_samples=num_samples, test_quantities=test_quantities, **kwargs)
    bar.update()
    step("SBC")
    sbc = sbc_test(sbc_ranks(draws, truths), draws.shape[1], names)
    bar.update()
    step("coverage and TARP")
    cov = coverage(draws, truths)
    tarp_res = tarp(draws, truths)
    bar.update()
    step("recovery")
    rec = recovery(draws, truths)
    bar.update()
    miss = None
    if observed is not None:
        step("misspecification")
        miss = misspecification_test(guide, params, k_miss, observed, *args,
                                     num_obs=observed_num_obs, **kwargs)
        bar.update()
    figures = {}
    if make_plots:
        step("figures")
        figures = {
            "sbc_ecdf": plots.plot_sbc_ecdf(sbc),
            "rank_histogram": plots.plot_rank_histogram(sbc),
            "coverage": plots.plot_coverage(cov, names),
            "tarp": plots.plot_tarp(tarp_res),
            "recovery": plots.plot_recovery(rec, truths, names),
            "z_score_contraction": plots.plot_z_score_contraction(rec, names),
        }
        if miss is not None:
            figures["misspecification"] = plots.plot_misspecification(miss)
        bar.update()
    bar.close()
    summary = pd.DataFrame({
        "sbc_p_value": sbc.p_values, "sbc_in_bands": sbc.in_bands,
        "calibration_error": cov.calibration_error, "r2": rec.r2,
        "z_score_sd": rec.z_score_sd, "mean_contraction": rec.contraction.mean(0),
    }, index=pd.Index(names, name="latent"))
    return DiagnosticsReport(summary, sbc, cov, tarp_res, rec, miss, figures, dropped)
