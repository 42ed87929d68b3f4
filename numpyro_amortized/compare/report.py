"""The comparison report: the amortized posterior next to NUTS, dataset by dataset.

:func:`compare_with_nuts` runs, for each dataset, the guide (one forward pass), its PSIS
correction and NUTS, and returns a :class:`Comparison`: per latent, the differences of mean,
sd and 5%/95% quantiles in units of the NUTS posterior sd; per dataset, C2ST and MMD against
NUTS, Pareto k-hat, NUTS R-hat/ESS/divergences and the wall times with the speed-up; as pandas
DataFrames, a printed table, and plots.
"""

from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from numpyro_amortized.compare.draws import flatten_draws
from numpyro_amortized.compare.importance import (
    PARETO_K_THRESHOLD,
    importance_resample,
    raw_error,
    unconstrained,
    which_draws,
)
from numpyro_amortized.compare.nuts import NUTSRunner
from numpyro_amortized.compare.posterior import _as_datasets, posterior
from numpyro_amortized.diagnostics import c2st, mmd
from numpyro_amortized.guide import AutoAmortizedFlow
from numpyro_amortized.simulation import observed_values

__all__ = ["Comparison", "compare_with_nuts", "standardized_differences"]


def standardized_differences(reference, samples) -> dict:
    """Differences of mean, sd, 5% and 95% quantiles of ``samples`` from ``reference``, per
    column, in units of the reference's sd.

    :param reference: ``(n, dim)`` reference draws (NUTS).
    :param samples: ``(m, dim)`` draws to check.
    :return: dict of ``(dim,)`` arrays ``mean``, ``sd``, ``q05``, ``q95``.
    """
    ref = np.asarray(reference, np.float64)
    x = np.asarray(samples, np.float64)
    sd = ref.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    q_ref = np.quantile(ref, [0.05, 0.95], axis=0)
    q = np.quantile(x, [0.05, 0.95], axis=0)
    return {
        "mean": (x.mean(0) - ref.mean(0)) / sd,
        "sd": (x.std(0) - ref.std(0)) / sd,
        "q05": (q[0] - q_ref[0]) / sd,
        "q95": (q[1] - q_ref[1]) / sd,
    }


class Comparison(NamedTuple):
    """What :func:`compare_with_nuts` found.

    :param latents: one row per dataset, method (``amortized``; ``corrected``: the checked
        draws, see ``use``) and scalar
        latent: standardized differences ``d_mean``, ``d_sd``, ``d_q05``, ``d_q95`` and
        ``flagged`` (any of them beyond the tolerance).
    :param datasets: one row per dataset: ``c2st`` and ``mmd`` of the amortized and corrected
        draws against NUTS, ``pareto_k``, ``is_ess``, ``raw_error`` (how many posterior sds
        the guide's own draws are off, as the importance weights see it, beyond noise:
        :func:`~numpyro_amortized.compare.importance.raw_error`), ``trust`` (k-hat <= 0.7:
        the PSIS correction is reliable), ``use``
        (which draws to use, as :func:`~numpyro_amortized.posterior` decides: ``amortized``,
        ``psis``, ``refined+psis``, or ``nuts`` when no check passes), NUTS
        ``rhat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``divergences``, ``nuts_reliable``,
        wall times ``time_nuts``, ``time_amortized``, ``time_corrected`` (seconds, compilation
        excluded) and ``speedup`` (NUTS time / amortized time).
    :param totals: the batch: total NUTS time, amortized time with training counted once,
        compilation times, and the speed-up over the batch.
    :param draws: per dataset, dict with ``nuts``, ``amortized`` and ``corrected`` draw
        matrices and the column ``names``.
    :param nuts: per dataset, the :class:`~numpyro_amortized.compare.NUTSResult`.
    :param tolerance: the flagging threshold in posterior sds.
    """

    latents: pd.DataFrame
    datasets: pd.DataFrame
    totals: dict
    draws: list
    nuts: list
    tolerance: float

    def __str__(self):
        return format_comparison(self)

    def _repr_html_(self):
        return self.datasets._repr_html_() + self.latents._repr_html_()

    def flagged(self, method="amortized") -> pd.DataFrame:
        """The (dataset, latent) rows whose differences exceed the tolerance."""
        rows = self.latents
        return rows[(rows.method == method) & rows.flagged]

    def plot(self, dataset=0, **kwargs):
        """Overlaid marginals and a pair plot for one dataset (see
        :func:`~numpyro_amortized.compare.plot_comparison`)."""
        from numpyro_amortized.compare.plots import plot_comparison

        return plot_comparison(self, dataset, **kwargs)


