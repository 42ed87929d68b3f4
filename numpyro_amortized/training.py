"""Training: a pure ``init``/``update`` core and a ``fit`` loop with progress and validation.

``trainer(guide, ...)`` returns ``Trainer(init, update)``: ``init(rng_key, *args) -> TrainState``
and ``update(state, *args, simulations=None) -> (TrainState, StepInfo)`` are pure and jittable
(``update`` also runs under ``jax.pmap`` with ``axis_name``). :func:`fit` runs them in chunks of
``lax.scan`` inside ``jax.jit`` (one compilation, no host round trip per step).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from numpyro_amortized.checkpoint import (
    CheckpointError,
    checkpoint_body,
    flatten_tree,
    guide_config,
    read_file,
    restore_guide,
    unflatten_tree,
    write_file,
)
from numpyro_amortized.losses import NPE, masked_mean
from numpyro_amortized.networks.flows import ensemble_flow, mixture_log_weights
from numpyro_amortized.networks.flows.ensemble import DEFAULT_WEIGHT_DECAY

__all__ = [
    "FitResult", "StepInfo", "TrainState", "Trainer", "data_mesh", "default_optimizer", "fit",
    "fixed_budget_flow", "trainer",
]


_MIN_LOG_WEIGHT = -30.0  # a flow-ensemble member's weight never goes to exactly zero


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
    :param best_step: the step with the lowest validation loss (``params`` are that step's
        with ``keep_best``, the last step's otherwise).
    :param best_validation_loss: its validation loss.
    :param interrupted: training was stopped early (``KeyboardInterrupt``).
    :param stopped_early: the validation loss stopped improving after the last learning-rate
        reduction (``patience`` in :func:`fit`), so training ended before ``num_steps``.
    :param plateau: the learning-rate factor and plateau counters at the end (to resume).
    :param config: the run's settings (checked when a checkpoint of it is resumed).
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
    best_step: int = -1
    best_validation_loss: float = float("inf")
    interrupted: bool = False
    config: dict | None = None
    stopped_early: bool = False
    plateau: dict | None = None


def default_optimizer(num_steps, learning_rate=2e-3, weight_decay=None):
    """Adam with a cosine-decayed learning rate and gradient clipping at global norm 1.

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
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1), alpha=0.01)
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


def _all_finite(tree):
    """Whether every value in ``tree`` is finite: one reduction over the raveled leaves."""
    return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def _axis_size(axis_name):
    return jax.lax.psum(1, axis_name)


def trainer(guide, *, loss=None, optimizer=None, batch_size=256, axis_name=None,
            data_sharding=None) -> Trainer:
    """The pure training core for ``guide``.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any ``optax.GradientTransformation`` (default :func:`default_optimizer`
        for 10,000 steps).
    :param batch_size: simulations per update, over all devices (the global batch).
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
    loss = NPE() if loss is None else loss
    if optimizer is None:
        optimizer = default_optimizer(10_000, weight_decay=guide.weight_decay)

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


def data_mesh(devices=None):
    """A one-axis mesh (``"data"``) over ``devices``: ``None`` for all devices (of all
    processes, under ``jax.distributed``), an int for the first ``n``, or a list of devices."""
    all_devices = jax.devices()
    if devices is None:
        devs = all_devices
    elif isinstance(devices, int):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices={devices}, but JAX sees {len(all_devices)} devices.")
        devs = all_devices[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), ("data",))


def _host_value(x):
    """A replicated array as numpy, also when its devices span several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


def _host_tree(tree):
    return jax.tree.map(_host_value, tree)


