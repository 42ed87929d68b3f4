"""The default optimizer: Adam on one raveled vector, cosine decay, clipping, weight decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

__all__ = ["default_optimizer"]


def default_optimizer(num_steps, learning_rate=2e-3, weight_decay=None):
    """Adam with a cosine-decayed learning rate and gradient clipping at global norm 1.

    :param num_steps: the length of the cosine decay; ``None`` for a constant rate (a run whose
        rate is set while it trains, as :class:`~numpyro_amortized.train.Converge` does).

    :param weight_decay: ``None``, or a function from the parameters to a tree of the same
        structure holding each leaf's decoupled weight decay (AdamW's, per unit learning rate;
        ``0`` for none). :func:`fit` and :func:`trainer` pass the guide's
        :meth:`~numpyro_amortized.AutoAmortizedFlow.weight_decay`; with
        ``numpyro.infer.SVI`` or an optimizer of your own, pass it yourself, e.g.
        ``SVI(model, guide, optax_to_numpyro(default_optimizer(n, weight_decay=guide.weight_decay)),
        loss=NPE())``, or the flows' weight decay is not applied.

    The update runs on all parameters raveled into one vector (as ``optax.flatten`` does), a
    handful of operations on one array instead of a few per parameter leaf: a guide has over a
    hundred leaves, and XLA compiles each leaf's operations apart. The state (Adam's moments)
    holds one vector each.
    """
    schedule = (optax.constant_schedule(learning_rate) if num_steps is None
                else optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1), alpha=0.01))
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())
    rate = optax.scale_by_learning_rate(schedule)

    def init(params):
        flat = ravel_pytree(params)[0]
        return adam.init(flat), rate.init(flat)

    def update(updates, state, params=None):
        flat, unravel = ravel_pytree(updates)
        step, adam_state = adam.update(flat, state[0])
        if weight_decay is not None:  # decoupled: added to Adam's step, before the rate
            if params is None:
                raise ValueError("default_optimizer(weight_decay=...) needs the parameters: "
                                 "call update(updates, state, params).")
            decay = weight_decay(params)
            if any(np.any(np.asarray(w)) for w in jax.tree.leaves(decay)):
                decay = jax.tree.map(
                    lambda w, p: jnp.broadcast_to(jnp.asarray(w, p.dtype), p.shape), decay, params)
                step = step + ravel_pytree(decay)[0] * ravel_pytree(params)[0]
        step, rate_state = rate.update(step, state[1])
        return unravel(step), (adam_state, rate_state)

    return optax.GradientTransformation(init, update)