def compare_with_nuts(guide, params, rng_key, datasets, *, num_samples=4000, correct=True,
                      refine=True, num_proposals=None, nuts_kwargs=None, c2st_kwargs=None,
                      c2st_samples=1000, tolerance=0.25, train_time=None,
                      progress_bar=True, nuts_model=None) -> Comparison:
    """Compare the amortized posterior with NUTS on one dataset or many.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow` (or anything with
        ``model``, ``sample_posterior`` and ``log_prob``).
    :param params: its parameters.
    :param rng_key: a PRNG key.
    :param datasets: the model's keyword arguments for one dataset (a dict), or a list of them
        (an ``(args, kwargs)`` pair per dataset for positional arguments).
    :param num_samples: guide draws (and corrected draws) per dataset.
    :param correct: also compute the checked posterior of each dataset, as
        :func:`~numpyro_amortized.posterior` gives it without NUTS: the guide's draws, their
        PSIS correction, or (``refine=True``) the guide refined on the dataset; the ``use``
        column says which, and ``"nuts"`` when none passes the checks.
    :param refine: let the checked posterior refine the guide on datasets that fail the
        importance check (a few hundred ELBO steps with the model's density).
    :param nuts_kwargs: settings for :func:`~numpyro_amortized.compare.run_nuts`.
    :param c2st_kwargs: classifier settings for :func:`~numpyro_amortized.c2st` (default: the
        exact sbibm recipe; ``{"early_stopping": True}`` is much faster, say so when reporting).
    :param c2st_samples: draws per side for C2ST and MMD (``None``: skip both).
    :param tolerance: flag a latent when a standardized difference exceeds this many NUTS sds.
    :param train_time: the guide's training time, counted once in the batch totals.
    :param progress_bar: a progress bar over datasets.
    :param nuts_model: the model NUTS runs (default: the guide's): the same posterior written
        for NUTS's geometry, e.g. a hierarchical model with its group effects non-centered,
        ``numpyro.handlers.reparam(model, config={"a": LocScaleReparam(0)})`` (its
        deterministic sites give the guide's latents).
    :return: a :class:`Comparison`; ``print(comparison)`` shows the tables.

    **Example**::

        report = compare_with_nuts(guide, params, key, [dict(x=x1, y=y1), dict(x=x2, y=y2)],
                                   train_time=result.train_time)
        print(report); report.plot(0)
    """
    items = _as_datasets(datasets)
    for i, (args, kwargs) in enumerate(items):  # every dataset checked before any NUTS run
        try:
            if isinstance(guide, AutoAmortizedFlow):  # shapes and values against training
                guide.observed_data(*args, **kwargs)
            values = observed_values(guide.model, *args, **kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"dataset {i}: {e}") from None
        bad = [k for k, v in values.items() if not np.all(np.isfinite(np.asarray(v, float)))]
        if bad:
            raise ValueError(f"dataset {i}: observed site(s) {bad} hold NaN or infinite values; "
                             "fix or drop them before comparing.")
    nuts_kwargs = dict(nuts_kwargs or {})
    run_keys = ("init_params", "inverse_mass_matrix", "posterior_predictive", "predictive_sites")
    run_kwargs = {k: nuts_kwargs.pop(k) for k in run_keys if k in nuts_kwargs}
    nuts_runner = NUTSRunner(guide.model if nuts_model is None else nuts_model, **nuts_kwargs)
    keys = jax.random.split(rng_key, len(items))
    lat_rows, ds_rows, all_draws, nuts_runs = [], [], [], []
    amortized_compile = nuts_compile = 0.0
    warm = set()  # which checks ran once already (compiled outside the timings)
    bar = tqdm(items, desc="comparing with NUTS", unit="dataset", disable=not progress_bar)
    for i, (args, kwargs) in enumerate(bar):
        k_guide, k_is, k_nuts, k_sub = jax.random.split(keys[i], 4)
        if i == 0:  # compile the guide's sampler once, outside the timings
            t0 = time.perf_counter()
            jax.block_until_ready(guide.sample_posterior(
                k_guide, params, *args, sample_shape=(num_samples,), **kwargs))
            amortized_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        draws = jax.block_until_ready(guide.sample_posterior(
            k_guide, params, *args, sample_shape=(num_samples,), **kwargs))
        t_amortized = time.perf_counter() - t0
        names = list(draws)
        amortized, cols = flatten_draws(draws, names)

        corrected, k_hat, is_ess, error, use, t_corrected = (None, np.nan, np.nan, np.nan,
                                                              None, np.nan)
        if correct:
            res, use, t_corrected, warm, error = _checked_draws(
                guide, params, k_is, args, kwargs, num_samples, num_proposals, refine, warm)
            corrected = flatten_draws(res.draws, names)[0]
            k_hat, is_ess = res.pareto_k, res.ess

        ref = nuts_runner.run(k_nuts, *args, **run_kwargs, **kwargs)
        nuts_compile += ref.compile_time
        nuts_runs.append(ref)
        nuts = flatten_draws(ref.samples, names)[0]
        diag = ref.diagnostics
        if not diag["reliable"]:
            warnings.warn(
                f"The NUTS reference of dataset {i} is itself unreliable ("
                + "; ".join(diag["problems"])
                + "): its comparison says little. Run NUTS longer (nuts_kwargs num_warmup, "
                "num_samples) or give a reparametrized model as nuts_model (e.g. group "
                "effects non-centered with numpyro.infer.reparam.LocScaleReparam).",
                UserWarning, stacklevel=2,
            )

        row = {"dataset": i}
        for method, x in (("amortized", amortized), ("corrected", corrected)):
            if x is None:
                continue
            diffs = standardized_differences(nuts, x)
            for j, col in enumerate(cols):
                d = {f"d_{k}": float(v[j]) for k, v in diffs.items()}
                flagged = max(abs(v) for v in d.values()) > tolerance
                lat_rows.append({"dataset": i, "method": method, "latent": col, **d,
                                 "flagged": flagged})
            if c2st_samples:
                a, b = _subsample(nuts, x, c2st_samples, k_sub)
                row[f"c2st_{method}"] = c2st(a, b, classifier_kwargs=c2st_kwargs)
                row[f"mmd_{method}"] = mmd(a, b)
        row.update({
            "pareto_k": k_hat, "is_ess": is_ess, "raw_error": error,
            "trust": bool(k_hat <= PARETO_K_THRESHOLD) if correct else None,
            "use": use,
            "rhat_max": diag["rhat_max"], "ess_bulk_min": diag["ess_bulk_min"],
            "ess_tail_min": diag["ess_tail_min"], "divergences": diag["divergences"],
            "nuts_reliable": diag["reliable"], "time_nuts": ref.run_time,
            "time_amortized": t_amortized, "time_corrected": t_corrected,
            "speedup": ref.run_time / t_amortized,
        })
        ds_rows.append(row)
        all_draws.append({"names": cols, "nuts": nuts, "amortized": amortized,
                          "corrected": corrected})
    bar.close()

    datasets_df = pd.DataFrame(ds_rows)
    total_nuts = float(datasets_df.time_nuts.sum())
    total_amortized = float(datasets_df.time_amortized.sum()) + float(train_time or 0.0)
    totals = {
        "num_datasets": len(items),
        "time_nuts": total_nuts,
        "time_nuts_compile": nuts_compile,
        "time_amortized": total_amortized,
        "time_amortized_compile": amortized_compile,
        "train_time": train_time,
        "speedup": total_nuts / total_amortized,
        "speedup_with_compilation": (total_nuts + nuts_compile)
        / (total_amortized + amortized_compile),
    }
    return Comparison(pd.DataFrame(lat_rows), datasets_df, totals, all_draws, nuts_runs,
                      tolerance)


