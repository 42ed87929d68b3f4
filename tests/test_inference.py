"""Inference quality against known answers (exact posterior, NUTS), with numbers asserted.

C2ST here is the sbibm classifier with ``early_stopping=True`` and 2,000 draws per side: the
exact recipe (max_iter=10,000, 10,000 draws) runs in benchmarks/. The checks below are shown to
fail for deliberately broken guides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import SVI

from numpyro_amortized import NPE, AmortizedELBO, AutoAmortizedFlow, c2st, fit
from numpyro_amortized.examples import (
    gaussian_linear,
    gaussian_linear_posterior,
    linear_regression,
    linear_regression_posterior,
)
from numpyro_amortized.networks.flows import ActNorm, coupling_flow

C2ST_KWARGS = {"early_stopping": True}
NUM_STEPS = 3000
X = jnp.zeros(10)


def exact_observations(n=5, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, np.sqrt(0.1), (n, 10))
    return jnp.asarray(theta + rng.normal(0, np.sqrt(0.1), (n, 10)), jnp.float32)


def errors_against_exact(draws_fn, n=5, seed=0):
    """Worst mean and sd error (in posterior sds) and the C2ST of each observation."""
    mean_err, sd_err, scores = 0.0, 0.0, []
    rng = np.random.default_rng(seed + 100)
    for i, x in enumerate(exact_observations(n, seed)):
        m, s = map(np.asarray, gaussian_linear_posterior(x))
        d = np.asarray(draws_fn(jax.random.PRNGKey(i), x))
        mean_err = max(mean_err, float(np.abs((d.mean(0) - m) / s).max()))
        sd_err = max(sd_err, float(np.abs(d.std(0) / s - 1).max()))
        ref = m + s * rng.normal(size=(2000, 10))
        scores.append(c2st(ref, d[:2000], classifier_kwargs=C2ST_KWARGS))
    return mean_err, sd_err, scores


def assert_matches_exact(draws_fn):
    mean_err, sd_err, scores = errors_against_exact(draws_fn)
    assert mean_err < 0.1, mean_err
    assert sd_err < 0.1, sd_err
    assert max(scores) <= 0.55, scores


def guide_draws(guide, params):
    return lambda key, x: guide.sample_posterior(key, params, x=x, sample_shape=(10000,))["theta"]


@pytest.fixture(scope="module")
def npe_guide():
    guide = AutoAmortizedFlow(gaussian_linear)
    result = fit(guide, jax.random.PRNGKey(0), x=X, num_steps=NUM_STEPS, progress_bar=False)
    return guide, result


def test_npe_fit_matches_exact_posterior(npe_guide):
    guide, result = npe_guide
    assert result.num_skipped == 0
    # the loss is -log q(theta | x); at the exact posterior its expectation is 0.789 below 0
    assert abs(result.validation_losses[1][-1] - 5 * (1 + np.log(2 * np.pi * 0.05))) < 0.1
    assert_matches_exact(guide_draws(guide, result.params))


@pytest.mark.slow
def test_amortized_elbo_fit_matches_exact_posterior():
    guide = AutoAmortizedFlow(gaussian_linear)
    result = fit(guide, jax.random.PRNGKey(1), x=X, num_steps=NUM_STEPS,
                 loss=AmortizedELBO(num_particles=1), progress_bar=False)
    assert_matches_exact(guide_draws(guide, result.params))


@pytest.mark.parametrize("loss", [NPE(batch_size=256), AmortizedELBO(batch_size=256)],
                         ids=["NPE", "AmortizedELBO"])
@pytest.mark.slow
def test_numpyro_svi_trains_the_guide(loss):
    guide = AutoAmortizedFlow(gaussian_linear)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adam(optax.cosine_decay_schedule(2e-3, NUM_STEPS, 0.01)))
    svi = SVI(gaussian_linear, guide, optimizer, loss=loss)
    run = svi.run(jax.random.PRNGKey(2), NUM_STEPS, x=X, progress_bar=False)
    assert np.isfinite(run.losses).all()
    assert_matches_exact(guide_draws(guide, run.params))


def test_checks_fail_for_wrong_posteriors():
    """The thresholds used above are crossed by posteriors that are visibly wrong."""

    def exact(key, x, shift=0.0, scale=1.0):
        m, s = gaussian_linear_posterior(x)
        return m + shift * s + scale * s * jax.random.normal(key, (10000, 10))

    mean_err, _, _ = errors_against_exact(lambda k, x: exact(k, x, shift=0.2), n=2)
    assert mean_err > 0.1
    _, sd_err, scores = errors_against_exact(lambda k, x: exact(k, x, scale=0.75), n=2)
    assert sd_err > 0.1 and max(scores) > 0.55
    _, _, scores = errors_against_exact(lambda k, x: exact(k, x, shift=0.5), n=2)
    assert max(scores) > 0.55
    # and the exact posterior passes
    assert_matches_exact(exact)


class _ActNormWithoutLogDet(ActNorm):
    def transform_and_log_det(self, x, condition=None):
        y, ld = super().transform_and_log_det(x, condition)
        return y, 0.0 * ld

    def inverse_and_log_det(self, y, condition=None):
        x, ld = super().inverse_and_log_det(y, condition)
        return x, 0.0 * ld


def test_a_flow_that_drops_a_log_det_fails_the_check(monkeypatch):
    import numpyro_amortized.networks.flows.flow as flow_module

    monkeypatch.setattr(flow_module, "ActNorm", _ActNormWithoutLogDet)
    guide = AutoAmortizedFlow(gaussian_linear, flow=lambda d, c, **kw: coupling_flow(
        d, c, transformer="affine", num_layers=2, hidden=(32,), **kw))
    result = fit(guide, jax.random.PRNGKey(3), x=X, num_steps=1000, progress_bar=False)
    with pytest.raises(AssertionError):
        assert_matches_exact(guide_draws(guide, result.params))


@pytest.mark.slow
def test_variable_size_regression_against_the_exact_posterior():
    """One guide, trained on N from 5 to 15, against the exact posterior (which agrees with
    NUTS: tests/test_examples.py) on datasets of five sizes. The largest C2ST (always N = 5)
    at training keys 0, 1, 2: .540/.565/.583 after 4,000 steps, .547/.576/.576 after 6,000,
    key 2 .562 after 8,000: the length is not what sets it."""
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    result = fit(guide, jax.random.PRNGKey(0), x=jnp.zeros(15), y=jnp.zeros(15),
                 num_steps=4_000, progress_bar=False)
    rng = np.random.default_rng(1)
    scores = {}
    for n in (5, 7, 10, 12, 15):
        beta = np.array([2.0, 0.0]) + np.array([3.0, 1.0]) * rng.normal(size=2)
        sigma = rng.gamma(1.0)
        x = rng.normal(size=n)
        y = beta[0] + beta[1] * x + sigma * rng.normal(size=n)
        ref = linear_regression_posterior(x, y, 2000, np.random.default_rng(n))
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        d = guide.sample_posterior(jax.random.PRNGKey(n), result.params, x=x, y=y,
                                   sample_shape=(2000,))
        draws = np.column_stack([d["beta"], d["sigma"]])
        scores[n] = c2st(ref, draws, classifier_kwargs=C2ST_KWARGS)
    print("C2ST against the exact posterior by dataset size:", scores)
    assert max(scores.values()) <= 0.6, scores
