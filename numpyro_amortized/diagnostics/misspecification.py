"""Model misspecification: are the observed data like the data the guide was trained on?

The summary network maps every dataset to a vector. Datasets the model can produce fill a
region of that space; observed data from a process the model does not describe land outside it.
The MMD between the embeddings of the observed datasets and of simulated ones, against its
distribution when the "observed" datasets are themselves simulations, gives a p-value
(Schmitt et al. 2023). A posterior predictive check (:func:`ppc_p_values`) complements it for
one dataset.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.diagnostics.mmd import squared_distances

__all__ = ["MisspecificationResult", "misspecification_test", "ppc_p_values"]


class MisspecificationResult(NamedTuple):
    """The embedding MMD of the observed datasets and its null distribution.

    :param mmd: the MMD^2 between observed and simulated embeddings.
    :param p_value: the fraction of null MMDs at least as large (small: misspecified).
    :param null: MMD^2 of ``num_null`` sets of simulated datasets of the same count.
    :param observed_embeddings: ``(n, S)``; :param reference_embeddings: ``(R, S)``.
    """

    mmd: float
    p_value: float
    null: np.ndarray
    observed_embeddings: np.ndarray
    reference_embeddings: np.ndarray


class _EmbeddingMMD:
    """MMD^2 to a fixed reference set, with the reference's kernel term computed once.

    Embeddings are z-scored by the reference, the Gaussian kernel's bandwidth is the median
    distance within the reference, and the observed set's own term includes its diagonal, so a
    single observed dataset works too (the same estimator is used for the null).
    """

    def __init__(self, reference):
        ref = np.asarray(reference, np.float64)
        self.loc, sd = ref.mean(0), ref.std(0)
        self.sd = np.where(sd > 0, sd, 1.0)
        self.ref = (ref - self.loc) / self.sd
        sq = squared_distances(self.ref, self.ref)
        n = len(self.ref)
        bw2 = np.median(sq[np.triu_indices(n, 1)])
        self.bw2 = bw2 if bw2 > 0 else 1.0
        k = np.exp(-sq / (2 * self.bw2))
        self.kxx = (k.sum() - np.trace(k)) / (n * (n - 1))

    def __call__(self, y):
        y = (np.asarray(y, np.float64) - self.loc) / self.sd
        kyy = np.exp(-squared_distances(y, y) / (2 * self.bw2)).mean()
        kxy = np.exp(-squared_distances(self.ref, y) / (2 * self.bw2)).mean()
        return float(self.kxx + kyy - 2 * kxy)


def misspecification_test(guide, params, rng_key, observed: dict, *args, num_obs=None,
                          num_reference=1000, num_null=500, **kwargs) -> MisspecificationResult:
    """Test whether observed datasets look like the model's simulations, in summary space.

    The observed datasets are compared, as a population, with the prior predictive: datasets
    that all share one parameter value are unusual under it even when the model is right, so
    test such datasets one at a time, or pass datasets whose parameters vary as the prior's do.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters.
    :param observed: observed values with a leading dataset axis (one or more datasets), as
        in :meth:`~numpyro_amortized.AutoAmortizedFlow.sample_posterior_batch`.
    :param args: the model's arguments for one dataset, as given to ``fit``.
    :param num_obs: optional ``(n,)`` sizes of the observed datasets (padded data).
    :param num_reference: simulated datasets forming the reference set.
    :param num_null: simulated sets of ``n`` datasets for the null distribution.
    :return: a :class:`MisspecificationResult`.

    **Example**::

        res = misspecification_test(guide, params, key, {"y": Y_obs}, y=jnp.zeros(50))
        res.p_value < 0.05   # the model does not describe these data

    **References:** Schmitt, Bürkner, Köthe & Radev (2023), *Detecting model misspecification
    in amortized Bayesian inference with neural networks*, GCPR.
    """
    n = int(np.shape(next(iter(observed.values())))[0])
    total = num_reference + num_null * n
    sims = jit_once(lambda k: guide.simulate(k, total, *args, **kwargs))(rng_key)
    emb = np.asarray(guide.summary_statistics_batch(params, sims.observed, sims.num_obs))
    valid = np.asarray(sims.valid)
    ref = emb[:num_reference][valid[:num_reference]]
    stat = _EmbeddingMMD(ref)
    pool = emb[num_reference:].reshape(num_null, n, -1)
    ok = valid[num_reference:].reshape(num_null, n).all(axis=1)
    null = np.array([stat(p) for p in pool[ok]])
    obs = np.asarray(guide.summary_statistics_batch(params, observed, num_obs))
    value = stat(obs)
    p = (np.sum(null >= value) + 1) / (len(null) + 1)
    return MisspecificationResult(value, float(p), null, obs, ref)


def ppc_p_values(idata, statistics=None) -> dict:
    """Posterior predictive p-values ``P(T(y_rep) >= T(y))`` of test statistics, per replicated
    site of ArviZ data with ``posterior_predictive`` and ``observed_data`` groups
    (from :func:`~numpyro_amortized.compare.guide_inference_data` or
    :func:`~numpyro_amortized.compare.run_nuts` with ``posterior_predictive=True``).

    :param statistics: dict name -> function ``f(array, axis=...)`` (default mean, sd, min,
        max).
    :return: ``{site: {statistic: p}}``; values near 0 or 1 flag a misfit.
    """
    statistics = statistics or {"mean": np.mean, "sd": np.std, "min": np.min, "max": np.max}
    out = {}
    for name, rep in idata.posterior_predictive.data_vars.items():
        y = np.asarray(idata.observed_data[name]).ravel()
        reps = np.asarray(rep).reshape(-1, y.size)
        out[name] = {s: float(np.mean(f(reps, axis=1) >= f(y[None], axis=1)[0]))
                     for s, f in statistics.items()}
    return out
