"""The settings of one :func:`~numpyro_amortized.fit` run: defaults resolved, values checked.

Every value that would otherwise train on nonsense (NaN parameters after a NaN learning rate,
a run of zero steps, a batch larger than the bank) is refused here, before anything compiles,
with the argument named.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import numpy as np

from numpyro_amortized.checkpoint import CheckpointError
from numpyro_amortized.train.sharding import key_data

__all__ = ["MAX_STEPS", "Settings", "num_held_out", "resolve_settings"]

MAX_STEPS = 20_000  # the longest default run, online or on a fixed budget
CONVERGE_CHUNK = 100  # steps between validation checks when the length follows the loss
TIME_BUDGET_CHUNK = 50  # ... and when it follows a time budget (a finer stop)


class Settings(NamedTuple):
    rng_key: jax.Array
    num_steps: int
    batch_size: int
    learning_rate: float
    num_simulations: int | None
    num_train: int | None
    num_held_out: int
    validation_size: int
    num_chunks: int
    chunk: int
    keep_best: bool
    patience: int
    checkpoint_every: int
    record: dict  # what a resumed run must agree on
    converge: bool = False  # online, num_steps not given: train until converged, up to num_steps
    time_budget: float | None = None  # online: seconds of fit until training ends


def num_held_out(num_simulations, validation_size):
    """Simulations of a fixed budget held out for validation: 10%, at most validation_size."""
    return max(1, min(int(validation_size), int(num_simulations) // 10))


def _integer(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}={value!r}: need an integer >= {low}.")
    return int(value)


def resolve_settings(rng_key, *, num_steps, batch_size, learning_rate, num_simulations,
                     validation_size, num_chunks, keep_best, patience, checkpoint,
                     checkpoint_every, resume, time_budget=None) -> Settings:
    batch_size = _integer("batch_size", batch_size)
    validation_size = _integer("validation_size", validation_size)
    lr = float(learning_rate) if np.ndim(learning_rate) == 0 else math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate={learning_rate!r}: need a finite number > 0.")
    num_train = held_out = None
    if num_simulations is not None:
        num_simulations = _integer("num_simulations", num_simulations, low=2)
        held_out = num_held_out(num_simulations, validation_size)
        num_train = num_simulations - held_out
        if batch_size > num_train:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {num_train} training simulations "
                f"of num_simulations={num_simulations} ({held_out} held out): use a smaller "
                "batch or a larger budget.")
    if time_budget is not None:
        budget = float(time_budget) if np.ndim(time_budget) == 0 else math.nan
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"time_budget={time_budget!r}: need a number of seconds > 0.")
        if num_simulations is not None:
            raise ValueError("time_budget trains online (fresh simulations every step) for a "
                             "length of time; with num_simulations, the budget is the bank: "
                             "give one of the two.")
        time_budget = budget
        if num_steps is None:
            num_steps = 10**8  # the time decides
    converge = num_steps is None and num_train is None
    if num_steps is None:
        num_steps = MAX_STEPS
        if num_train is not None:
            num_steps = min(MAX_STEPS, max(5000, math.ceil(30 * num_train / batch_size)))
    num_steps = _integer("num_steps", num_steps)
    if num_chunks is None:
        num_chunks = (num_steps // CONVERGE_CHUNK if converge
                      else -(-num_steps // TIME_BUDGET_CHUNK) if time_budget
                      else min(100, max(1, num_steps // 10)))
    num_chunks = _integer("num_chunks", num_chunks)
    chunk = max(1, math.ceil(num_steps / num_chunks))
    keep_best = num_simulations is not None if keep_best is None else bool(keep_best)
    if patience is None:
        patience = 10 if num_simulations is not None else 0
    patience = _integer("patience", patience, low=0)
    if patience and not keep_best:
        raise ValueError("patience needs keep_best=True: on a plateau, training goes back to "
                         "the best parameters.")
    if checkpoint_every is not None:
        checkpoint_every = _integer("checkpoint_every", checkpoint_every)
    every = checkpoint_every or (20 * chunk if time_budget else max(chunk, num_steps // 10))
    every = max(chunk, math.ceil(every / chunk) * chunk)
    if resume is not None and checkpoint is None and not os.path.exists(os.fspath(resume)):
        raise CheckpointError(f"{resume}: no such checkpoint to resume from.")
    rng_key = key_data(rng_key)
    if rng_key.shape != (2,) or rng_key.dtype != np.uint32:
        raise ValueError(f"rng_key: need a PRNG key (jax.random.PRNGKey(seed) or "
                         f"jax.random.key(seed)); got shape {rng_key.shape}, {rng_key.dtype}.")
    record = {"num_steps": num_steps, "batch_size": batch_size,
              "num_simulations": -1 if num_simulations is None else num_simulations,
              "validation_size": validation_size, "num_chunks": num_chunks,
              "rng_key": np.asarray(rng_key).astype(np.uint32).tolist(),
              "keep_best": keep_best, "patience": patience, "converge": converge}
    if time_budget is not None:  # a resumed run must have the same budget
        record["time_budget"] = time_budget
    return Settings(rng_key, num_steps, batch_size, lr, num_simulations, num_train, held_out,
                    validation_size, num_chunks, chunk, keep_best, patience, every, record,
                    converge, time_budget)
