"""The coupling pattern shared by affine and spline couplings (Dinh et al. 2017).

The first ``dim - dim // 2`` coordinates are transformed elementwise with parameters that an
MLP computes from the other coordinates and the condition (the summary vector); the rest pass
through unchanged. With ``dim == 1`` the single coordinate is transformed conditioned on the
condition alone. Stack couplings with permutations so every coordinate gets transformed.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.layers import MLP

__all__ = ["Coupling"]


class Coupling(nnx.Module):
    """Base class: subclasses set ``params_per_dim`` and implement ``_forward``/``_inverse``.

    ``_forward(x, p)`` and ``_inverse(y, p)`` act elementwise on ``(B, k)`` arrays with
    parameters ``p`` of shape ``(B, k, params_per_dim)`` and return the output and the
    elementwise log-det of that direction.
    """

    params_per_dim: int = 2

    def __init__(self, dim, context_dim, *, hidden=(64, 64), rngs: nnx.Rngs):
        self.dim = dim
        self.num_transformed = dim - dim // 2
        in_features = dim - self.num_transformed + context_dim
        self.conditioner = MLP(
            in_features, hidden, self.num_transformed * self.params_per_dim,
            zero_init=True, rngs=rngs,
        )

    def _params(self, x_id, condition):
        h = x_id if condition is None else jnp.concatenate([x_id, condition], axis=-1)
        p = self.conditioner(h)
        return jnp.reshape(p, p.shape[:-1] + (self.num_transformed, self.params_per_dim))

    def transform_and_log_det(self, x, condition=None):
        """Base side -> data side: ``(y, log|det dy/dx|)``."""
        k = self.num_transformed
        x_tr, x_id = x[..., :k], x[..., k:]
        y_tr, ld = self._forward(x_tr, self._params(x_id, condition))
        return jnp.concatenate([y_tr, x_id], axis=-1), jnp.sum(ld, axis=-1)

    def inverse_and_log_det(self, y, condition=None):
        """Data side -> base side: ``(x, log|det dx/dy|)``."""
        k = self.num_transformed
        y_tr, y_id = y[..., :k], y[..., k:]
        x_tr, ld = self._inverse(y_tr, self._params(y_id, condition))
        return jnp.concatenate([x_tr, y_id], axis=-1), jnp.sum(ld, axis=-1)
