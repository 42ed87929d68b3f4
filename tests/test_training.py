"""The training core: faults never corrupt parameters, offline budgets, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from numpyro_amortized import NPE, AutoAmortizedFlow, fit, trainer
from numpyro_amortized.examples import gaussian_linear
from numpyro_amortized.losses import AmortizedLoss
from numpyro_amortized.networks import affine_flow

KEY = jax.random.PRNGKey(0)
X = jnp.zeros(10)


class NaNLoss(AmortizedLoss):
    """NPE, but NaN whenever ``poison`` is set: a stand-in for a numerical blow-up."""

    poison = False

    def simulation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        losses = -guide.log_prob_simulations(params, sims)
        return losses * jnp.nan if self.poison else losses


def small_guide():
    return AutoAmortizedFlow(gaussian_linear, flow=lambda d, c, **kw: affine_flow(
        d, c, num_layers=2, hidden=(32,), **kw))


def test_non_finite_loss_skips_the_update_and_is_counted():
    guide = small_guide()
    loss = NaNLoss()
    tr = trainer(guide, loss=loss, optimizer=optax.adam(1e-2), batch_size=64)
    state = tr.init(KEY, x=X)
    state, info = jax.jit(lambda s: tr.update(s, x=X))(state)
    assert not bool(info.skipped) and int(state.num_skipped) == 0
    loss.poison = True
    poisoned, info = jax.jit(lambda s: tr.update(s, x=X))(state)
    assert bool(info.skipped) and int(poisoned.num_skipped) == 1
    assert not np.isfinite(float(info.loss))
    for a, b in zip(jax.tree.leaves(poisoned.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(poisoned.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(poisoned.step) == int(state.step) + 1


def flaky_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = jnp.where(mu > 1.5, jnp.inf, 1.0)  # ~7% of simulations blow up
    with numpyro.plate("N", 5):
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_non_finite_simulations_are_dropped_and_counted():
    guide = AutoAmortizedFlow(flaky_model)
    result = fit(guide, KEY, y=jnp.zeros(5), num_steps=1000, batch_size=128, progress_bar=False)
    expected = 1000 * 128 * float(1 - jax.scipy.stats.norm.cdf(1.5))
    assert 0.8 * expected < result.num_dropped < 1.2 * expected
    assert result.num_skipped == 0
    assert np.isfinite(result.losses).all()
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(result.params))
    draws = guide.sample_posterior(KEY, result.params, y=jnp.full(5, 0.5), sample_shape=(2000,))
    # exact posterior N(5 * 0.5 / 6, 1 / 6); mass above 1.5 (never simulated) is negligible
    assert abs(float(draws["mu"].mean()) - 0.5 * 5 / 6) < 0.25 * (1 / 6) ** 0.5


def test_model_that_mostly_fails_is_rejected():
    def broken(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, jnp.where(mu > -1.0, jnp.inf, 1.0)), obs=y)

    with pytest.raises(ValueError, match="prior simulations produced NaN"):
        fit(AutoAmortizedFlow(broken), KEY, y=0.0, num_steps=10, progress_bar=False)


def test_offline_budget_and_validation():
    guide = small_guide()
    result = fit(guide, KEY, x=X, num_steps=300, batch_size=64, num_simulations=2000,
                 progress_bar=False, num_chunks=3)
    assert result.num_simulations == 2000
    assert result.losses.shape == (300,) and np.isfinite(result.losses).all()
    steps, val = result.validation_losses
    assert list(steps) == [100, 200, 300] and val[-1] < val[0]


def test_update_compiles_once():
    guide = small_guide()
    tr = trainer(guide, loss=NPE(), optimizer=optax.adam(1e-3), batch_size=32)
    state = tr.init(KEY, x=X)
    step = jax.jit(lambda s: tr.update(s, x=X))
    for _ in range(5):
        state, _ = step(state)
    assert step._cache_size() == 1
    assert int(state.step) == 5


def test_update_runs_under_pmap():
    guide = small_guide()
    tr = trainer(guide, optimizer=optax.adam(1e-3), batch_size=16, axis_name="d")
    state = tr.init(KEY, x=X)
    stacked = jax.tree.map(lambda a: a[None], state)
    new, info = jax.pmap(lambda s: tr.update(s, x=X), axis_name="d")(stacked)
    assert info.loss.shape == (1,) and int(new.step[0]) == 1
