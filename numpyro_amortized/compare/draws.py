"""Posterior draws as tables and as ArviZ data, for the guide and for NUTS alike.

Both answers are turned into the same shapes here: a ``(draws, columns)`` matrix with one
column per scalar latent (``"beta[0]"``, ``"sigma"``, ...) for the numeric comparisons, and an
``arviz.InferenceData`` (posterior, optional posterior predictive, observed data) so that
``arviz.summary``, ``plot_pair``, ``plot_forest`` and ``plot_ppc`` work on both.
"""

from __future__ import annotations

import functools

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer import Predictive
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from numpyro_amortized.simulation import inspect_model, prior_predictive_arguments
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


def response_sites(model, *args, **kwargs) -> tuple:
    """Observed sites whose distribution depends on the latents (the responses).

    Covariates written as observed sample sites (``x ~ N(0, 1)``, observed) do not depend on
    the latents and are held fixed in a posterior predictive check; responses are replicated.
    Found by tracing the model at two different prior draws of its latents.
    """
    structure = inspect_model(model, *args, **kwargs)
    latents = [s.name for s in structure.latents]
    traces = []
    for k in (1, 2):
        with block():
            prior = trace(seed(model, jax.random.PRNGKey(k))).get_trace(*args, **kwargs)
            values = {n: prior[n]["value"] for n in latents}
            traces.append(
                trace(substitute(seed(model, jax.random.PRNGKey(0)), data=values)).get_trace(
                    *args, **kwargs
                )
            )
    out = []
    for site in structure.observed:
        a = jax.tree.leaves(traces[0][site.name]["fn"])
        b = jax.tree.leaves(traces[1][site.name]["fn"])
        same = len(a) == len(b) and all(
            np.shape(x) == np.shape(y) and np.allclose(x, y) for x, y in zip(a, b)
        )
        if not same:
            out.append(site.name)
    return tuple(out)


class _Replicate(Messenger):
    """Draw the named observed sites afresh instead of conditioning on their values."""

    def __init__(self, fn, sites):
        self.sites = set(sites)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] and msg["name"] in self.sites:
            msg["is_observed"] = False
            msg["value"] = None


def posterior_predictive(model, rng_key, draws: dict, *args, sites=None, **kwargs) -> dict:
    """Replicated data ``x_rep ~ p(x | theta)`` for each posterior draw, through
    ``numpyro.infer.Predictive``.

    :param draws: posterior draws by latent site, leading axis ``num_draws``.
    :param sites: observed sites to replicate (default :func:`response_sites`); the other
        observed sites (covariates) keep their values.
    :return: dict from site name to ``(num_draws, *site_shape)``.
    """
    sites = response_sites(model, *args, **kwargs) if sites is None else tuple(sites)
    # a scan's observations are replicated by calling the model without them (the scan's
    # carry must take the replicated values), as Predictive is used for such models
    args, kwargs = prior_predictive_arguments(model, args, kwargs, sites)
    predictive = Predictive(_Replicate(model, sites), posterior_samples=draws,
                            return_sites=list(sites))
    return predictive(rng_key, *args, **kwargs)


_replicate = posterior_predictive  # guide_inference_data's argument shadows the name


def to_inference_data(posterior: dict, *, chains=1, sample_stats=None, observed_data=None,
                      posterior_predictive_draws=None, attrs=None) -> az.InferenceData:
    """Build ``InferenceData`` from flat draws (``(chains * draws, ...)``) by site."""

    def by_chain(d):
        if d is None:
            return None
        return {k: np.asarray(v).reshape((chains, -1) + np.shape(v)[1:]) for k, v in d.items()}

    return az.from_dict(
        posterior=by_chain(posterior),
        sample_stats=sample_stats,
        posterior_predictive=by_chain(posterior_predictive_draws),
        observed_data=observed_data,
        attrs=attrs,
    )


def guide_inference_data(guide, params, rng_key, *args, num_samples=1000, num_chains=4,
                         posterior_predictive=False, predictive_sites=None,
                         **kwargs) -> az.InferenceData:
    """The guide's posterior for the dataset in ``args``/``kwargs`` as ``InferenceData``.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters.
    :param num_samples: posterior draws per chain.
    :param num_chains: independent groups of draws, shown as chains (default 4, as NUTS), so
        ArviZ's chain diagnostics apply: R-hat near 1 and an ESS near the number of draws
        say the draws are independent, as amortized draws are.
    :param posterior_predictive: also replicate the responses through
        ``numpyro.infer.Predictive`` (group ``posterior_predictive``).
    :param predictive_sites: which observed sites to replicate (default: the responses).
    :return: ``InferenceData`` with ``posterior``, ``observed_data`` and, when asked,
        ``posterior_predictive``; ``arviz.plot_ppc`` and ``plot_pair`` work on it.

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


# ---------------------------------------------------------------------------- jit with statics
def split_static(tree):
    """Split a pytree into its array leaves (traced) and a hashable spec of everything else."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
    dynamic = [jnp.asarray(x) for x, a in zip(leaves, is_array) if a]
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    return dynamic, (treedef, tuple(is_array), static)


def merge_static(dynamic, spec):
    treedef, is_array, static = spec
    it = iter(dynamic)
    return jax.tree.unflatten(treedef, [next(it) if a else s for a, s in zip(is_array, static)])


def abstract_key(dynamic) -> tuple:
    """Shapes and dtypes of the traced leaves: one compilation serves all data like these."""
    return tuple((tuple(x.shape), str(x.dtype)) for x in dynamic)


@functools.lru_cache(maxsize=64)
def _log_joint_fn(model, spec):
    def log_joint(latents, dynamic):
        args, kwargs = merge_static(dynamic, spec)
        return jax.vmap(lambda z: log_density(model, args, kwargs, z)[0])(latents)

    return jax.jit(log_joint)


def log_joint(model, latents: dict, *args, **kwargs):
    """``log p(theta, x)`` of ``model`` for each draw in ``latents`` (leading axis), given the
    data in ``args``/``kwargs``: one compiled, vectorized call reused for data of equal shapes."""
    dynamic, spec = split_static((args, kwargs))
    return _log_joint_fn(model, spec)(latents, dynamic)
