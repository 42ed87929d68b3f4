"""Posterior draws as tables and as ArviZ data, for the guide and for NUTS alike.

Both answers are turned into the same shapes here: a ``(draws, columns)`` matrix with one
column per scalar latent (``"beta[0]"``, ``"sigma"``, ...) for the numeric comparisons, and an
ArviZ data (posterior, optional posterior predictive, observed data; an ``xarray.DataTree``
with ArviZ 1.x, ``InferenceData`` with 0.x) so that ``arviz.summary``, ``plot_pair``,
``plot_forest`` and ``plot_ppc_dist`` (0.x: ``plot_ppc``) work on both.
"""

from __future__ import annotations

import jax
import numpy as np

from numpyro_amortized.compare.arviz_data import from_dict
from numpyro_amortized.predictive import posterior_predictive, response_sites
from numpyro_amortized.programs import log_joint_program, split_static
from numpyro_amortized.simulation import observed_values as _observed_values
from numpyro_amortized.transforms import flatten_draws

__all__ = [
    "flatten_draws",
    "guide_inference_data",
    "observed_values",
    "posterior_predictive",
    "response_sites",
]


def observed_values(model, *args, **kwargs) -> dict:
    """The values of the model's observed sample sites in these arguments, as numpy."""
    return {k: np.asarray(v) for k, v in _observed_values(model, *args, **kwargs).items()}


_replicate = posterior_predictive  # guide_inference_data's argument shadows the name


def to_inference_data(posterior: dict, *, chains=1, sample_stats=None, observed_data=None,
                      posterior_predictive_draws=None, attrs=None):
    """ArviZ data from flat draws (``(chains * draws, ...)``) by site."""

    def by_chain(d):
        if d is None:
            return None
        return {k: np.asarray(v).reshape((chains, -1) + np.shape(v)[1:]) for k, v in d.items()}

    return from_dict(
        posterior=by_chain(posterior),
        sample_stats=sample_stats,
        posterior_predictive=by_chain(posterior_predictive_draws),
        observed_data=observed_data,
        attrs=attrs,
    )


def guide_inference_data(guide, params, rng_key, *args, num_samples=1000, num_chains=4,
                         posterior_predictive=False, predictive_sites=None,
                         **kwargs):
    """The guide's posterior for the dataset in ``args``/``kwargs`` as ArviZ data.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters.
    :param num_samples: posterior draws per chain.
    :param num_chains: independent groups of draws, shown as chains (default 4, as NUTS), so
        ArviZ's chain diagnostics apply: R-hat near 1 and an ESS near the number of draws
        say the draws are independent, as amortized draws are.
    :param posterior_predictive: also replicate the responses through
        ``numpyro.infer.Predictive`` (group ``posterior_predictive``).
    :param predictive_sites: which observed sites to replicate (default: the responses).
    :return: a ``DataTree`` (ArviZ 1.x; ``InferenceData`` with 0.x) with ``posterior``,
        ``observed_data`` and, when asked, ``posterior_predictive``; ``arviz.plot_pair`` and
        ``plot_ppc_dist`` (0.x: ``plot_ppc``) work on it.

    **Example**::

        idata = guide_inference_data(guide, params, key, x=x, y=y, posterior_predictive=True)
        arviz.summary(idata)
    """
    k_post, k_pred = jax.random.split(rng_key)
    draws = guide.sample_posterior(k_post, params, *args,
                                   sample_shape=(num_chains * num_samples,), **kwargs)
    ppc = None
    if posterior_predictive:
        ppc = _replicate(guide.model, k_pred, draws, *args, sites=predictive_sites, **kwargs)
    return to_inference_data(
        draws,
        chains=num_chains,
        observed_data=observed_values(guide.model, *args, **kwargs),
        posterior_predictive_draws=ppc,
        attrs={"inference": "amortized"},
    )


def log_joint(model, latents: dict, *args, **kwargs):
    """``log p(theta, x)`` of ``model`` for each draw in ``latents`` (leading axis), given the
    data in ``args``/``kwargs``, in one vectorized call. It compiles on every call; a guide
    keeps the program for repeated calls (``guide.log_joint``)."""
    dynamic, spec = split_static((args, kwargs))
    return log_joint_program(model, spec)(latents, dynamic)
