"""Summary networks: shapes, permutation invariance, and that padding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpyro_amortized.data import DataBatch, DataSpec
from numpyro_amortized.networks import (
    DeepSet,
    Identity,
    LinearSummary,
    MLPSummary,
    default_summary_net,
)


def batch(n_set=6, features=2, flat=3, seed=0, sizes=(6, 4)):
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key1, (len(sizes), n_set, features))
    mask = jnp.arange(n_set)[None] < jnp.asarray(sizes)[:, None]
    x = jnp.where(mask[..., None], x, 0.0)
    f = jax.random.normal(key2, (len(sizes), flat)) if flat else None
    return DataBatch(x, mask, f)


@pytest.mark.parametrize("moments", [True, False])
def test_deepset_is_permutation_invariant_and_ignores_padding(moments):
    data = batch()
    net = DeepSet(DataSpec(2, 6, 3), summary_dim=5, hidden=8, moments=moments, rngs=nnx.Rngs(0))
    out = net(data)
    assert out.shape == (2, 5)
    perm = jnp.array([3, 0, 1, 2, 5, 4])  # dataset 1 has 4 real rows: keep padding at the end
    perm1 = jnp.array([2, 0, 3, 1, 4, 5])
    permuted = DataBatch(
        jnp.stack([data.set[0, perm], data.set[1, perm1]]),
        jnp.stack([data.mask[0, perm], data.mask[1, perm1]]),
        data.flat,
    )
    np.testing.assert_allclose(net(permuted), out, atol=1e-5)
    # garbage in padded rows changes nothing
    garbage = DataBatch(data.set.at[1, 4:].set(100.0), data.mask, data.flat)
    np.testing.assert_allclose(net(garbage), out, atol=1e-5)
    # and a shorter padded dataset equals the same dataset unpadded
    short = DataBatch(data.set[1:, :4], data.mask[1:, :4], data.flat[1:])
    np.testing.assert_allclose(net(short), out[1:], atol=1e-5)
    # while real rows do matter
    changed = DataBatch(data.set.at[1, 0].set(3.0), data.mask, data.flat)
    assert float(jnp.abs(net(changed)[1] - out[1]).max()) > 1e-4


def test_fixed_size_networks():
    data = batch(flat=3)
    spec = DataSpec(2, 6, 3)
    assert Identity(spec)(data).shape == (2, 15)
    assert MLPSummary(spec, summary_dim=4, hidden=(8,), rngs=nnx.Rngs(0))(data).shape == (2, 4)
    linear = LinearSummary(spec, summary_dim=4, rngs=nnx.Rngs(0))
    other = batch(flat=3, seed=1)
    both = DataBatch(data.set + 2 * other.set, data.mask, data.flat + 2 * other.flat)
    zero = DataBatch(0 * data.set, data.mask, 0 * data.flat)
    # affine: f(a + 2b) - f(0) = (f(a) - f(0)) + 2 (f(b) - f(0))
    np.testing.assert_allclose(linear(both) - linear(zero),
                               linear(data) + 2 * linear(other) - 3 * linear(zero), atol=1e-5)
    assert linear(data).shape == (2, 4)


def test_default_summary_net_follows_the_data():
    assert default_summary_net(DataSpec(2, 10, 0)) is DeepSet
    assert default_summary_net(DataSpec(0, 0, 10)) is Identity
    assert default_summary_net(DataSpec(0, 0, 200)) is MLPSummary