def _key_data(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _num_held_out(num_simulations, validation_size):
    """Simulations of a fixed budget held out for validation: 10%, at most validation_size."""
    return max(1, min(int(validation_size), int(num_simulations) // 10))


def fixed_budget_flow(num_train):
    """The flow :func:`fit` gives a guide built without one, for a fixed budget of ``num_train``
    training simulations: :func:`~numpyro_amortized.networks.ensemble_flow`, a spline and an
    affine flow, each plain and weight-decayed. The decay is 2 up to 10,000 training
    simulations and falls as ``1 / num_train`` beyond (0.202 for a bank of 10^5): a larger bank
    is memorized less, and the decay that suits 10^4 over-regularizes it.

    **Example**::

        guide = AutoAmortizedFlow(model, flow=fixed_budget_flow(50_000))
    """
    factor = min(1.0, 10_000 / max(int(num_train), 1))
    decays = tuple(round(w * factor, 3) for w in DEFAULT_WEIGHT_DECAY)
    return functools.partial(ensemble_flow, weight_decay=decays)


def _run_config(num_steps, batch_size, num_simulations, validation_size, num_chunks, rng_key,
                keep_best, patience):
    return {"num_steps": int(num_steps), "batch_size": int(batch_size),
            "num_simulations": -1 if num_simulations is None else int(num_simulations),
            "validation_size": int(validation_size), "num_chunks": int(num_chunks),
            "rng_key": np.asarray(rng_key).astype(np.uint32).tolist(),
            "keep_best": bool(keep_best), "patience": int(patience)}


def train_record(result: FitResult) -> dict:
    """What a checkpoint keeps of a training run, to resume it (see :func:`fit`)."""
    state = _host_tree(result.state)
    record = {
        "opt_state": flatten_tree(state.opt_state),
        "final_params": flatten_tree(state.params),
        "rng_key": np.asarray(state.rng_key),
        "step": int(state.step), "num_skipped": int(state.num_skipped),
        "num_dropped": int(state.num_dropped),
        "losses": np.asarray(result.losses, np.float32),
        "val_steps": np.asarray(result.validation_losses[0], np.int64),
        "val_losses": np.asarray(result.validation_losses[1], np.float32),
        "best_step": int(result.best_step), "best_validation_loss": float(result.best_validation_loss),
        "train_time": float(result.train_time),
        "run": json.dumps(result.config or {}),
        "plateau": json.dumps(result.plateau or {}),
    }
    return record


def _resume(path, guide, optimizer, args, kwargs, run_config):
    """The training state and history stored in checkpoint ``path``, for this run."""
    body = read_file(path)
    train = body.get("train")
    if not train:
        raise CheckpointError(f"{path}: this checkpoint holds a trained guide but no training "
                              "state (it was written by save(path, guide, params)); it cannot be "
                              "resumed. Save the FitResult, or use fit(..., checkpoint=path).")
    saved = json.loads(train["run"])
    # settings a checkpoint does not record (written before they were) are not compared
    diff = {k: (saved[k], v) for k, v in run_config.items() if k in saved and saved[k] != v}
    if diff:
        raise CheckpointError(
            f"{path}: the checkpoint is of a run with other settings {diff} (saved, now); resume "
            "with the same rng_key, num_steps, batch_size, num_simulations, validation_size, "
            "num_chunks, keep_best and patience to continue that run."
        )
    # the networks' options (a weight decay, say) change training without changing any shape:
    # compare them where both guides describe them (a lambda is not described)
    saved_guide, here = json.loads(body["guide"]), json.loads(json.dumps(guide_config(guide)))
    diff = {k: (saved_guide[k], v) for k, v in here.items()
            if k != "num_pilot_simulations"  # the standardization is restored, not re-estimated
            and saved_guide.get(k) is not None and v is not None and saved_guide[k] != v}
    if diff:
        raise CheckpointError(
            f"{path}: the checkpoint is of a run with another guide {diff} (saved, now); resume "
            "with a guide built as for that run, or with the guide object that ran it."
        )
    if guide.structure is None:
        best = restore_guide(guide, body, path, args, kwargs)
    else:  # a guide already set up (e.g. the one of the interrupted run): it must be the same
        same = (body["fingerprint"] == guide.structure.fingerprint()
                and np.array_equal(np.asarray(body["setup_key"]), guide._setup_key))
        if same:
            saved = unflatten_tree(nnx.to_pure_dict(guide._buffers), body["buffers"], "buffers",
                                   path)
            here = nnx.to_pure_dict(guide._buffers)
            same = all(np.array_equal(a, b) for a, b in
                       zip(jax.tree.leaves(saved), jax.tree.leaves(here), strict=True))
        if not same:
            raise CheckpointError(
                f"{path}: this guide was set up for another run (other model, key or "
                "standardization) than the checkpoint's. Resume with a new guide built as for "
                "that run, or with the guide object that ran it."
            )
        best = unflatten_tree(guide.init_params, body["params"], "parameters", path)
    params = unflatten_tree(guide.init_params, train["final_params"], "parameters", path)
    opt_state = unflatten_tree(
        optimizer.init(params), train["opt_state"], "optimizer state", path,
        hint="Resume with the optimizer the run was trained with. A run saved before the "
             "default optimizer kept its state in one vector (numpyro_amortized of before "
             "2026-11-27) cannot be resumed; its parameters still load for sampling with "
             "numpyro_amortized.load.")
    as_i32 = lambda v: jnp.asarray(int(v), jnp.int32)
    state = TrainState(params, opt_state, jnp.asarray(train["rng_key"]), as_i32(train["step"]),
                       as_i32(train["num_skipped"]), as_i32(train["num_dropped"]))
    history = {
        "losses": list(np.asarray(train["losses"]).reshape(1, -1)),
        "val_steps": [int(v) for v in np.asarray(train["val_steps"]).reshape(-1)],
        "val_losses": [float(v) for v in np.asarray(train["val_losses"]).reshape(-1)],
        "best": (int(train["best_step"]), float(train["best_validation_loss"]), best),
        "train_time": float(train["train_time"]),
        "plateau": json.loads(str(train["plateau"])) if "plateau" in train else {},
    }
    return state, history


def fit(guide, rng_key, *args, num_steps=None, batch_size=256, loss=None, optimizer=None,
        learning_rate=2e-3, num_simulations=None, validation_size=1024, progress_bar=True,
        num_chunks=None, devices=None, keep_best=None, patience=None, checkpoint=None,
        checkpoint_every=None, resume=None, **kwargs) -> FitResult:
    """Train an amortized guide on simulations from its model.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param rng_key: a PRNG key.
    :param args: the model's arguments for one dataset (observed sites with values, of the
        largest size); ``kwargs`` likewise.
    :param num_steps: optimizer steps. Default: 5,000 online; with a fixed budget, 30 passes over
        the training simulations, at least 5,000 and at most 20,000 steps (a larger bank has
        more to learn from; the validation plateau ends a run that stops improving).
    :param batch_size: simulations per step (the global batch, over all devices).
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any optax transformation (default: Adam with cosine decay from
        ``learning_rate`` and gradient clipping).
    :param num_simulations: ``None`` (default) simulates fresh data every step, inside the jitted
        step (online); an integer fixes a simulation budget: that many simulations are drawn once
        and minibatches are sampled from them (offline), 10% held out for validation. A guide
        built without a ``flow`` and set up here then gets an
        :func:`~numpyro_amortized.networks.ensemble_flow` (a spline and an affine flow, each
        plain and weight-decayed, each trained on its own; the decay falls with the size of the
        bank beyond 10,000, see :func:`fixed_budget_flow`); the returned parameters carry the
        mixture weights that maximize the held-out likelihood.
    :param validation_size: held-out simulations for the validation loss (online mode).
    :param progress_bar: show a tqdm bar with the loss (on process 0 only).
    :param num_chunks: how often (over the run) to report progress and validation. Default:
        100 times, and at most every 10 steps (a validation pass costs about as much as a
        training step on ``validation_size / 3`` simulations: run after every step of a short
        run, it took longer than the training itself).
    :param devices: devices to train on, data parallel: ``None`` for all (all processes' under
        ``jax.distributed``), an int for the first ``n``, or a list. The batch is split over
        them; parameters are replicated; the result does not depend on their number.
    :param keep_best: return the parameters with the lowest validation loss (checked
        ``num_chunks`` times) instead of the last ones; ``result.state`` is always the last.
        Default: on with a fixed simulation budget (where training over-fits its bank), off
        for online training (fresh simulations every step cannot be over-fitted, and the
        minimum of a noisy validation curve is not better than the end of a decayed run).
    :param patience: validation checks without improvement after which training goes back to
        the best parameters and halves the learning rate; after the fourth halving, the next
        plateau ends training (``result.stopped_early``). This keeps a run on a fixed budget
        learning at a lower rate once it starts to memorize its bank, instead of only picking an
        early, under-trained step. Default: 10 with a fixed simulation budget, off (``0``) for
        online training.
    :param checkpoint: a file to save the run to (process 0 writes): every
        ``checkpoint_every`` steps (default: a tenth of the run), at the end, and when training
        is interrupted. Load it with :func:`~numpyro_amortized.load`.
    :param resume: a checkpoint written by ``fit(..., checkpoint=...)``: continue that run
        (same ``rng_key`` and settings) to the same result as an uninterrupted run.
    :return: a :class:`FitResult`.

    Non-finite simulations are dropped from their batch and counted (an error is raised when
    most of them are); Ctrl-C (``KeyboardInterrupt``) stops training and returns (and saves) the
    last completed chunk's result, with ``result.interrupted`` set.

    **Example**::

        result = fit(guide, jax.random.PRNGKey(0), x=x, y=y, num_steps=3000)
        result.params, result.losses[-1]
    """
    if num_simulations is not None:
        num_train = int(num_simulations) - _num_held_out(num_simulations, validation_size)
    if num_steps is None:
        num_steps = 5000
        if num_simulations is not None:
            num_steps = min(20_000, max(5000, math.ceil(30 * num_train / batch_size)))
    num_steps = int(num_steps)
    if num_chunks is None:
        num_chunks = min(100, max(1, num_steps // 10))
    if num_simulations is not None and guide.flow is None and guide.structure is None:
        guide.flow = fixed_budget_flow(num_train)  # the default on a fixed budget
    if optimizer is None:
        optimizer = default_optimizer(num_steps, learning_rate, weight_decay=guide.weight_decay)
    loss = NPE() if loss is None else loss
    rng_key = _key_data(rng_key)
    keep_best = num_simulations is not None if keep_best is None else bool(keep_best)
    if patience is None:
        patience = 10 if num_simulations is not None else 0
    patience = int(patience)
    if patience and not keep_best:
        raise ValueError("patience needs keep_best=True: on a plateau, training goes back to "
                         "the best parameters.")
    mesh = data_mesh(devices)
    n_devices = mesh.devices.size
    if batch_size % n_devices:
        raise ValueError(f"batch_size={batch_size} is not a multiple of the {n_devices} devices; "
                         "use a multiple, or fewer devices (devices=...).")
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P("data"))
    tr = trainer(guide, loss=loss, optimizer=optimizer, batch_size=batch_size,
                 data_sharding=batched if n_devices > 1 else None)
    k_init, k_data, k_val = jax.random.split(rng_key, 3)
    run_config = _run_config(num_steps, batch_size, num_simulations, validation_size, num_chunks,
                             rng_key, keep_best, patience)
    history = {"losses": [], "val_steps": [], "val_losses": [], "best": None, "train_time": 0.0,
               "plateau": {}}
    if resume is not None and os.path.exists(os.fspath(resume)):
        state, history = _resume(resume, guide, optimizer, args, kwargs, run_config)
    elif resume is not None and checkpoint is None:
        raise CheckpointError(f"{resume}: no such checkpoint to resume from.")
    else:  # resume=path of a run not yet started: start it (so one command runs or resumes)
        state = tr.init(k_init, *args, **kwargs)
    state = jax.device_put(_host_tree(state), replicated)
    is_writer = jax.process_index() == 0

    bank = None
    if num_simulations is not None:
        num_simulations = int(num_simulations)
        n_val = _num_held_out(num_simulations, validation_size)
        sims = jax.jit(lambda k: guide.simulate(k, num_simulations, *args, **kwargs),
                       out_shardings=replicated)(k_data)
        val = jax.tree.map(lambda x: x[:n_val], sims)
        bank = jax.tree.map(lambda x: x[n_val:], sims)
    else:
        n_val = validation_size
        val = jax.jit(lambda k: guide.simulate(k, validation_size, *args, **kwargs),
                      out_shardings=replicated)(k_val)
    if n_val % n_devices == 0:
        val = jax.device_put(val, batched)

    def val_loss(params, val):
        losses = loss.validation_losses(guide, params, jax.random.PRNGKey(0), val, *args, **kwargs)
        return masked_mean(losses, val.valid)

    chunk = max(1, math.ceil(num_steps / max(1, num_chunks)))

    # the simulation bank and the validation set are arguments, not closed-over constants, so
    # a large budget is not baked into the compiled program
    def run_chunk(state, bank, val, scale):
        def step(state, _):
            sims = None
            if bank is not None:
                idx = jax.random.randint(jax.random.fold_in(state.rng_key, 1), (batch_size,), 0,
                                         bank.u.shape[0])
                sims = jax.tree.map(lambda x: x[idx], bank)
            active = state.step < num_steps
            new_state, info = tr.update(state, *args, simulations=sims,
                                        update_scale=scale if patience else None, **kwargs)
            new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
            return new_state, (info.loss, info.num_dropped)

        state, (losses, dropped) = jax.lax.scan(step, state, length=chunk)
        return state, losses, dropped, val_loss(state.params, val)

    t0 = time.perf_counter()
    compiled = jax.jit(
        run_chunk, out_shardings=(replicated, replicated, replicated, replicated)
    ).lower(state, bank, val, jnp.float32(1.0)).compile()
    compile_time = time.perf_counter() - t0

    done = int(_host_value(state.step))
    if done % chunk and done < num_steps:
        raise CheckpointError(f"{resume}: the checkpoint stopped at step {done}, not at a "
                              f"multiple of this run's chunk ({chunk}).")
    every = checkpoint_every or max(chunk, num_steps // 10)
    every = max(chunk, math.ceil(every / chunk) * chunk)
    best_step, best_loss, best_params = history["best"] or (-1, math.inf, None)
    losses, val_steps, val_losses = history["losses"], history["val_steps"], history["val_losses"]
    previous_time = history["train_time"]
    interrupted = False
    plateau = {"scale": 1.0, "stale": 0, "halvings": 0, "stopped": False, **history["plateau"]}

    def held_out_member_log_probs(params, val):  # (K, n_val), NaN where invalid; or None
        lps = guide.member_log_prob_simulations(params, val)
        return None if lps is None else jnp.where(val.valid[None], lps, jnp.nan)

    # replicated output: under several processes every one fits the same weights from all of val
    member_log_probs = jax.jit(held_out_member_log_probs, out_shardings=replicated)

    def with_mixture_weights(params):
        """A flow ensemble's weights fitted to the held-out simulations (EM); other flows as
        they are."""
        lps = member_log_probs(params, val)
        if lps is None:
            return params
        lps = _host_value(lps)
        log_w = np.maximum(mixture_log_weights(lps), _MIN_LOG_WEIGHT).astype(np.float32)
        flow = dict(params["flow"], log_weights=jax.device_put(log_w, replicated))
        return {**params, "flow": flow}

    def result(train_time):
        final = state.params
        chosen = best_params if keep_best and best_params is not None else final
        return FitResult(
            params={guide.param_name: with_mixture_weights(chosen)},
            losses=np.concatenate(losses) if losses else np.zeros(0),
            validation_losses=(np.asarray(val_steps), np.asarray(val_losses)),
            state=state,
            num_skipped=int(_host_value(state.num_skipped)),
            num_dropped=int(_host_value(state.num_dropped)),
            num_simulations=num_steps * batch_size if bank is None else num_simulations,
            compile_time=compile_time,
            train_time=previous_time + train_time,
            best_step=best_step,
            best_validation_loss=best_loss,
            interrupted=interrupted,
            config=run_config,
            stopped_early=plateau["stopped"] and done < num_steps,
            plateau=dict(plateau),
        )

    def save_checkpoint(train_time):
        if checkpoint is None or not is_writer:
            return
        r = result(train_time)
        params = _host_tree(r.params[guide.param_name])
        write_file(checkpoint, checkpoint_body(guide, params, train=train_record(r)))

    bar = tqdm(total=num_steps, initial=done, disable=not progress_bar or not is_writer,
               desc="training", unit="step", mininterval=0.5)
    t0 = time.perf_counter()
    try:
        while done < num_steps and not plateau["stopped"]:
            new_state, chunk_losses, dropped, v = compiled(state, bank, val,
                                                           jnp.float32(plateau["scale"]))
            n = min(chunk, num_steps - done)
            chunk_losses, dropped, v = _host_tree((chunk_losses, dropped, v))
            if dropped[:n].sum() > 0.5 * n * batch_size:
                raise RuntimeError(
                    f"Most simulations in the last {n} steps were non-finite "
                    f"({int(dropped[:n].sum())} of {n * batch_size}). Check the model for "
                    "values outside a distribution's domain."
                )
            state = new_state
            losses.append(chunk_losses[:n])
            done += n
            val_steps.append(done)
            val_losses.append(float(v))
            if float(v) < best_loss:  # tracked always; chosen only with keep_best
                best_step, best_loss, best_params = done, float(v), state.params
                plateau["stale"] = 0
            elif patience:
                plateau["stale"] += 1
                if plateau["stale"] >= patience:  # back to the best, at half the rate
                    plateau["stale"] = 0
                    if plateau["halvings"] == 4:
                        plateau["stopped"] = True
                    else:
                        plateau["halvings"] += 1
                        plateau["scale"] /= 2
                        state = state._replace(params=best_params)
            if done % every == 0 or done == num_steps or plateau["stopped"]:
                save_checkpoint(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(np.mean(chunk_losses[:n])):.4g}", val=f"{float(v):.4g}",
                            skipped=int(_host_value(state.num_skipped)),
                            dropped=int(_host_value(state.num_dropped)))
            bar.update(n)
            if plateau["stopped"]:  # the bar ends where training did
                bar.total = done
                bar.set_description("training (stopped: validation plateau)")
                bar.refresh()
    except KeyboardInterrupt:
        interrupted = True
        save_checkpoint(time.perf_counter() - t0)
        warnings.warn(
            f"Training interrupted at step {done} of {num_steps}: returning the parameters of "
            "the last completed chunk"
            + (f" (saved to {checkpoint}; continue with fit(..., resume={checkpoint!r}))."
               if checkpoint is not None else "."),
            UserWarning, stacklevel=2,
        )
    finally:
        bar.close()
    jax.block_until_ready(state.params)
    return result(time.perf_counter() - t0)
