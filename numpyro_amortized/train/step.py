"""The pure training core: ``trainer(guide, ...) -> Trainer(init, update)``.

``init(rng_key, *args) -> TrainState`` and ``update(state, *args, simulations=None) ->
(TrainState, StepInfo)`` are pure and jittable (``update`` also runs under ``jax.pmap`` with
``axis_name``), as NumPyro's ``SVI.init``/``SVI.update`` and BlackJAX's kernels are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from numpyro_amortized.losses import NPE, resolve_batch_size
from numpyro_amortized.train.optim import default_optimizer

__all__ = ["StepInfo", "TrainState", "Trainer", "trainer"]


class TrainState(NamedTuple):
    """Parameters (pure dict), optimizer state, key, step, and fault counters."""

    params: dict
    opt_state: optax.OptState
    rng_key: jax.Array
    step: jax.Array
    num_skipped: jax.Array
    num_dropped: jax.Array


class StepInfo(NamedTuple):
    """What one update did: the loss, whether the update was skipped (non-finite loss or
    gradient), and how many simulations were dropped for being non-finite."""

    loss: jax.Array
    skipped: jax.Array
    num_dropped: jax.Array


class Trainer(NamedTuple):
    init: Callable
    update: Callable


def _all_finite(tree):
    """Whether every value in ``tree`` is finite: one reduction over the raveled leaves."""
    return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def _axis_size(axis_name):
    return jax.lax.psum(1, axis_name)


def trainer(guide, *, loss=None, optimizer=None, batch_size=None, axis_name=None,
            data_sharding=None) -> Trainer:
    """The pure training core for ``guide``.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any ``optax.GradientTransformation`` (default :func:`default_optimizer`
        for 10,000 steps).
    :param batch_size: simulations per update, over all devices (the global batch); default
        the loss's ``batch_size``, else 256.
    :param axis_name: under ``jax.pmap`` (or ``shard_map``), the mapped axis: each device
        simulates ``batch_size / axis_size`` datasets with its own keys, and the loss and
        gradient are the mean over the global batch (a ``psum``), so the update is the one a
        single device would make on the same simulations.
    :param data_sharding: under ``jax.jit`` over a device mesh, a ``NamedSharding`` that splits
        the batch axis (e.g. ``NamedSharding(mesh, P("data"))``): simulations and the loss are
        partitioned over the devices, parameters stay replicated, and the result does not
        depend on the number of devices (JAX's random numbers are partitionable).

    A non-finite loss or gradient leaves the parameters and optimizer state untouched and is
    counted in ``num_skipped``; non-finite simulations are left out of the loss and counted.
    ``update(..., update_scale=s)`` multiplies the optimizer's step by ``s`` (a traced scalar:
    the learning-rate factor :func:`fit` lowers on a validation plateau, without recompiling).

    **Example**::

        tr = trainer(guide, loss=NPE())
        state = tr.init(jax.random.PRNGKey(0), *model_args)
        step = jax.jit(lambda s: tr.update(s, *model_args))
        state, info = step(state)
    """
    batch_size = resolve_batch_size(loss, batch_size)
    loss = NPE() if loss is None else loss
    if optimizer is None:
        optimizer = default_optimizer(10_000)

    def init(rng_key, *args, **kwargs) -> TrainState:
        k_setup, k_state = jax.random.split(rng_key)
        params = guide.setup(k_setup, *args, **kwargs)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params, optimizer.init(params), k_state, zero, zero, zero)

    def update(state, *args, simulations=None, update_scale=None, **kwargs):
        rng_key, k_sim, k_loss = jax.random.split(state.rng_key, 3)
        sims = simulations
        if sims is None:
            n = batch_size
            if axis_name is not None:
                devices = _axis_size(axis_name)
                if batch_size % devices:
                    raise ValueError(f"batch_size={batch_size} is not a multiple of the "
                                     f"{devices} devices of axis '{axis_name}'.")
                n = batch_size // devices
                k_sim = jax.random.fold_in(k_sim, jax.lax.axis_index(axis_name))
            sims = guide.simulate(k_sim, n, *args, **kwargs)
        if data_sharding is not None:
            sims = jax.lax.with_sharding_constraint(sims, data_sharding)
        if axis_name is not None:
            k_loss = jax.random.fold_in(k_loss, jax.lax.axis_index(axis_name))
        count = jnp.sum(sims.valid)
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name)

        # the mean over the global batch: local sums over the global count, then a psum
        def objective(params):
            losses = loss.simulation_losses(guide, params, k_loss, sims, *args, **kwargs)
            return jnp.sum(jnp.where(sims.valid, losses, 0.0)) / jnp.maximum(count, 1)

        value, grads = jax.value_and_grad(objective)(state.params)
        num_dropped = jnp.sum(~sims.valid).astype(jnp.int32)
        if axis_name is not None:
            value, grads = jax.lax.psum((value, grads), axis_name)
            num_dropped = jax.lax.psum(num_dropped, axis_name)
        ok = jnp.isfinite(value) & _all_finite(grads) & (count > 0)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if update_scale is not None:  # a learning-rate factor chosen while training runs
            updates = jax.tree.map(lambda u: u * update_scale, updates)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            keep(params, state.params),
            keep(opt_state, state.opt_state),
            rng_key,
            state.step + 1,
            state.num_skipped + (~ok).astype(jnp.int32),
            state.num_dropped + num_dropped,
        )
        return new_state, StepInfo(value, ~ok, num_dropped)

    return Trainer(init, update)
