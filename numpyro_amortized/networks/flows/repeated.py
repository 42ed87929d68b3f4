"""Bijections in sequence: a :class:`Chain`, and a :class:`Repeated` chain compiled once.

A flow of L identical blocks written as a Python loop puts L copies of the block (and of its
gradient) into every compiled program, and XLA's compile time on CPU grows faster than the
program. :class:`Repeated` stacks the blocks' parameters on a leading axis and applies them with
one ``jax.lax.scan`` (as flowjax's ``Scan`` does): one copy of the block in the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.layers import stack_modules

__all__ = ["Chain", "Repeated"]


def chain_transform(bijections, x, condition):
    """Apply ``bijections`` in order (base side -> data side): ``(y, summed log-det)``."""
    total = jnp.zeros(x.shape[:-1], x.dtype)
    for b in bijections:
        x, ld = b.transform_and_log_det(x, condition)
        total = total + ld
    return x, total


def chain_inverse(bijections, y, condition):
    """Undo ``bijections`` in reverse order (data side -> base side): ``(x, summed log-det)``."""
    total = jnp.zeros(y.shape[:-1], y.dtype)
    for b in reversed(bijections):
        y, ld = b.inverse_and_log_det(y, condition)
        total = total + ld
    return y, total


class Chain(nnx.Module):
    """Bijections applied in order, as one bijection.

    **Example**::

        block = Chain([AffineCoupling(3, 2, rngs=rngs), ActNorm(3)])
        y, log_det = block.transform_and_log_det(jnp.ones((4, 3)), jnp.ones((4, 2)))
    """

    def __init__(self, bijections):
        self.bijections = nnx.List(bijections)

    def transform_and_log_det(self, x, condition=None):
        return chain_transform(self.bijections, x, condition)

    def inverse_and_log_det(self, y, condition=None):
        return chain_inverse(self.bijections, y, condition)


class Repeated(nnx.Module):
    """Bijections of one structure (same classes, sizes and variables, different values)
    applied in order, as one bijection compiled once: their variables are stacked on a leading
    axis of size ``length`` and the sequence is a ``jax.lax.scan`` over it.

    :param bijections: the bijections, in order from the base side.

    **Example**::

        blocks = Repeated([Chain([SplineCoupling(3, 2, rngs=rngs), ActNorm(3)])
                           for _ in range(5)])
        blocks.unstacked()[0]  # the first block, as built
    """

    def __init__(self, bijections):
        self.stacked = stack_modules(bijections, "Repeated")
        self.length = len(bijections)

    def unstacked(self):
        """The bijections, one module each (copies: for inspection)."""
        graphdef, state = nnx.split(self.stacked)
        return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                for i in range(self.length)]

    def _scan(self, method, x, condition, reverse):
        graphdef, state = nnx.split(self.stacked)

        def body(carry, layer_state):
            x, total = carry
            x, ld = getattr(nnx.merge(graphdef, layer_state), method)(x, condition)
            return (x, total + ld), None

        (x, total), _ = jax.lax.scan(body, (x, jnp.zeros(x.shape[:-1], x.dtype)), state,
                                     reverse=reverse)
        return x, total

    def transform_and_log_det(self, x, condition=None):
        return self._scan("transform_and_log_det", x, condition, reverse=False)

    def inverse_and_log_det(self, y, condition=None):
        return self._scan("inverse_and_log_det", y, condition, reverse=True)