def _checked_draws(guide, params, key, args, kwargs, num_samples, num_proposals, refine, warm):
    """The draws to use for one dataset, as :func:`~numpyro_amortized.posterior` decides
    without NUTS (an ``"nuts"`` verdict when no check passes), the time of the call and the
    raw error of the guide's own draws (:func:`~numpyro_amortized.compare.importance.raw_error`). Each
    program (the check, the refinement) runs once untimed the first time it is needed."""
    def run():
        t0 = time.perf_counter()
        if isinstance(guide, AutoAmortizedFlow):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                res = posterior(guide, params, key, *args, num_samples=num_samples,
                                num_proposals=num_proposals, refine=refine, nuts=False,
                                **kwargs)
            use = res.method if res.reliable else "nuts"
            ran = {"check"} | {s["step"] for s in res.steps if s["step"] == "refine"}
            error = res.steps[0]["raw_error"]  # the first check: the guide's own draws
        else:  # any guide with sample_posterior and log_prob: the PSIS check only
            res = importance_resample(guide, params, key, *args, num_samples=num_samples,
                                      num_proposals=num_proposals, warn=False, **kwargs)
            error = raw_error(unconstrained(guide.model, res.proposals, args, kwargs),
                              res.log_weights)
            use = {"amortized": "amortized", "corrected": "psis", "escalate": "nuts"}[
                which_draws(res.pareto_k, res.ess, res.ess_fraction)]
            ran = {"check"}
        return res, use, time.perf_counter() - t0, ran, error

    res, use, seconds, ran, error = run()
    if ran - warm:
        warm = warm | ran
        res, use, seconds, _, error = run()
    return res, use, seconds, warm, error


