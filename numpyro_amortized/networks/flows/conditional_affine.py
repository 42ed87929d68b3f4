"""Conditional elementwise affine map: ``y = loc(c) + scale(c) * x`` with ``loc, scale = MLP(c)``.

Placed on the data side of a coupling flow it gives every dataset its own location and scale,
so the bounded splines work on a unit scale and the flow's tails contract with the posterior
(without it, base draws beyond the spline interval land at the prior's scale).

Trained with the flow alone, the layer need not do that: the splines can contract the bulk
themselves, and then they stretch their outer bins, where a base draw in its tail lands many
posterior sds out. With ``fitted=True`` the location and scale are also fitted to the latents
by their own Gaussian likelihood (:meth:`ConditionalAffine.gaussian_log_prob`, which the flow
adds to its training objective), so they follow the posterior's mean and sd and the splines
shape a variable of unit scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.layers import MLP

__all__ = ["ConditionalAffine"]

_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class ConditionalAffine(nnx.Module):
    """Elementwise shift and scale computed from the condition alone (starts as the identity).

    :param dim: dimension of the flow.
    :param context_dim: length of the condition (summary) vector.
    :param hidden: MLP widths.
    :param fitted: also fit the location and scale to the latents' mean and sd (module
        docstring).

    **Example**::

        layer = ConditionalAffine(3, 8, rngs=nnx.Rngs(0))
        y, log_det = layer.transform_and_log_det(jnp.ones((2, 3)), jnp.ones((2, 8)))
    """

    def __init__(self, dim, context_dim, *, hidden=(64, 64), fitted=False, rngs: nnx.Rngs):
        self.net = MLP(context_dim, hidden, 2 * dim, zero_init=True, rngs=rngs)
        self.dim = dim
        self.fitted = bool(fitted)

    def gaussian_log_prob(self, y, condition):
        """``log N(y; loc, diag(scale^2))`` of the layer's output ``y``: with it added to the
        training objective, the location and scale fit the mean and sd of ``y``."""
        loc, scale = self._loc_scale(condition)
        z = (y - loc) / scale
        return jnp.sum(-0.5 * z * z - jnp.log(scale) - 0.5 * math.log(2 * math.pi), axis=-1)

    def _loc_scale(self, condition):
        p = self.net(condition)
        scale = jax.nn.softplus(p[..., self.dim :] + _SOFTPLUS_INV_ONE) + 1e-4
        return p[..., : self.dim], scale

    def transform_and_log_det(self, x, condition):
        loc, scale = self._loc_scale(condition)
        return loc + scale * x, jnp.sum(jnp.log(scale), axis=-1)

    def inverse_and_log_det(self, y, condition):
        loc, scale = self._loc_scale(condition)
        return (y - loc) / scale, -jnp.sum(jnp.log(scale), axis=-1)
