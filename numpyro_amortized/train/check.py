"""The trained guide checked against the model's exact density, on held-out simulations.

A NumPyro model has an exact joint density, so the guide's draws for a simulated dataset can be
weighed by ``p(theta, x) / q(theta | x)``; the Pareto k-hat of those weights (PSIS) says whether
the guide's posterior is usable for that dataset (k-hat <= 0.7) or not, the importance ESS
how close it is, and the weighted moments against the raw ones how far the raw draws are off
(:func:`~numpyro_amortized.compare.importance.raw_error`). :func:`fit` runs this
check on held-out simulations at the end of training and warns when the guide fails it on many
of them: the raw draws of ``sample_posterior`` are then unreliable for this model, before any
real data is seen.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.losses import importance_log_weights
from numpyro_amortized.train.sharding import host_tree

__all__ = ["GuideCheckWarning", "HeldOutCheck", "PreparedCheck", "data_check", "held_out_check",
           "held_out_member_log_probs", "held_out_program"]

# the thresholds of compare.importance, defined apart: that module loads ArviZ (imported here
# only when the check runs), and importing from it would make an import circle
PARETO_K_THRESHOLD = 0.7
RAW_ESS_FRACTION = 0.9  # weights this close to uniform: the guide is right (k-hat is noise)
RAW_ERROR = 0.3  # raw draws off by more than this many posterior sds (beyond noise) fail
FAILED_SHARE = 0.25  # warn when the guide fails on more than this share of held-out simulations


class GuideCheckWarning(UserWarning):
    """The guide failed the exact-density check on many held-out simulations."""


class HeldOutCheck(NamedTuple):
    """Per held-out simulation: ``pareto_k`` of the guide's draws against the exact density,
    the importance ESS as a share of the draws (``ess_fraction``, 1 for a perfect guide) and
    ``raw_error``, how many posterior sds the raw draws' means or sds are off by at most, beyond
    noise (:func:`~numpyro_amortized.compare.importance.raw_error`)."""

    pareto_k: np.ndarray
    ess_fraction: np.ndarray
    #: the same figures for the data given to ``fit`` (``nan`` when not checked: those data
    #: were placeholders, e.g. zeros, or the run used several processes)
    data_pareto_k: float = float("nan")
    data_ess_fraction: float = float("nan")
    raw_error: np.ndarray | None = None
    data_raw_error: float = float("nan")

    @property
    def data_failed(self) -> bool:
        """The guide's draws are off for the data given to ``fit``."""
        return bool(self.data_ess_fraction < RAW_ESS_FRACTION
                    and self.data_pareto_k > PARETO_K_THRESHOLD
                    or self.data_raw_error > RAW_ERROR)

    @property
    def failed(self) -> np.ndarray:
        """Per simulation: the guide's draws are off: k-hat > 0.7 with importance weights not
        close to uniform (for nearly uniform weights k-hat is noise), or the raw draws off by
        more than ``RAW_ERROR`` posterior sds."""
        bad = (self.ess_fraction < RAW_ESS_FRACTION) & (self.pareto_k > PARETO_K_THRESHOLD)
        return bad if self.raw_error is None else bad | (self.raw_error > RAW_ERROR)

    @property
    def failed_share(self) -> float:
        """The share of held-out simulations on which the guide fails."""
        return float(np.mean(self.failed)) if self.pareto_k.size else 0.0

    def message(self) -> str:
        n, bad = self.pareto_k.size, int(np.sum(self.failed))
        return (
            f"The trained guide fails the exact-density check on {bad} of {n} held-out "
            f"simulations (Pareto k-hat > 0.7, or raw draws more than {RAW_ERROR} posterior sds "
            f"off; median k-hat {np.median(self.pareto_k):.2f}, median importance ESS "
            f"{100 * np.median(self.ess_fraction):.0f}% of the draws): its "
            "raw draws (sample_posterior) are unreliable for this model. Use "
            "numpyro_amortized.posterior(...), which checks each dataset and refines the guide "
            "or runs NUTS where needed; or train longer, or with a more flexible flow or "
            "summary network. result.check has the figures.")

    def data_message(self) -> str:
        """The warning for a guide that fails on the data given to ``fit``."""
        return (
            "On the data given to fit, the trained guide fails the exact-density check "
            f"(Pareto k-hat {self.data_pareto_k:.2f}, importance ESS "
            f"{100 * self.data_ess_fraction:.0f}% of the draws, raw draws up to "
            f"{self.data_raw_error:.2f} posterior sds off): its raw draws (sample_posterior) "
            "for these data are unreliable, although it passes on most held-out simulations: "
            "these data lie where the model's simulations are rare. Use "
            "numpyro_amortized.posterior(...), which checks each dataset and refines the guide "
            "or runs NUTS where needed.")


