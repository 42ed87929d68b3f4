"""Waiting for a compiled chunk of steps, with a time limit.

A chunk that never finishes (a sampler's loop that does not terminate for some simulated
parameters, say) would otherwise block the host forever without a word. The loop waits for
each chunk by polling, so it can give up after a limit, say why, and keep what was done.
"""

from __future__ import annotations

import os
import time

__all__ = ["StallWatch", "TrainingStalled", "stall_message"]


class TrainingStalled(RuntimeError):
    """A chunk of training steps did not finish within the time limit.

    ``state`` is the :class:`~numpyro_amortized.train.TrainState` of the last completed chunk,
    on the host (``state.params`` are parameters for the guide). Nothing more is computed or
    saved after a stall: any device work would wait behind the stalled computation.
    """

    state = None


class StallWatch:
    """The time limit of a chunk: ``timeout`` seconds if given; otherwise ten minutes for the
    first chunk and then 50 times the slowest chunk so far, at least a minute."""

    def __init__(self, timeout=None):
        if timeout is not None and not float(timeout) > 0:
            raise ValueError(f"stall_timeout={timeout!r}: need a number of seconds > 0, or None.")
        self.timeout = None if timeout is None else float(timeout)
        self.slowest = None

    @property
    def limit(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return 600.0 if self.slowest is None else max(60.0, 50.0 * self.slowest)

    def wait(self, x, started) -> bool:
        """Wait until array ``x`` (dispatched at ``started``) is ready: ``True`` when it is,
        ``False`` when the limit passed first. Polls often enough that waiting adds at most
        about 2% to a chunk's time."""
        limit = self.limit
        while not x.is_ready():
            elapsed = time.perf_counter() - started
            if elapsed > limit:
                return False
            time.sleep(min(0.05, max(1e-4, 0.02 * elapsed)))
        took = time.perf_counter() - started
        self.slowest = took if self.slowest is None else max(self.slowest, took)
        return True


def stall_message(sites, step, n, limit, checkpoint, saved_step):
    """What a stalled run says: which steps, the model's looping ``sites`` (name, description)
    that may not end, and how to continue from ``checkpoint`` (saved at ``saved_step``)."""
    return (
        f"Training stalled: steps {step + 1}-{step + n} have not finished after "
        f"{limit:.0f} s. "
        + (f"The model's simulations sample with data-dependent loops at "
           f"{', '.join(f'{name!r} ({d})' for name, d in sites)}; one of them may not end "
           "for some simulated parameters (check those sites' parameters over the prior). "
           if sites else "")
        + "The stalled computation cannot be stopped from Python and keeps a CPU busy: "
        "restart the process. "
        + (f"The checkpoint {os.fspath(checkpoint)} holds the run as last saved"
           + (f" (step {saved_step})" if saved_step is not None else "")
           + f": continue with fit(..., resume={os.fspath(checkpoint)!r}) in a new process. "
           if checkpoint is not None and os.path.exists(os.fspath(checkpoint)) else "")
        + f"The error's .state holds the training state of step {step}. "
        + "Use fit(..., stall_timeout=seconds) if a chunk can legitimately take longer.")
