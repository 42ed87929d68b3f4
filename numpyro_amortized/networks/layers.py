"""Building blocks shared by summary networks and flows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Buffer", "MLP"]


class Buffer(nnx.Variable):
    """A non-trainable array (standardization statistics): kept out of the optimizer."""


class MLP(nnx.Module):
    """A multilayer perceptron with SiLU activations.

    :param in_features: input width.
    :param hidden: widths of the hidden layers.
    :param out_features: output width.
    :param zero_init: initialize the last layer to zero (so couplings start as the identity).
    :param rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features, hidden, out_features, *, zero_init=False, rngs):
        sizes = [in_features, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
        self.out = nnx.Linear(sizes[-1], out_features, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = jax.nn.silu(layer(x))
        return self.out(x)


def buffer_value(b: Buffer):
    """The value of a buffer, with gradients stopped."""
    return jax.lax.stop_gradient(jnp.asarray(b[...]))
