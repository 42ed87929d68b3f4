"""A fixed affine map from standardized to original coordinates, ``y = x * scale + loc``.

``loc`` and ``scale`` are buffers (not trained): the guide sets them from the prior-predictive
mean and sd of the unconstrained latents, so the rest of the flow works on z-scored values.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.layers import Buffer, buffer_value

__all__ = ["Standardize"]


class Standardize(nnx.Module):
    """Fixed (non-trainable) shift and scale.

    **Example**::

        layer = Standardize(jnp.zeros(2), jnp.full(2, 3.0))
        y, log_det = layer.transform_and_log_det(jnp.ones((5, 2)))   # log_det = 2 log 3
    """

    def __init__(self, loc, scale):
        self.loc = Buffer(jnp.asarray(loc, dtype=float))
        self.scale = Buffer(jnp.asarray(scale, dtype=float))

    def transform_and_log_det(self, x, condition=None):
        scale = buffer_value(self.scale)
        ld = jnp.broadcast_to(jnp.sum(jnp.log(scale)), x.shape[:-1])
        return x * scale + buffer_value(self.loc), ld

    def inverse_and_log_det(self, y, condition=None):
        scale = buffer_value(self.scale)
        ld = jnp.broadcast_to(-jnp.sum(jnp.log(scale)), y.shape[:-1])
        return (y - buffer_value(self.loc)) / scale, ld
