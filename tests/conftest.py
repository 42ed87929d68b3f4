import jax
import numpy as np
import pytest
from flax import nnx


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
