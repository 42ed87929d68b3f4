"""Affine coupling: ``y = x * scale + shift`` with ``scale, shift = MLP(x_rest, condition)``.

**References:** Dinh, Sohl-Dickstein & Bengio (2017), *Density estimation using Real NVP*.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from numpyro_amortized.networks.flows.coupling import Coupling

__all__ = ["AffineCoupling"]

_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class AffineCoupling(Coupling):
    """Affine coupling layer; the scale is ``softplus(raw) + 1e-3``, so it stays positive and
    the layer starts as the identity.

    :param dim: dimension of the flow.
    :param context_dim: length of the condition (summary) vector.
    :param hidden: conditioner MLP widths.

    **Example**::

        layer = AffineCoupling(4, 8, rngs=nnx.Rngs(0))
        y, log_det = layer.transform_and_log_det(jnp.ones((2, 4)), jnp.ones((2, 8)))
    """

    params_per_dim = 2

    @staticmethod
    def _scale_shift(p):
        scale = jax.nn.softplus(p[..., 0] + _SOFTPLUS_INV_ONE) + 1e-3
        return scale, p[..., 1]

    def _forward(self, x, p):
        scale, shift = self._scale_shift(p)
        return x * scale + shift, jnp.log(scale)

    def _inverse(self, y, p):
        scale, shift = self._scale_shift(p)
        return (y - shift) / scale, -jnp.log(scale)
