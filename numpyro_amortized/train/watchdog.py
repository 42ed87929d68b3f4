"""Waiting for a compiled chunk of steps, with a time limit.

A chunk that never finishes (a sampler's loop that does not terminate for some simulated
parameters, say) would otherwise block the host forever without a word. The loop waits for
each chunk by polling, so it can give up after a limit, say why, and keep what was done.
"""

from __future__ import annotations

import time

__all__ = ["StallWatch", "TrainingStalled"]


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
