import os
import pathlib

# The suite's time is mostly XLA compilation, and many tests (and the example, notebook and script
# subprocesses, which inherit the variable) compile the same programs: share them through JAX's
# persistent compilation cache. It starts empty on a fresh clone, so CI compiles everything once.
# (JAX's default keeps programs that took over 1 s to compile. Keeping all of them, set-up's many
# small ones too, saved 5 s per subprocess, but the 4-device test then deadlocked in an
# all-reduce of a program loaded from the cache.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))

# XLA's CPU compiler, told to use its older fusion emitters and LLVM's -O1 instead of -O2,
# compiles a training chunk 30-45% faster (two_moons 4.3 -> 2.3 s, the quickstart's regression
# 6.6 -> 4.0 s) for the same step time on small models; what it gives up is run time on large
# workloads (a DeepSet over 1,000 rows 20% slower, a flow's sampling 2x slower), which the tests
# have little of. The flags are tried in a subprocess first: an XLA without them aborts on start.
from numpyro_amortized.compile_options import ONCE_OPTIONS  # imports jax, starts no backend

_FAST_COMPILE = " ".join(f"--{k}={str(v).lower()}" for k, v in ONCE_OPTIONS.items())
if "NUMPYRO_AMORTIZED_TEST_XLA_FLAGS" not in os.environ:  # once per run; workers inherit it
    import subprocess
    import sys

    _flags = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
    _probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                            env={**os.environ, "XLA_FLAGS": _flags, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, check=False)
    os.environ["NUMPYRO_AMORTIZED_TEST_XLA_FLAGS"] = _flags if _probe.returncode == 0 else ""
if os.environ["NUMPYRO_AMORTIZED_TEST_XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = os.environ["NUMPYRO_AMORTIZED_TEST_XLA_FLAGS"]

# pytest-xdist runs one worker per core. Left alone, each worker's BLAS (numpy's, under
# scikit-learn's C2ST classifier) starts a thread per core as well, and those threads spin while
# they wait: on 2 cores, a C2ST-heavy test took 132 s next to a training test, 45 s with one BLAS
# thread per worker. Subprocesses (examples, notebooks, scripts) inherit the variables.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))
    from threadpoolctl import threadpool_limits

    threadpool_limits(_THREADS)  # also if numpy's BLAS was loaded before this file

import functools

import jax
import numpy as np
import pytest
from flax import nnx

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def small_networks():
    """``AutoAmortizedFlow`` options for tests of models with a plate of observations whose
    subject is not the default architecture (the standardization of heavy tails, covariates):
    a two-layer spline flow and a DeepSet of width 32. On a plate of rows the DeepSet's inner
    network runs on every row and dominates a training step's cost (1,500 steps on 50 rows
    trained in 36 s with the defaults, in 12 s with a DeepSet of width 32 and summary length
    16 and a two-layer flow)."""
    from numpyro_amortized.networks import DeepSet, spline_flow

    return {"flow": functools.partial(spline_flow, num_layers=2, hidden=(32, 32)),
            "summary_net": functools.partial(DeepSet, hidden=32)}


def jit_call(module, method="__call__"):
    """``module.method(*args)`` compiled as one program per input shape. Called eagerly, a
    network compiles each operation on its own: a set transformer's first call took 35 s eagerly
    and 6 s jitted (2 busy cores, empty compilation cache)."""
    call = nnx.jit(lambda m, *args: getattr(m, method)(*args))
    return lambda *args: call(module, *args)


@jax.jit
def _add_noise(tree, noise):
    leaves, treedef = jax.tree.flatten(tree)
    ends = np.cumsum([0] + [x.size for x in leaves])
    return jax.tree.unflatten(treedef, [x + noise[a:b].reshape(x.shape).astype(x.dtype)
                                        for x, a, b in zip(leaves, ends[:-1], ends[1:])])


def jitter(tree, scale=0.1, seed=0):
    """Every array of ``tree`` (a guide's parameters) moved by N(0, scale^2) noise. The noise
    is numpy's, added in one program: JAX's sampler compiles once per array shape (27 shapes:
    7.7 s), and drawn inside one program its compilation took longer still."""
    size = sum(np.size(x) for x in jax.tree.leaves(tree))
    return _add_noise(tree, scale * np.random.default_rng(seed).normal(size=size))


def perturb(module, scale=0.1, seed=0):
    """The module with every trainable parameter moved by N(0, scale^2) noise (not identity)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
