import os
import pathlib

# The suite's time is mostly XLA compilation, and many tests (and the example, notebook and script
# subprocesses, which inherit the variable) compile the same programs: share them through JAX's
# persistent compilation cache. It starts empty on a fresh clone, so CI compiles everything once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))

import jax
import numpy as np
import pytest
from flax import nnx

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


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
