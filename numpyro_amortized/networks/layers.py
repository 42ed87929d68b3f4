"""Building blocks shared by summary networks and flows."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MLP", "Buffer", "masked_moments"]


class Buffer(nnx.Variable):
    """A non-trainable array (standardization statistics): kept out of the optimizer."""


class MLP(nnx.Module):
    """A multilayer perceptron with SiLU activations and a linear skip path.

    ``MLP(x) = out(hidden(x)) + skip(x)``: the linear path lets the network represent the
    linear part of a map exactly (posterior locations are often close to linear in the data's
    summaries), the hidden layers learn the rest.

    :param in_features: input width.
    :param hidden: widths of the hidden layers.
    :param out_features: output width.
    :param zero_init: initialize the output and skip layers to zero (so couplings start as the
        identity).
    :param rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features, hidden, out_features, *, zero_init=False, rngs):
        sizes = [in_features, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
        self.out = nnx.Linear(sizes[-1], out_features, kernel_init=init, rngs=rngs)
        self.skip = nnx.Linear(in_features, out_features, use_bias=False,
                               kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x):
        h = x
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return self.out(h) + self.skip(x)


def buffer_value(b: Buffer):
    """The value of a buffer, with gradients stopped."""
    return jax.lax.stop_gradient(jnp.asarray(b[...]))


def masked_moments(x, mask, *, max_corr_features=16):
    """Standardize each dataset of a masked set by its own mean and sd per feature.

    :param x: ``(..., N, F)`` observations; ``mask``: ``(..., N)``.
    :return: the standardized set (zero where masked) and ``[mean, log sd]`` (``(..., F)``
        each), plus the feature correlations (upper triangle) when ``F <= max_corr_features``.
    """
    m = mask[..., None].astype(x.dtype)
    n_safe = jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    mean = jnp.sum(x * m, axis=-2) / n_safe
    var = jnp.sum(((x - mean[..., None, :]) * m) ** 2, axis=-2) / n_safe
    sd = jnp.sqrt(var + 1e-6)
    z = (x - mean[..., None, :]) / sd[..., None, :] * m
    stats = [mean, jnp.log(sd)]
    f = x.shape[-1]
    if 1 < f <= max_corr_features:
        corr = jnp.einsum("...ni,...nj->...ij", z, z) / n_safe[..., None]
        i, j = np.triu_indices(f, k=1)
        stats.append(corr[..., i, j])
    return z, stats
