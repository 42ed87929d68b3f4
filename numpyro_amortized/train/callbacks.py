"""What :func:`~numpyro_amortized.fit` does between compiled chunks, as callbacks.

After every chunk of steps the loop records the training losses and the validation loss in a
:class:`Run`, tracks the best validation loss, then calls each callback's ``on_chunk(run,
chunk)`` in order. A callback may change ``run.state`` (e.g. go back to the best parameters),
``run.scale`` (the learning-rate factor, a traced input: no recompilation) or set
``run.stop`` to end training. Pass your own with ``fit(..., callbacks=[...])``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from numpyro_amortized.train.optim import with_params
from numpyro_amortized.train.sharding import host_value

__all__ = ["Callback", "Chunk", "Converge", "Plateau", "ProgressBar", "Run", "TimeBudget"]


class Chunk(NamedTuple):
    """What one compiled chunk did: ``losses`` and ``num_dropped`` per step (numpy), the
    validation loss after it, and the number of steps it counted (the last may be short)."""

    losses: np.ndarray
    num_dropped: np.ndarray
    validation_loss: float
    num_steps: int


@dataclass
class Run:
    """A running :func:`~numpyro_amortized.fit`, as callbacks see and change it.

    :param state: the :class:`~numpyro_amortized.train.TrainState` (on the devices).
    :param step: steps done; :param num_steps: steps planned.
    :param scale: the learning-rate factor of the next chunk.
    :param stop: set to a reason (a short string) to end training after this chunk.
    :param best_step: the step with the lowest validation loss, ``best_loss`` that loss and
        ``best_params`` its parameters.
    """

    state: Any
    step: int
    num_steps: int
    scale: float = 1.0
    stop: str | None = None
    losses: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    best_step: int = -1
    best_loss: float = math.inf
    best_params: Any = None
    plateau: dict = field(default_factory=lambda: {"stale": 0, "halvings": 0})
    train_time: float = 0.0  # seconds of training before this process (a resumed run)
    interrupted: bool = False


def _half_cosine(done):
    """The learning-rate factor at fraction ``done`` of a decay: 1 down to 1% along a half
    cosine (``done`` clipped to [0, 1])."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


class Callback:
    """Base class: override what you need. ``on_chunk`` runs after every chunk, ``on_end``
    once when training ends (also after an interruption), with ``run.interrupted`` set then."""

    def on_chunk(self, run: Run, chunk: Chunk) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass


class Plateau(Callback):
    """Reduce the learning rate on a validation plateau, from the best parameters.

    After ``patience`` validation checks without improvement, training goes back to the best
    parameters and the learning-rate factor is multiplied by ``factor``; after
    ``max_reductions`` reductions, the next plateau ends training. (``optax.contrib.
    reduce_on_plateau`` scales the rate the same way but cannot restore the best parameters,
    which is what keeps a run on a fixed bank from memorizing it.)
    """

    def __init__(self, patience=10, factor=0.5, max_reductions=4):
        if int(patience) < 1:
            raise ValueError(f"patience={patience}: need a positive number of validation checks.")
        self.patience, self.factor, self.max_reductions = int(patience), factor, max_reductions

    def on_chunk(self, run, chunk):
        p = run.plateau
        if run.best_step == run.step:
            p["stale"] = 0
            return
        p["stale"] += 1
        if p["stale"] < self.patience:
            return
        p["stale"] = 0
        if p["halvings"] == self.max_reductions:
            run.stop = "validation plateau"
        else:
            p["halvings"] += 1
            run.scale *= self.factor
            run.state = with_params(run.state, run.best_params)


