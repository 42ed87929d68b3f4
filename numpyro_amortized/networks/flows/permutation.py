"""A fixed permutation of coordinates (log-det zero)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.networks.layers import Buffer

__all__ = ["Permutation"]


class Permutation(nnx.Module):
    """Permute coordinates by a fixed random permutation drawn at construction.

    :param dim: dimension of the flow.
    :param num_transformed: if given, the coordinates a coupling layer left unchanged (positions
        ``num_transformed:``) are moved, shuffled, to the front, where the next coupling
        transforms them; the others follow, shuffled. Stacked between couplings this guarantees
        every coordinate is transformed at least every other layer (a fully random permutation
        can leave a coordinate untouched through the whole flow).
    :param rngs: ``nnx.Rngs``; the permutation is drawn from its ``params`` stream.

    **Example**::

        perm = Permutation(3, rngs=nnx.Rngs(0))
        y, _ = perm.transform_and_log_det(jnp.arange(3.0)[None])
    """

    def __init__(self, dim, *, num_transformed=None, rngs: nnx.Rngs):
        key = rngs.params()
        if num_transformed is None:
            perm = np.asarray(jax.random.permutation(key, dim))
        else:
            k1, k2 = jax.random.split(key)
            kept = num_transformed + np.asarray(jax.random.permutation(k1, dim - num_transformed))
            moved = np.asarray(jax.random.permutation(k2, num_transformed))
            perm = np.concatenate([kept, moved]).astype(int)
        # arrays, not static tuples: flows that differ only in their permutations have one
        # structure, and stack (Repeated, StackedFlows)
        self.perm = Buffer(jnp.asarray(perm, jnp.int32))
        self.inverse_perm = Buffer(jnp.asarray(np.argsort(perm), jnp.int32))

    def transform_and_log_det(self, x, condition=None):
        return jnp.take(x, self.perm[...], axis=-1), jnp.zeros(x.shape[:-1], x.dtype)

    def inverse_and_log_det(self, y, condition=None):
        return jnp.take(y, self.inverse_perm[...], axis=-1), jnp.zeros(y.shape[:-1], y.dtype)
