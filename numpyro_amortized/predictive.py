"""Posterior predictive draws: replicated responses for posterior draws of the latents.

Light on purpose (NumPyro only): the guide's one-call posterior predictive and the NUTS
comparison both use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Literal
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer import Predictive
from numpyro.primitives import Messenger

from numpyro_amortized.simulation import inspect_model, prior_predictive_arguments

__all__ = ["latent_dependent_sites", "posterior_predictive", "response_sites",
           "split_responses"]


def response_sites(model, *args, **kwargs) -> tuple:
    """Observed sites whose distribution depends on the latents (the responses).

    Covariates written as observed sample sites (``x ~ N(0, 1)``, observed) do not depend on
    the latents and are held fixed in a posterior predictive check; responses are replicated.
    """
    responses, _ = split_responses(model, inspect_model(model, *args, **kwargs), args, kwargs)
    return tuple(s.name for s in responses)


def latent_dependent_sites(model, structure, args, kwargs) -> tuple:
    """The observed sites of ``structure`` whose distribution depends on a latent, found from
    the model's program traced with abstract latent values (nothing runs or compiles): an
    output depends on an input when any operation between them reads it."""
    latents = {s.name: jax.ShapeDtypeStruct(s.shape, jnp.result_type(float))
               for s in structure.latents}
    names = [s.name for s in structure.observed]

    def parameters(values):
        with block():
            tr = trace(substitute(seed(model, jax.random.PRNGKey(0)), data=values)).get_trace(
                *args, **kwargs)
        return [jax.tree.leaves(tr[name]["fn"]) for name in names]

    closed, shapes = jax.make_jaxpr(parameters, return_shape=True)(latents)
    jaxpr = closed.jaxpr
    marked = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    flags = [not isinstance(v, Literal) and v in marked for v in jaxpr.outvars]
    out, start = [], 0
    for name, leaves in zip(names, shapes):
        if any(flags[start:start + len(leaves)]):
            out.append(name)
        start += len(leaves)
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


def split_responses(model, structure, args, kwargs):
    """The observed sites of ``structure`` split into responses and covariates written as
    observed sites (whose distribution no latent enters), as two tuples: the summary network
    reads the latter as covariates. Where the model cannot be traced with abstract latent
    values (Python control flow on them), all are responses."""
    if len(structure.observed) < 2:
        return tuple(structure.observed), ()
    try:
        dependent = set(latent_dependent_sites(model, structure, args, kwargs))
    except (TypeError, ValueError, IndexError):  # needs concrete values: all are responses
        return tuple(structure.observed), ()
    return (tuple(s for s in structure.observed if s.name in dependent),
            tuple(s for s in structure.observed if s.name not in dependent))


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
