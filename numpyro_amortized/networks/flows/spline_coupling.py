"""Rational-quadratic spline coupling (Durkan et al. 2019).

Each transformed coordinate goes through a monotone rational-quadratic spline on
``[-bound, bound]`` with ``num_bins`` bins, and the identity outside (linear tails, with unit
derivative at the boundary so the map is C^1). Widths, heights and interior derivatives come
from the conditioner.

**References:** Durkan, Bekasov, Murray & Papamakarios (2019), *Neural Spline Flows*, NeurIPS.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from numpyro_amortized.networks.flows.coupling import Coupling

__all__ = ["SplineCoupling", "rational_quadratic_spline"]

_MIN_BIN = 1e-3
_MIN_DERIVATIVE = 1e-3


def _knots(p, num_bins, bound):
    k = num_bins
    w = _MIN_BIN + (1 - _MIN_BIN * k) * jax.nn.softmax(p[..., :k], axis=-1)
    h = _MIN_BIN + (1 - _MIN_BIN * k) * jax.nn.softmax(p[..., k : 2 * k], axis=-1)
    shift = math.log(math.expm1(1 - _MIN_DERIVATIVE))  # zero parameters -> derivative 1
    d = jax.nn.softplus(p[..., 2 * k :] + shift) + _MIN_DERIVATIVE
    ones = jnp.ones(d.shape[:-1] + (1,), d.dtype)
    d = jnp.concatenate([ones, d, ones], axis=-1)
    zero = jnp.zeros(w.shape[:-1] + (1,), w.dtype)
    xk = -bound + 2 * bound * jnp.concatenate([zero, jnp.cumsum(w, axis=-1)], axis=-1)
    yk = -bound + 2 * bound * jnp.concatenate([zero, jnp.cumsum(h, axis=-1)], axis=-1)
    return xk, yk, d


def _gather(a, idx):
    return jnp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]


def rational_quadratic_spline(x, p, *, num_bins, bound, inverse=False):
    """Elementwise monotone RQ spline with identity tails.

    :param x: inputs, any shape ``S``.
    :param p: unconstrained parameters, shape ``S + (3 * num_bins - 1,)``.
    :param inverse: apply the inverse map instead.
    :return: ``(y, log|det|)`` elementwise, both of shape ``S``, for the direction applied.
    """
    xk, yk, d = _knots(p, num_bins, bound)
    inside = (x > -bound) & (x < bound)
    xc = jnp.clip(x, -bound, bound)
    knots_in = yk if inverse else xk
    idx = jnp.sum(xc[..., None] >= knots_in[..., 1:num_bins], axis=-1)
    x0, x1 = _gather(xk, idx), _gather(xk, idx + 1)
    y0, y1 = _gather(yk, idx), _gather(yk, idx + 1)
    d0, d1 = _gather(d, idx), _gather(d, idx + 1)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if inverse:
        dy = xc - y0
        c2 = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * c2
        b = h * d0 - dy * c2
        c = -s * dy
        disc = jnp.maximum(b**2 - 4 * a * c, 0.0)
        xi = jnp.clip(2 * c / (-b - jnp.sqrt(disc)), 0.0, 1.0)
        out = x0 + xi * w
    else:
        xi = (xc - x0) / w
        out = None
    t = xi * (1 - xi)
    den = s + (d1 + d0 - 2 * s) * t
    log_det = (
        2 * jnp.log(s)
        + jnp.log(d1 * xi**2 + 2 * s * t + d0 * (1 - xi) ** 2)
        - 2 * jnp.log(den)
    )
    if not inverse:
        out = y0 + h * (s * xi**2 + d0 * t) / den
    else:
        log_det = -log_det
    return jnp.where(inside, out, x), jnp.where(inside, log_det, 0.0)


class SplineCoupling(Coupling):
    """Rational-quadratic spline coupling layer (starts as the identity).

    :param dim: dimension of the flow.
    :param context_dim: length of the condition (summary) vector.
    :param num_bins: spline bins.
    :param bound: the spline acts on ``[-bound, bound]``, the identity outside.
    :param hidden: conditioner MLP widths.

    **Example**::

        layer = SplineCoupling(4, 8, rngs=nnx.Rngs(0))
        y, log_det = layer.transform_and_log_det(jnp.ones((2, 4)), jnp.ones((2, 8)))
    """

    def __init__(self, dim, context_dim, *, num_bins=8, bound=5.0, hidden=(64, 64), rngs):
        self.params_per_dim = 3 * num_bins - 1
        self.num_bins = num_bins
        self.bound = float(bound)
        super().__init__(dim, context_dim, hidden=hidden, rngs=rngs)

    def _forward(self, x, p):
        return rational_quadratic_spline(x, p, num_bins=self.num_bins, bound=self.bound)

    def _inverse(self, y, p):
        return rational_quadratic_spline(
            y, p, num_bins=self.num_bins, bound=self.bound, inverse=True
        )
