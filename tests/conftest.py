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

import collections
import functools
import json

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


# ------------------------------------------------------------------ the order of the tests
# pytest-xdist's worksteal gives each worker a contiguous share of the collected tests and
# lets an idle worker take the tail of another's queue. Collected in file order, one worker got
# the multilevel binomial (7 minutes) next to eight schools and the variable-size regression,
# and whichever long test started last set the tier's end. The tests whose seconds (on 2 cores)
# tests/durations.json records run first, longest first, each to the share with the fewest
# seconds so far; the rest follow in file order, filling the shares to xdist's sizes, so the
# idle worker takes short tests at the end. `--store-durations` rewrites the file from the run.
DURATIONS = pathlib.Path(__file__).resolve().parent / "durations.json"


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test's seconds (setup, call and teardown) to "
                          "tests/durations.json, which orders the longest tests first")


def worker_shares(items, seconds, workers):
    """``items`` reordered for ``workers`` contiguous shares: the timed ones longest first,
    each to the share with the fewest seconds so far; then the others in their order, each
    share filled to the size xdist gives it (``len(left) // workers_left``)."""
    timed = sorted((i for i in items if seconds.get(i.nodeid, 0) > 0),
                   key=lambda i: -seconds[i.nodeid])
    rest = [i for i in items if seconds.get(i.nodeid, 0) <= 0]
    shares, totals = [[] for _ in range(workers)], [0.0] * workers
    for item in timed:
        w = totals.index(min(totals))
        shares[w].append(item)
        totals[w] += seconds[item.nodeid]
    left = len(items)
    for w, share in enumerate(shares):
        need = max(left // (workers - w) - len(share), 0)
        share += rest[:need]
        del rest[:need]
        left -= len(share)
    shares[-1] += rest
    return [i for share in shares for i in share]


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    if DURATIONS.exists():
        seconds = json.loads(DURATIONS.read_text())
        items[:] = worker_shares(items, seconds, max(1, _WORKERS))


_SECONDS = collections.Counter()


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid] += report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("store_durations") and not hasattr(session.config, "workerinput"):
        stored = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        stored.update({k: round(v, 1) for k, v in _SECONDS.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(stored.items())), indent=0) + "\n")
