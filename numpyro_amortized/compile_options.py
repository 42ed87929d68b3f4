"""Compiler options for programs that run once or a few times.

On CPU most of the time a user waits for before training starts is XLA compiling programs that
then run once: the simulation of the pilot and of the validation set, the held-out check, the
range of the training summaries. XLA's CPU compiler builds such programs 30-45% faster with its
older fusion emitters and LLVM's ``-O1`` (instead of ``-O2``), for code that runs as fast on
small arrays and up to twice as slow on large ones (a flow's sampling of 1,000 draws): a good
trade for a program that runs once, not for a training step or a sampler called in a loop.
:func:`jit_once` is :func:`jax.jit` with those options on CPU, and plain :func:`jax.jit`
elsewhere or with an XLA that does not know them.
"""

from __future__ import annotations

import jax

__all__ = ["ONCE_OPTIONS", "jit_once", "once_options"]

ONCE_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
_ACCEPTED: dict = {}  # backend -> whether its XLA accepts ONCE_OPTIONS (a flag, not a program)


def _accepted(backend) -> bool:
    if backend not in _ACCEPTED:
        try:  # an XLA that does not know an option refuses to compile
            jax.jit(lambda x: x + 1, compiler_options=ONCE_OPTIONS).lower(1.0).compile()
            _ACCEPTED[backend] = True
        except Exception:  # noqa: BLE001 - any refusal means: compile as usual
            _ACCEPTED[backend] = False
    return _ACCEPTED[backend]


def once_options() -> dict | None:
    """:data:`ONCE_OPTIONS` when the default backend is the CPU and its XLA accepts them,
    else ``None`` (:func:`jax.jit`'s default)."""
    backend = jax.default_backend()
    return ONCE_OPTIONS if backend == "cpu" and _accepted(backend) else None


def jit_once(fun, **jit_kwargs):
    """:func:`jax.jit` of ``fun`` for a program that runs once or a few times: compiled with
    :func:`once_options` (faster to compile on CPU).

    **Example**::

        sims = jit_once(lambda k: guide.simulate(k, 1024, *args))(key)
    """
    return jax.jit(fun, compiler_options=once_options(), **jit_kwargs)
