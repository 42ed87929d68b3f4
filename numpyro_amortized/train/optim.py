"""The default optimizer: Adam on one raveled vector, cosine decay, clipping, weight decay;
the weight decay of flows, per parameter (one value per member of a flow ensemble); and a
moving average of the parameters around any optimizer (``averaged``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

__all__ = ["ENSEMBLE_WEIGHT_DECAY", "AveragedState", "average_params", "averaged",
           "default_optimizer", "fixed_budget_weight_decay", "flow_weight_decay"]

ENSEMBLE_WEIGHT_DECAY = (0.0, 0.0, 2.0, 2.0)  # of ensemble_flow's default members, in order


def default_optimizer(num_steps, learning_rate=2e-3, weight_decay=None):
    """Adam with a cosine-decayed learning rate and gradient clipping at global norm 1.

    :param num_steps: the length of the cosine decay; ``None`` for a constant rate (a run whose
        rate is set while it trains, as :class:`~numpyro_amortized.train.Converge` does).

    :param weight_decay: ``None``, or a function from the parameters to a tree of the same
        structure holding each leaf's decoupled weight decay (AdamW's, per unit learning rate;
        ``0`` for none), as :func:`flow_weight_decay` makes. :func:`fit` passes the one its
        ``weight_decay`` resolves to; with ``numpyro.infer.SVI``, e.g.
        ``SVI(model, guide, optax_to_numpyro(default_optimizer(n, weight_decay=
        flow_weight_decay(guide, ENSEMBLE_WEIGHT_DECAY))), loss=NPE())``.

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


def fixed_budget_weight_decay(num_train):
    """The weight decay :func:`fit` gives the default fixed-budget flow (an
    :func:`~numpyro_amortized.networks.ensemble_flow` of a spline and an affine flow, each
    plain and decayed) for ``num_train`` training simulations: :data:`ENSEMBLE_WEIGHT_DECAY` up
    to 10,000 and falling as ``1 / num_train`` beyond (0.202 for a bank of 10^5): a larger bank
    is memorized less, and the decay that suits 10^4 over-regularizes it."""
    factor = min(1.0, 10_000 / max(int(num_train), 1))
    return tuple(round(w * factor, 3) for w in ENSEMBLE_WEIGHT_DECAY)


def flow_weight_decay(guide, weight_decay):
    """A function from the guide's parameters (a pure dict or SVI's param dict) to each leaf's
    decoupled weight decay, for :func:`default_optimizer`: ``weight_decay`` on every flow
    parameter (a number), or one number per member of a flow ensemble (in member order); 0 on
    the summary network and on an ensemble's mixture weights. Static: read from the guide's
    structure once."""
    from numpyro_amortized.networks.flows import FlowEnsemble

    flow = guide.posterior(guide.init_params).flow
    per_member = np.ndim(weight_decay) > 0
    if per_member:
        decays = np.asarray(weight_decay, np.float32)
        if not isinstance(flow, FlowEnsemble) or decays.shape != (flow.num_members,):
            members = flow.num_members if isinstance(flow, FlowEnsemble) else "no"
            raise ValueError(f"weight_decay={tuple(weight_decay)}: one value per flow-ensemble "
                             f"member needs an ensemble of {decays.size} members; this guide's "
                             f"flow has {members} members. Give one number for all.")

    def decay_tree(params):  # numpy values: static, known while the update is traced
        outer = isinstance(params, dict) and guide.param_name in params
        net = params[guide.param_name] if outer else params
        out = jax.tree.map(lambda p: np.float32(0.0), net)
        if per_member:
            for g, members in enumerate(flow.member_groups):
                w = decays[list(members)]
                out["flow"]["groups"][g] = jax.tree.map(
                    lambda p, w=w: np.reshape(w, w.shape + (1,) * (p.ndim - 1)),
                    net["flow"]["groups"][g])
        elif weight_decay:
            out["flow"] = jax.tree.map(lambda p: np.float32(weight_decay), net["flow"])
            if "log_weights" in out["flow"]:
                out["flow"]["log_weights"] = np.float32(0.0)
        if outer:  # other parameters (of the model, under SVI) are not decayed
            return {**jax.tree.map(lambda p: np.float32(0.0), params), guide.param_name: out}
        return out

    return decay_tree


class AveragedState(NamedTuple):
    """The state of :func:`averaged`: the inner optimizer's, and the moving average of the
    parameters (raveled, not yet divided by ``weight``, the total weight so far)."""

    inner: optax.OptState
    average: jax.Array
    weight: jax.Array


def check_ema_decay(decay):
    """``decay`` as a float, or a ``ValueError`` unless it lies in (0, 1)."""
    decay = float(decay)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay={decay}: the moving average's decay lies in (0, 1), e.g. "
                         "0.999 for an average over about the last 1,000 steps.")
    return decay


def averaged(optimizer, decay):
    """``optimizer``, also keeping an exponential moving average of the parameters after each
    update (Polyak averaging): ``a <- decay a + (1 - decay) params``, divided by ``1 - decay^t``
    as Adam's moments are, so it does not start at zero. The updates are the inner optimizer's,
    unchanged; the average, of about the last ``1 / (1 - decay)`` steps, is less noisy than the
    last step's parameters. :func:`average_params` reads it from a
    :class:`~numpyro_amortized.train.TrainState`; :func:`~numpyro_amortized.fit` validates,
    keeps and returns it (``fit(..., ema_decay=...)``).
    """
    decay = check_ema_decay(decay)

    def init(params):
        flat = ravel_pytree(params)[0]
        return AveragedState(optimizer.init(params), jnp.zeros_like(flat),
                             jnp.zeros((), flat.dtype))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("averaged(...) needs the parameters: call update(updates, state, "
                             "params).")
        updates, inner = optimizer.update(updates, state.inner, params)
        new = ravel_pytree(optax.apply_updates(params, updates))[0]
        return updates, AveragedState(inner, decay * state.average + (1 - decay) * new,
                                      decay * state.weight + (1 - decay))

    return optax.GradientTransformation(init, update)


def average_params(state):
    """The parameters a run is judged by: the moving average of an :func:`averaged`
    optimizer's state (``state.params`` before the first update), else ``state.params``."""
    opt = state.opt_state
    if not isinstance(opt, AveragedState):
        return state.params
    flat, unravel = ravel_pytree(state.params)
    return unravel(jnp.where(opt.weight > 0, opt.average / jnp.maximum(opt.weight, 1e-30), flat))


def with_params(state, params):
    """``state`` with ``params`` (a run going back to its best parameters), and an
    :func:`averaged` optimizer's average restarted at them."""
    opt = state.opt_state
    if isinstance(opt, AveragedState):
        flat = ravel_pytree(params)[0]
        opt = opt._replace(average=flat * opt.weight)
    return state._replace(params=params, opt_state=opt)