def data_check(guide, params, rng_key, args, kwargs, num_draws=1000):
    """``(k-hat, ESS share, raw error)`` of ``num_draws`` guide draws for the data in
    ``args``/``kwargs`` (the data given to ``fit``), or ``None`` when an observed site there is
    constant (a placeholder, such as the zeros that set up a guide)."""
    # ArviZ: loaded when used
    from numpyro_amortized.compare.importance import raw_error, unconstrained, weigh
    from numpyro_amortized.simulation import observed_values

    values = observed_values(guide.model, *args, **kwargs)
    if not values or any(np.ptp(np.asarray(v)) == 0 for v in values.values()):
        return None
    try:
        res = weigh(guide, [params], rng_key, args, kwargs, num_draws, num_draws)
    except ValueError:  # no finite weight: the guide puts no mass where the model does
        return float("inf"), 0.0, float("inf")
    error = raw_error(unconstrained(guide.model, res.proposals, args, kwargs), res.log_weights)
    return float(res.pareto_k), float(res.ess) / num_draws, error


def held_out_program(guide, sims, args, kwargs, num_datasets=32, num_draws=512,
                     out_sharding=None):
    """The jitted computation of :func:`held_out_check`: ``(params, key, sims) -> ((log
    weights, draws), valid)`` for the first ``num_datasets`` simulations of ``sims``' size."""
    m = min(int(num_datasets), len(sims.valid))

    def run(params, key, sims):
        first = jax.tree.map(lambda x: x[:m], sims)
        return importance_log_weights(guide, params, key, first, num_draws, args, kwargs,
                                      return_draws=True), first.valid

    return jit_once(run, out_shardings=out_sharding)


class PreparedCheck:
    """:func:`held_out_program` lowered now and compiled in a thread, so that its compilation
    overlaps other work (training, in :func:`fit`); the module that loads ArviZ is imported
    there too. Call it as the program; arguments unlike the ones it was prepared for (or a
    failed compilation) fall back to compiling as usual. Tracing stays in the calling thread:
    NumPyro's effect handlers live on one global stack."""

    def __init__(self, guide, params, rng_key, sims, args, kwargs, out_sharding=None):
        self.program = held_out_program(guide, sims, args, kwargs, out_sharding=out_sharding)
        self.compiled = self.used = None
        try:
            lowered = self.program.lower(params, rng_key, sims)
        except Exception:  # noqa: BLE001 (the check raises it at the end, where it belongs)
            lowered = None

        def work():
            if lowered is None:
                return
            try:
                import numpyro_amortized.compare.importance  # noqa: F401 (loads ArviZ)

                self.compiled = lowered.compile()
            except Exception:  # noqa: BLE001 (compiled again, when the check runs)
                self.compiled = None

        # not a daemon: at exit Python waits for it; a daemon thread still in XLA's compiler
        # when the interpreter shuts down (a run interrupted early) aborts the process
        self.thread = threading.Thread(target=work, daemon=False)
        self.thread.start()

    def __call__(self, params, rng_key, sims):
        self.thread.join()
        if self.compiled is not None:
            try:
                out, self.used = self.compiled(params, rng_key, sims), "prepared"
                return out
            except (TypeError, ValueError):  # other shapes or shardings than prepared for
                pass
        self.used = "compiled now"
        return self.program(params, rng_key, sims)


def held_out_check(guide, params, rng_key, sims, args, kwargs, num_datasets=32, num_draws=512,
                   out_sharding=None, program=None) -> HeldOutCheck:
    """k-hat and importance ESS of the guide's draws on the first ``num_datasets`` valid
    simulations of ``sims`` (``num_draws`` draws each). ``program``: the computation, already
    compiled (:func:`held_out_program`, or its compiled form for these arguments)."""
    # ArviZ: loaded when used
    from numpyro_amortized.compare.importance import psis_weights, raw_error

    if program is None:
        program = held_out_program(guide, sims, args, kwargs, num_datasets, num_draws,
                                   out_sharding)
    (log_w, u), valid = host_tree(program(params, rng_key, sims))
    ks, ess, errors = [], [], []
    valid = np.asarray(valid, bool)
    for col, draws in zip(np.asarray(log_w, np.float64).T[valid],
                          np.moveaxis(np.asarray(u), 1, 0)[valid], strict=True):
        try:
            smoothed, k, e = psis_weights(col)
            error = raw_error(draws, smoothed)
        except ValueError:  # no finite weight: the guide puts no mass where the model does
            k, e, error = np.inf, 0.0, np.inf
        ks.append(k)
        ess.append(e / num_draws)
        errors.append(error)
    return HeldOutCheck(np.asarray(ks), np.asarray(ess), raw_error=np.asarray(errors))


def held_out_member_log_probs(guide):
    """``(params, val) -> (K, n_val)``: each flow-ensemble member's log density of the held-out
    simulations, NaN where a simulation is invalid (``None`` for a single flow)."""
    def member_log_probs(params, val):
        lps = guide.member_log_prob_simulations(params, val)
        return None if lps is None else jnp.where(val.valid[None], lps, jnp.nan)

    return member_log_probs
