"""Set transformer and time-series network: padding never matters, order matters only for
series, and both learn exact posteriors on variable-size data."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import jit_call
from flax import nnx

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.data import DataBatch, DataSpec
from numpyro_amortized.networks import SetTransformer, TimeSeriesNet, default_summary_net

SPEC = DataSpec(set_features=2, max_set_size=12, flat_features=1)


def batch(x, n, pad_value=0.0, flat=None):
    """Datasets ``x`` (B, N, F) of sizes ``n``, the rest filled with ``pad_value``."""
    mask = jnp.arange(x.shape[1])[None, :] < n[:, None]
    x = jnp.where(mask[..., None], x, pad_value)
    return DataBatch(x, mask, flat if flat is not None else jnp.ones((x.shape[0], 1)))


@pytest.mark.parametrize("net", [SetTransformer, TimeSeriesNet])
def test_padding_never_changes_the_summary(net):
    module = net(SPEC, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 12, 2))
    n = jnp.array([3, 7, 12])
    call = jit_call(module)
    a, b = call(batch(x, n, 0.0)), call(batch(x, n, 1e3))  # b: garbage in the padding
    short = net(DataSpec(2, 7, 1), rngs=nnx.Rngs(0))  # same weights, smaller padded size
    nnx.update(short, nnx.state(module))
    c = jit_call(short)(batch(x[:2, :7], n[:2]))
    assert a.shape == (3, module.summary_dim)
    np.testing.assert_allclose(a, b, atol=1e-5)
    if net is SetTransformer:  # the series net reads time on the scale of the largest size
        np.testing.assert_allclose(a[:2], c, atol=1e-5)


def test_set_transformer_is_permutation_invariant_and_series_net_is_not():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 2))
    n = jnp.array([12, 12])
    perm = jax.random.permutation(jax.random.PRNGKey(3), 12)
    st, ts = (jit_call(net(SPEC, rngs=nnx.Rngs(0))) for net in (SetTransformer, TimeSeriesNet))
    np.testing.assert_allclose(st(batch(x, n)), st(batch(x[:, perm], n)), atol=1e-5)
    assert float(jnp.abs(ts(batch(x, n)) - ts(batch(x[:, perm], n))).max()) > 1e-3


def test_summary_net_is_chosen_from_the_structure():
    assert default_summary_net(SPEC) .__name__ == "DeepSet"
    assert default_summary_net(SPEC, time_series=True) is TimeSeriesNet
    with pytest.raises(ValueError, match="time_series=True.*plate"):
        default_summary_net(DataSpec(0, 0, 5), time_series=True)


def mean_model(y=None, n_max=60):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", n_max):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.mark.slow
def test_set_transformer_posterior_shrinks_like_one_over_sqrt_n():
    guide = AutoAmortizedFlow(mean_model, set_sizes=(5, 60), summary_net=SetTransformer)
    result = fit(guide, jax.random.PRNGKey(0), y=jnp.zeros(60), num_steps=1500, batch_size=128,
                 progress_bar=False)
    rng = np.random.default_rng(0)
    for n in (5, 20, 60):
        y = rng.normal(0.7, 1.0, n)
        draws = guide.sample_posterior(jax.random.PRNGKey(n), result.params, y=jnp.asarray(y),
                                       sample_shape=(4000,))["mu"]
        exact_mean, exact_sd = y.sum() / (n + 1), (n + 1) ** -0.5
        assert abs(float(draws.mean()) - exact_mean) < 0.2 * exact_sd, n
        assert abs(float(draws.std()) / exact_sd - 1) < 0.12, n


def trend_model(y=None, t_max=30):
    slope = numpyro.sample("slope", dist.Normal(0.0, 1.0))
    level = numpyro.sample("level", dist.Normal(0.0, 1.0))
    t = jnp.arange(t_max) / t_max
    with numpyro.plate("time", t_max):
        numpyro.sample("y", dist.Normal(level + 3.0 * slope * t, 0.5), obs=y)


@pytest.mark.slow
def test_time_series_net_learns_the_exact_posterior_of_a_trend():
    guide = AutoAmortizedFlow(trend_model, set_sizes=(10, 30), time_series=True)
    assert isinstance(guide.setup(jax.random.PRNGKey(0), y=jnp.zeros(30)), dict)
    result = fit(guide, jax.random.PRNGKey(0), y=jnp.zeros(30), num_steps=1500, batch_size=128,
                 progress_bar=False)
    assert type(guide.posterior(result.params).summary_net).__name__ == "TimeSeriesNet"
    rng = np.random.default_rng(1)
    for n in (10, 30):
        design = np.stack([np.ones(n), 3.0 * np.arange(n) / 30], axis=1)
        y = design @ np.array([0.5, -0.8]) + 0.5 * rng.normal(size=n)
        precision = np.eye(2) + design.T @ design / 0.25
        cov = np.linalg.inv(precision)
        mean = cov @ design.T @ y / 0.25  # [level, slope]
        draws = guide.sample_posterior(jax.random.PRNGKey(n), result.params, y=jnp.asarray(y),
                                       sample_shape=(4000,))
        got = np.stack([draws["level"], draws["slope"]], axis=1)
        sd = np.sqrt(np.diag(cov))
        assert np.all(np.abs(got.mean(0) - mean) < 0.25 * sd), (n, got.mean(0), mean)
        assert np.all(np.abs(got.std(0) / sd - 1) < 0.15), (n, got.std(0), sd)
