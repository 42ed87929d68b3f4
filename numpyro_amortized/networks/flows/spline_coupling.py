"""Rational-quadratic spline coupling (Durkan et al. 2019).

Each transformed coordinate goes through a monotone rational-quadratic spline on
``[-bound, bound]`` with ``num_bins`` bins, and the identity outside (linear tails, with unit
derivative at the boundary so the map is C^1). Widths, heights and interior derivatives come
from the conditioner.

Such a spline maps ``[-bound, bound]`` onto itself, so a layer that contracts a narrow bulk
must stretch its outer bins to cover the rest of the interval, and the base's tail goes
through them far out. With ``learned_interval=True`` the conditioner also sets the output
interval ``[-bound e^a, bound e^b]`` and the derivatives at its ends, and the tails continue
linearly with those derivatives: a layer can contract the bulk and its tails together.

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
_MAX_LOG_SCALE = 7.0  # a learned interval's half-widths stay within e^-7 and e^7 of bound


def num_spline_params(num_bins, learned_interval=False):
    """Conditioner outputs per coordinate: widths, heights and interior derivatives, and with
    a learned interval the two boundary derivatives and the interval's two log half-widths."""
    return 3 * num_bins + 3 if learned_interval else 3 * num_bins - 1


def _knots(p, num_bins, bound, learned_interval=False):
    k = num_bins
    w = _MIN_BIN + (1 - _MIN_BIN * k) * jax.nn.softmax(p[..., :k], axis=-1)
    h = _MIN_BIN + (1 - _MIN_BIN * k) * jax.nn.softmax(p[..., k : 2 * k], axis=-1)
    shift = math.log(math.expm1(1 - _MIN_DERIVATIVE))  # zero parameters -> derivative 1
    zero = jnp.zeros(w.shape[:-1] + (1,), w.dtype)
    xk = -bound + 2 * bound * jnp.concatenate([zero, jnp.cumsum(w, axis=-1)], axis=-1)
    cum_h = jnp.concatenate([zero, jnp.cumsum(h, axis=-1)], axis=-1)
    if learned_interval:  # K + 1 derivatives, then the log half-widths (zeros: the identity)
        d = jax.nn.softplus(p[..., 2 * k : 3 * k + 1] + shift) + _MIN_DERIVATIVE
        lo, hi = (bound * jnp.exp(jnp.clip(p[..., i, None], -_MAX_LOG_SCALE, _MAX_LOG_SCALE))
                  for i in (3 * k + 1, 3 * k + 2))
        return xk, -lo + (lo + hi) * cum_h, d
    d = jax.nn.softplus(p[..., 2 * k :] + shift) + _MIN_DERIVATIVE
    ones = jnp.ones(d.shape[:-1] + (1,), d.dtype)
    d = jnp.concatenate([ones, d, ones], axis=-1)
    return xk, -bound + 2 * bound * cum_h, d


def _gather(a, idx):
    return jnp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]


def rational_quadratic_spline(x, p, *, num_bins, bound, inverse=False, learned_interval=False):
    """Elementwise monotone RQ spline with identity tails, or with a learned output interval
    and linear tails (``learned_interval``, see the module docstring).

    :param x: inputs, any shape ``S``.
    :param p: unconstrained parameters, shape ``S + (num_spline_params(num_bins, ...),)``.
    :param inverse: apply the inverse map instead.
    :return: ``(y, log|det|)`` elementwise, both of shape ``S``, for the direction applied.
    """
    xk, yk, d = _knots(p, num_bins, bound, learned_interval)
    knots_in, knots_out = (yk, xk) if inverse else (xk, yk)
    first, last = (knots_in[..., 0], knots_in[..., -1]) if learned_interval else (-bound, bound)
    inside = (x > first) & (x < last)
    xc = jnp.clip(x, first, last)
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
    if not learned_interval:
        return jnp.where(inside, out, x), jnp.where(inside, log_det, 0.0)
    # the tails: lines through the end knots with the end derivatives
    below = x <= first
    slope = jnp.where(below, d[..., 0], d[..., -1])
    slope = 1.0 / slope if inverse else slope
    tail = jnp.where(below, knots_out[..., 0] + (x - first) * slope,
                     knots_out[..., -1] + (x - last) * slope)
    return jnp.where(inside, out, tail), jnp.where(inside, log_det, jnp.log(slope))


class SplineCoupling(Coupling):
    """Rational-quadratic spline coupling layer (starts as the identity).

    :param dim: dimension of the flow.
    :param context_dim: length of the condition (summary) vector.
    :param num_bins: spline bins.
    :param bound: the spline acts on ``[-bound, bound]``, the identity outside.
    :param hidden: conditioner MLP widths.
    :param learned_interval: the conditioner also sets the output interval and the slopes of
        the linear tails (module docstring).

    **Example**::

        layer = SplineCoupling(4, 8, rngs=nnx.Rngs(0))
        y, log_det = layer.transform_and_log_det(jnp.ones((2, 4)), jnp.ones((2, 8)))
    """

    def __init__(self, dim, context_dim, *, num_bins=8, bound=5.0, hidden=(64, 64),
                 learned_interval=False, rngs):
        self.params_per_dim = num_spline_params(num_bins, learned_interval)
        self.num_bins = num_bins
        self.bound = float(bound)
        self.learned_interval = bool(learned_interval)
        super().__init__(dim, context_dim, hidden=hidden, rngs=rngs)

    def _spline(self, x, p, inverse):
        return rational_quadratic_spline(x, p, num_bins=self.num_bins, bound=self.bound,
                                         inverse=inverse, learned_interval=self.learned_interval)

    def _forward(self, x, p):
        return self._spline(x, p, inverse=False)

    def _inverse(self, y, p):
        return self._spline(y, p, inverse=True)