class Converge(Callback):
    """Train as long as the validation loss improves, then cool down and stop.

    A constant learning rate while the validation loss falls; once the median validation loss
    of the last ``window`` checks is less than ``tol`` nats below that of the ``window`` checks
    before, and was so one window earlier as well (or the run reaches 80% of
    ``run.num_steps``), the rate decays to 1% along a half cosine over ``cooldown`` of the steps
    so far (at least ``min_cooldown`` steps, within ``run.num_steps``), and training stops at
    its end: a warmup-stable-decay schedule whose stable phase lasts as long as it pays.

    Two successive comparisons of disjoint windows, each of medians, keep the validation loss's
    noise (large where the loss sums many latents, as a hierarchical model's does) from
    starting the decay while the loss still falls: one outlying window makes one comparison
    look flat and the next one steep. Where that noise is large, the loss at a constant rate
    stops falling early and the decay does the rest, so it lasts half the stable phase.
    ``run.plateau`` holds its state, so a resumed run continues it.
    """

    def __init__(self, window=10, tol=0.01, cooldown=0.5, min_cooldown=1000):
        self.window, self.tol = int(window), float(tol)
        self.cooldown, self.min_cooldown = float(cooldown), int(min_cooldown)

    def on_chunk(self, run, chunk):
        p, w = run.plateau, self.window
        if "decay_start" not in p:
            v, n = run.val_losses, len(run.val_losses)
            gain = lambda end: np.median(v[end - 2 * w:end - w]) - np.median(v[end - w:end])
            flat = n >= 3 * w and gain(n - w) < self.tol and gain(n) < self.tol
            if not (flat or run.step >= 0.8 * run.num_steps):
                return
            p["decay_start"] = run.step
            p["decay_steps"] = min(run.num_steps - run.step,
                                   max(self.min_cooldown, int(self.cooldown * run.step)))
        done = (run.step - p["decay_start"]) / max(p["decay_steps"], 1)
        if done >= 1:
            run.stop = "converged"
        run.scale = _half_cosine(done)


class TimeBudget(Callback):
    """Train for a length of time: ``seconds`` of the :func:`~numpyro_amortized.fit` call
    (``started``, a ``time.perf_counter()`` reading, is when it began, so set-up and
    compilation count against them) until training ends.

    Built when training starts, it decays the learning rate to 1% along a half cosine over the
    time left for training (a cosine schedule in time rather than steps) and stops training
    when the next chunk, as long as the last one, would end past the budget. Seconds used by
    earlier processes of a resumed run are kept in ``run.plateau["time_used"]``.
    """

    def __init__(self, seconds, started):
        self.now = time.perf_counter
        self.seconds, self.started = float(seconds), started
        self.train_start = self.last = self.now()
        self.used_before = None

    def on_chunk(self, run, chunk):
        now, p = self.now(), run.plateau
        if self.used_before is None:  # the first chunk of this process
            self.used_before = float(p.get("time_used", 0.0))
            p.setdefault("setup_time", self.train_start - self.started)
            if self.used_before + self.train_start - self.started >= self.seconds:
                warnings.warn(f"time_budget={self.seconds:g} s was used up before training "
                              f"started (set-up and compilation took "
                              f"{self.train_start - self.started:.1f} s): trained one chunk of "
                              f"{chunk.num_steps} steps. Give a larger budget.", UserWarning,
                              stacklevel=2)
        used = p["time_used"] = self.used_before + now - self.started
        if used + (now - self.last) > self.seconds:
            run.stop = "time budget"
        self.last = now
        setup = p["setup_time"]
        done = (used - setup) / (self.seconds - setup) if self.seconds > setup else 1.0
        run.scale = _half_cosine(done)


class ProgressBar(Callback):
    """A tqdm bar with the training and validation loss (on process 0 only)."""

    def __init__(self, num_steps, initial=0, disable=False):
        self.bar = tqdm(total=num_steps, initial=initial, disable=disable, desc="training",
                        unit="step", mininterval=0.5)

    def on_chunk(self, run, chunk):
        n = chunk.num_steps
        self.bar.set_postfix(loss=f"{float(np.mean(chunk.losses[:n])):.4g}",
                             val=f"{chunk.validation_loss:.4g}",
                             skipped=int(host_value(run.state.num_skipped)),
                             dropped=int(host_value(run.state.num_dropped)))
        self.bar.update(n)
        if run.stop:  # the bar ends where training did
            self.bar.total = run.step
            self.bar.set_description(f"training (stopped: {run.stop})")
            self.bar.refresh()

    def on_end(self, run):
        self.bar.close()