def _subsample(reference, samples, n, key):
    """Equal-size random subsets (NUTS draws are shuffled across chains)."""
    k1, k2 = jax.random.split(key)
    n = min(n, len(reference), len(samples))
    i = np.asarray(jax.random.permutation(k1, len(reference)))[:n]
    j = np.asarray(jax.random.permutation(k2, len(samples)))[:n]
    return reference[i], samples[j]


def format_comparison(report: Comparison) -> str:
    """The report as text: the per-dataset table, the flagged latents and the totals."""
    ds = report.datasets
    cols = [c for c in ("c2st_amortized", "c2st_corrected", "mmd_amortized", "pareto_k",
                        "is_ess", "raw_error", "use", "rhat_max", "divergences", "time_nuts",
                        "time_amortized", "speedup") if c in ds and ds[c].notna().any()]
    lines = ["Amortized vs NUTS, per dataset (times in s, compilation excluded):",
             ds[["dataset"] + cols].to_string(index=False, float_format=lambda v: f"{v:.3g}")]
    flagged = report.flagged("amortized")
    if len(flagged):
        lines.append(f"\nLatents off by more than {report.tolerance} NUTS sd (amortized):")
        lines.append(flagged[["dataset", "latent", "d_mean", "d_sd", "d_q05", "d_q95"]]
                     .to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
    else:
        lines.append(f"\nNo latent is off by more than {report.tolerance} NUTS sd.")
    t = report.totals
    lines.append(
        f"\n{t['num_datasets']} datasets: NUTS {t['time_nuts']:.2f} s "
        f"(+ {t['time_nuts_compile']:.1f} s compilation); amortized {t['time_amortized']:.2f} s"
        + (f" with training ({t['train_time']:.1f} s) counted once" if t["train_time"] else "")
        + f"; speed-up over the batch {t['speedup']:.3g}x"
    )
    if "use" in ds and ds.use.notna().any():
        lines.append("Which draws to use, from the importance check against the model's "
                     "density (Pareto k-hat and importance ESS; as numpyro_amortized.posterior "
                     "decides):")
        for use, why in (("amortized", "importance weights close to uniform"),
                         ("psis", (f"PSIS-corrected: k-hat <= {PARETO_K_THRESHOLD}, "
                                   "enough importance ESS")),
                         ("refined+psis", ("the guide refined on the dataset, then "
                                           "PSIS-corrected")),
                         ("nuts", "no check passes: run NUTS (posterior() does)")):
            which = ds.dataset[ds.use == use].tolist()
            if which:
                lines.append(f"  {use} ({why}): datasets {', '.join(map(str, which))}")
        raw_off = sorted(set(flagged.dataset) & set(ds.dataset[ds.use == "amortized"]))
        if raw_off:
            lines.append(f"  Datasets {', '.join(map(str, raw_off))} pass the check, yet latents "
                         f"differ from NUTS by more than {report.tolerance} sd: look at NUTS's "
                         "own diagnostics and at the plots before trusting either.")
        if len(flagged) and not raw_off:
            lines.append("  The raw amortized draws of the flagged datasets are off: do not use "
                         "them; use the draws named above.")
    return "\n".join(lines)
