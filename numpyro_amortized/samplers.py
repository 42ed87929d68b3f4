"""Samplers that prior-predictive simulation can rely on.

Simulation runs every sampler of the model vectorized over thousands of keys inside one
compiled program, where a sampler that does not return stalls training for good. Here: the
Binomial sampler swapped for :func:`jax.random.binomial` (NumPyro's, vectorized and compiled
for CPU, can fail to return for some parameter values), and :func:`looping_sites`, which names
the sites whose samplers run data-dependent loops.
"""

from __future__ import annotations

import copy

import jax
import jax.extend.core
import jax.numpy as jnp
import numpyro
from numpyro import distributions as dist
from numpyro.handlers import block, seed, trace
from numpyro.primitives import Messenger

__all__ = ["LoopSafe", "looping_sites"]


class _JaxBinomial(dist.BinomialProbs):
    """A Binomial whose ``sample`` is :func:`jax.random.binomial`."""

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        n = jnp.asarray(self.total_count)
        x = jax.random.binomial(key, jnp.broadcast_to(n, shape).astype(jnp.result_type(float)),
                                jnp.broadcast_to(self.probs, shape), shape=shape)
        return jnp.where(jnp.isnan(x), 0, x).astype(n.dtype)  # NaN p gives 0, as NumPyro's


def _loop_safe(fn):
    if isinstance(fn, dist.BinomialProbs | dist.BinomialLogits):
        return _JaxBinomial(fn.probs, fn.total_count, validate_args=False)
    if isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        base = _loop_safe(fn.base_dist)
        if base is not fn.base_dist:
            fn = copy.copy(fn)
            fn.base_dist = base
    return fn


class LoopSafe(Messenger):
    """Swaps samplers that can hang in vectorized simulation for exact ones that do not."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["value"] is None:
            msg["fn"] = _loop_safe(msg["fn"])


def _while_loops(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            return True
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr) and _while_loops(inner):
                    return True
    return False


def looping_sites(model, *args, **kwargs) -> list:
    """``(name, distribution)`` of the sample sites whose simulation runs a data-dependent
    loop (a rejection sampler): the places a simulation can take unbounded time. Only traces
    (runs nothing on a device), so it answers also while a device is busy."""
    found = []

    def sites(key):
        with block():
            tr = trace(seed(model, key)).get_trace(*args, **kwargs)
        for name, s in tr.items():
            if s["type"] == "sample":
                fn = _loop_safe(s["fn"])
                jaxpr = jax.make_jaxpr(lambda k, fn=fn: fn.sample(k))(key)
                if _while_loops(jaxpr.jaxpr):
                    found.append((name, type(s["fn"]).__name__))
        return 0

    with numpyro.validation_enabled(False):
        jax.make_jaxpr(sites)(jax.random.PRNGKey(0))
    return found
