"""Training: a pure ``init``/``update`` core and a ``fit`` loop with progress and validation.

``trainer(guide, ...)`` returns ``Trainer(init, update)``: ``init(rng_key, *args) -> TrainState``
and ``update(state, *args, simulations=None) -> (TrainState, StepInfo)`` are pure and jittable
(``update`` also runs under ``jax.pmap`` with ``axis_name``). :func:`fit` runs them in chunks of
``lax.scan`` inside ``jax.jit`` (one compilation, no host round trip per step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from numpyro_amortized.losses import NPE, masked_mean

__all__ = ["FitResult", "StepInfo", "TrainState", "Trainer", "default_optimizer", "fit", "trainer"]


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


class FitResult(NamedTuple):
    """The result of :func:`fit`.

    :param params: trained parameters, ``{guide.param_name: ...}`` as ``SVI.get_params`` gives.
    :param losses: training loss per step (``num_steps``,).
    :param validation_losses: ``(steps, losses)`` of the held-out loss during training.
    :param state: the final :class:`TrainState` (to continue training).
    :param num_skipped: updates skipped because the loss or gradient was not finite.
    :param num_dropped: simulations dropped because they contained NaN or infinity.
    :param num_simulations: simulations used for training (drawn online, or the bank size).
    :param compile_time: seconds spent compiling; :param train_time: seconds spent training.
    """

    params: dict
    losses: np.ndarray
    validation_losses: tuple
    state: TrainState
    num_skipped: int
    num_dropped: int
    num_simulations: int
    compile_time: float
    train_time: float


def default_optimizer(num_steps, learning_rate=2e-3):
    """Adam with a cosine-decayed learning rate and gradient clipping at global norm 1."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1), alpha=0.01)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def trainer(guide, *, loss=None, optimizer=None, batch_size=256, axis_name=None) -> Trainer:
    """The pure training core for ``guide``.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any ``optax.GradientTransformation`` (default :func:`default_optimizer`
        for 10,000 steps).
    :param batch_size: simulations per online update.
    :param axis_name: under ``jax.pmap``/``shard_map``, the axis to average gradients over.

    A non-finite loss or gradient leaves the parameters and optimizer state untouched and is
    counted in ``num_skipped``; non-finite simulations are left out of the loss and counted.

    **Example**::

        tr = trainer(guide, loss=NPE())
        state = tr.init(jax.random.PRNGKey(0), *model_args)
        step = jax.jit(lambda s: tr.update(s, *model_args))
        state, info = step(state)
    """
    loss = NPE() if loss is None else loss
    optimizer = default_optimizer(10_000) if optimizer is None else optimizer

    def init(rng_key, *args, **kwargs) -> TrainState:
        k_setup, k_state = jax.random.split(rng_key)
        params = guide.setup(k_setup, *args, **kwargs)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params, optimizer.init(params), k_state, zero, zero, zero)

    def update(state, *args, simulations=None, **kwargs):
        rng_key, k_sim, k_loss = jax.random.split(state.rng_key, 3)
        sims = simulations
        if sims is None:
            sims = guide.simulate(k_sim, batch_size, *args, **kwargs)

        def objective(params):
            losses = loss.simulation_losses(guide, params, k_loss, sims, *args, **kwargs)
            return masked_mean(losses, sims.valid)

        value, grads = jax.value_and_grad(objective)(state.params)
        num_dropped = jnp.sum(~sims.valid).astype(jnp.int32)
        if axis_name is not None:
            value, grads = jax.lax.pmean((value, grads), axis_name)
            num_dropped = jax.lax.psum(num_dropped, axis_name)
        ok = jnp.isfinite(value) & _all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
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


