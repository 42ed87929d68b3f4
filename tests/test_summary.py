"""Summary networks: shapes, permutation invariance, and that padding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_call
from flax import nnx

from numpyro_amortized.data import DataBatch, DataSpec
from numpyro_amortized.networks import (
    DeepSet,
    Identity,
    LinearSummary,
    MLPSummary,
    default_summary_net,
)
from numpyro_amortized.networks.layers import MLP, least_squares, map_sets


def batch(n_set=6, features=2, flat=3, seed=0, sizes=(6, 4)):
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(key1, (len(sizes), n_set, features))
    mask = jnp.arange(n_set)[None] < jnp.asarray(sizes)[:, None]
    x = jnp.where(mask[..., None], x, 0.0)
    f = jax.random.normal(key2, (len(sizes), flat)) if flat else None
    return DataBatch(x, mask, f)


@pytest.mark.parametrize("moments,covariates", [(True, 0), (False, 0), (True, 1)])
def test_deepset_is_permutation_invariant_and_ignores_padding(moments, covariates):
    data = batch()
    module = DeepSet(DataSpec(2, 6, 3, covariates), summary_dim=5, hidden=8, moments=moments,
                     rngs=nnx.Rngs(0))
    assert bool(module.responses) == bool(covariates)
    net = jit_call(module)
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


@pytest.mark.parametrize("num_sets,rows,chunks", [(12, 40, 6), (4, 400, 4), (97, 5, 0),
                                                  (3, 5, 0)])
def test_map_sets_in_chunks_equals_one_pass(num_sets, rows, chunks):
    # In chunks of about 100 rows: 12 sets of 40 rows in 6 chunks of 2 sets (every 6th set);
    # 4 sets of 400 rows in 4 chunks of one set; 97 sets (no divisor near 5 chunks) and 15 rows
    # in one pass. Values and gradients are those of one pass.
    net = MLP(3, (16,), 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (num_sets, rows, 3))
    w = (jax.random.uniform(jax.random.PRNGKey(2), (num_sets, rows)) > 0.3).astype(x.dtype)
    pooled = lambda x, w: (jnp.sum(jax.nn.silu(net(x)) * w[..., None], axis=1), w.sum(1))
    loss = lambda x, f: jnp.sum(jnp.sin(f(x)[0]) * f(x)[1][:, None])
    chunked = lambda x: map_sets(pooled, x, w, width=16, chunk_values=1600)
    (a, na), (b, nb) = chunked(x), pooled(x, w)
    close = lambda c, d: np.testing.assert_allclose(c, d, rtol=1e-4,
                                                    atol=1e-5 * (1 + np.max(np.abs(d))))
    close(a, b)
    np.testing.assert_array_equal(na, nb)
    ga = jax.jit(jax.grad(lambda x: loss(x, chunked)))(x)
    gb = jax.jit(jax.grad(lambda x: loss(x, lambda x: pooled(x, w))))(x)
    close(ga, gb)
    jaxpr = str(jax.make_jaxpr(chunked)(x))
    assert ("scan" in jaxpr) == bool(chunks)
    assert not chunks or f"length={chunks}" in jaxpr


@pytest.mark.parametrize("net", ["deepset", "set_transformer", "time_series", "group_encoder",
                                 "hierarchical"])
def test_networks_in_chunks_equal_one_pass(net, monkeypatch):
    # The networks' per-set work in chunks (map_sets, made to chunk at this size) gives the
    # outputs and parameter gradients of one pass, with covariates, moments and padding.
    from numpyro_amortized.networks import SetTransformer, TimeSeriesNet, layers
    from numpyro_amortized.networks.hierarchical import GroupEncoder

    b, n = 12, 70
    x = jax.random.normal(jax.random.PRNGKey(0), (b, n, 3))
    mask = jnp.arange(n)[None] < jax.random.randint(jax.random.PRNGKey(1), (b, 1), 1, n + 1)
    data = DataBatch(jnp.where(mask[..., None], x, 0.0), mask, x[:, 0, :2])
    spec, rngs, call = DataSpec(3, n, 2, 2), nnx.Rngs(0), lambda m: m(data)
    if net == "deepset":
        module, width = DeepSet(spec, hidden=8, rngs=rngs), 8
    elif net == "set_transformer":
        module, width = SetTransformer(spec, dim=8, num_heads=2, num_inducing=4, rngs=rngs), 8
    elif net == "time_series":
        module, width = TimeSeriesNet(spec, channels=8, rngs=rngs), 24  # 3 taps of 8
    elif net == "group_encoder":
        module, width = GroupEncoder(3, 4, responses=1, covariates=2, width=8, rngs=rngs), 8
        group = jax.random.randint(jax.random.PRNGKey(2), (b, n), 0, 4)
        call = lambda m: m(x, group, mask)
    else:  # a hierarchical guide's training objective: the encoder and the local flow chunk
        from numpyro_amortized import AutoAmortizedFlow
        from numpyro_amortized.examples.hierarchical import varying_slopes

        group, x = jnp.arange(n) % 35, x[0, :, 0]
        guide = AutoAmortizedFlow(varying_slopes)
        params = guide.setup(jax.random.PRNGKey(0), group, x, 35, y=x)
        sims = guide.simulate(jax.random.PRNGKey(1), b, group, x, 35, y=x)
        module = guide.posterior(params)
        width = module.encoder.phi.out.out_features
        call = lambda m: m.training_log_prob(sims.u, sims.data)
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    loss = lambda st: sum(jnp.sum(jnp.sin(o))
                          for o in jax.tree.leaves(call(nnx.merge(graphdef, st, rest))))
    one = jax.jit(jax.value_and_grad(loss))(state)
    monkeypatch.setattr(layers, "CHUNK_VALUES", width * 2 * n)  # chunks of two sets
    jaxpr = str(jax.make_jaxpr(loss)(state))
    assert jaxpr.count("length=6") + jaxpr.count("length=12") == (2 if net == "hierarchical" else 1)
    chunked = jax.jit(jax.value_and_grad(loss))(state)
    for a, c in zip(jax.tree.leaves(one), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5 * (1 + np.max(np.abs(a))))


def test_least_squares_matches_numpy_on_each_masked_set():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 20, 2))
    y = np.stack([1.0 + x[..., 0] - 2 * x[..., 1], x[..., 0] ** 2], -1) + rng.normal(size=(3, 20, 2))
    sizes = np.array([20, 12, 7])
    mask = np.arange(20)[None] < sizes[:, None]
    m = jnp.asarray(mask[..., None], jnp.float32)
    total = lambda h: jnp.sum(h * jnp.reshape(m, m.shape + (1,) * (h.ndim - 3)), axis=1)
    n = jnp.asarray(sizes[:, None], jnp.float32)
    fits = jax.jit(lambda y, x, n: least_squares(y, x, total, n, ridge=0.0))  # see jit_call
    beta, log_resid, log_se = fits(jnp.asarray(y, jnp.float32), jnp.asarray(x, jnp.float32), n)
    for b in range(3):
        design = np.column_stack([np.ones(sizes[b]), x[b, :sizes[b]]])
        coef, *_ = np.linalg.lstsq(design, y[b, :sizes[b]], rcond=None)  # (3, 2)
        resid = y[b, :sizes[b]] - design @ coef
        # coefficients below the tail compression (|beta| <= 5) come back as they are
        np.testing.assert_allclose(beta[b], coef.reshape(-1), atol=1e-4)
        np.testing.assert_allclose(np.exp(2 * log_resid[b]) - 1e-4,
                                   (resid**2).mean(0), rtol=1e-3)
        se = np.sqrt(np.diag(np.linalg.inv(design.T @ design)))
        np.testing.assert_allclose(np.exp(log_se[b]), se, rtol=1e-3)


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
