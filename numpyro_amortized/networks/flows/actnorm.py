"""ActNorm: a learned elementwise affine map ``y = x * exp(log_scale) + loc``.

**References:** Kingma & Dhariwal (2018), *Glow*, NeurIPS. Here it starts as the identity; the
data-dependent part of Glow's initialization is done once for the whole flow by
:class:`~numpyro_amortized.networks.flows.standardize.Standardize`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

__all__ = ["ActNorm"]


class ActNorm(nnx.Module):
    """Learned per-coordinate shift and log-scale, unconditional.

    **Example**::

        layer = ActNorm(3)
        y, log_det = layer.transform_and_log_det(jnp.ones((2, 3)))
    """

    def __init__(self, dim, *, rngs: nnx.Rngs | None = None):
        self.loc = nnx.Param(jnp.zeros(dim))
        self.log_scale = nnx.Param(jnp.zeros(dim))

    def transform_and_log_det(self, x, condition=None):
        ls = self.log_scale[...]
        return x * jnp.exp(ls) + self.loc[...], jnp.broadcast_to(jnp.sum(ls), x.shape[:-1])

    def inverse_and_log_det(self, y, condition=None):
        ls = self.log_scale[...]
        return (y - self.loc[...]) * jnp.exp(-ls), jnp.broadcast_to(-jnp.sum(ls), y.shape[:-1])