def fit(guide, rng_key, *args, num_steps=5000, batch_size=256, loss=None, optimizer=None,
        learning_rate=2e-3, num_simulations=None, validation_size=1024, progress_bar=True,
        num_chunks=100, **kwargs) -> FitResult:
    """Train an amortized guide on simulations from its model.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param rng_key: a PRNG key.
    :param args: the model's arguments for one dataset (observed sites with values, of the
        largest size); ``kwargs`` likewise.
    :param num_steps: optimizer steps.
    :param batch_size: simulations per step.
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any optax transformation (default: Adam with cosine decay from
        ``learning_rate`` and gradient clipping).
    :param num_simulations: ``None`` (default) simulates fresh data every step, inside the jitted
        step (online); an integer fixes a simulation budget: that many simulations are drawn once
        and minibatches are sampled from them (offline), 10% held out for validation.
    :param validation_size: held-out simulations for the validation loss (online mode).
    :param progress_bar: show a tqdm bar with the loss.
    :param num_chunks: how often (over the run) to report progress and validation.
    :return: a :class:`FitResult`.

    **Example**::

        result = fit(guide, jax.random.PRNGKey(0), x=x, y=y, num_steps=3000)
        result.params, result.losses[-1]
    """
    optimizer = default_optimizer(num_steps, learning_rate) if optimizer is None else optimizer
    loss = NPE() if loss is None else loss
    tr = trainer(guide, loss=loss, optimizer=optimizer, batch_size=batch_size)
    k_init, k_data, k_val = jax.random.split(rng_key, 3)
    state = tr.init(k_init, *args, **kwargs)

    bank = None
    if num_simulations is not None:
        num_simulations = int(num_simulations)
        n_val = max(1, min(validation_size, num_simulations // 10))
        sims = jax.jit(lambda k: guide.simulate(k, num_simulations, *args, **kwargs))(k_data)
        val = jax.tree.map(lambda x: x[:n_val], sims)
        bank = jax.tree.map(lambda x: x[n_val:], sims)
    else:
        val = jax.jit(lambda k: guide.simulate(k, validation_size, *args, **kwargs))(k_val)

    def val_loss(params, val):
        losses = loss.simulation_losses(guide, params, jax.random.PRNGKey(0), val, *args, **kwargs)
        return masked_mean(losses, val.valid)

    chunk = max(1, math.ceil(num_steps / max(1, num_chunks)))

    # the simulation bank and the validation set are arguments, not closed-over constants, so
    # a large budget is not baked into the compiled program
    @jax.jit
    def run_chunk(state, bank, val):
        def step(state, _):
            sims = None
            if bank is not None:
                idx = jax.random.randint(jax.random.fold_in(state.rng_key, 1), (batch_size,), 0,
                                         bank.u.shape[0])
                sims = jax.tree.map(lambda x: x[idx], bank)
            active = state.step < num_steps
            new_state, info = tr.update(state, *args, simulations=sims, **kwargs)
            new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
            return new_state, (info.loss, info.num_dropped)

        state, (losses, dropped) = jax.lax.scan(step, state, length=chunk)
        return state, losses, dropped, val_loss(state.params, val)

    t0 = time.perf_counter()
    compiled = run_chunk.lower(state, bank, val).compile()
    compile_time = time.perf_counter() - t0

    losses, val_steps, val_losses = [], [], []
    bar = tqdm(total=num_steps, disable=not progress_bar, desc="training", unit="step",
               mininterval=0.5)
    t0 = time.perf_counter()
    done = 0
    try:
        while done < num_steps:
            state, chunk_losses, dropped, v = compiled(state, bank, val)
            n = min(chunk, num_steps - done)
            chunk_losses, dropped, v = jax.device_get((chunk_losses, dropped, v))
            losses.append(chunk_losses[:n])
            done += n
            val_steps.append(done)
            val_losses.append(float(v))
            if dropped[:n].sum() > 0.5 * n * batch_size:
                raise RuntimeError(
                    f"Most simulations in the last {n} steps were non-finite "
                    f"({int(dropped[:n].sum())} of {n * batch_size}). Check the model for "
                    "values outside a distribution's domain."
                )
            bar.set_postfix(loss=f"{float(np.mean(chunk_losses[:n])):.4g}", val=f"{float(v):.4g}",
                            skipped=int(state.num_skipped), dropped=int(state.num_dropped))
            bar.update(n)
    finally:
        bar.close()
    jax.block_until_ready(state.params)
    train_time = time.perf_counter() - t0
    return FitResult(
        params={guide.param_name: state.params},
        losses=np.concatenate(losses) if losses else np.zeros(0),
        validation_losses=(np.asarray(val_steps), np.asarray(val_losses)),
        state=state,
        num_skipped=int(state.num_skipped),
        num_dropped=int(state.num_dropped),
        num_simulations=num_steps * batch_size if bank is None else num_simulations,
        compile_time=compile_time,
        train_time=train_time,
    )
