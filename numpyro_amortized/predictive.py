"""Posterior predictive draws: replicated responses for posterior draws of the latents.

Light on purpose (NumPyro only): the guide's one-call posterior predictive and the NUTS
comparison both use it.
"""

from __future__ import annotations

import jax
import numpy as np
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer import Predictive
from numpyro.primitives import Messenger

from numpyro_amortized.simulation import inspect_model, prior_predictive_arguments

__all__ = ["posterior_predictive", "response_sites"]


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
