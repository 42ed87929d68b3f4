"""The guide factorized over the groups of a hierarchical model: structure, equivariance,
densities, checkpoints, and (slow) the exact eight-schools posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized import AutoAmortizedFlow, fit, load, save
from numpyro_amortized.diagnostics import c2st
from numpyro_amortized.examples.hierarchical import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    eight_schools,
    eight_schools_posterior,
    varying_intercepts,
)
from numpyro_amortized.networks import HierarchicalPosterior
from numpyro_amortized.networks.posterior import AmortizedPosterior

KEY = jax.random.PRNGKey(0)
GROUP = jnp.asarray(np.random.default_rng(0).permutation(np.repeat(np.arange(6), 5)))


def _setup(model, *args, hierarchical="auto", **kwargs):
    guide = AutoAmortizedFlow(model, hierarchical=hierarchical, num_pilot_simulations=256)
    return guide, guide.setup(KEY, *args, **kwargs)


def _batch(guide, **data):
    return guide._encode({k: jnp.asarray(v)[None] for k, v in data.items()})


def test_eight_schools_is_factorized_over_schools():
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    post = guide.posterior(params)
    assert isinstance(post, HierarchicalPosterior)
    names = [s.name for s in guide.latent_layout.sites]
    assert names == ["mu", "tau", "theta"]
    assert post.global_idx == (0, 1) and post.local_idx == tuple((2 + j,) for j in range(8))
    # one row per school: y_j and sigma_j (the group-aligned argument)
    assert guide.groups[0].group_arguments == ["sigma"]
    flat, flat_params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                               hierarchical=False)
    assert type(flat.posterior(flat_params)) is AmortizedPosterior


def test_group_embeddings_are_equivariant():
    """A group's embedding reads that group's rows only: changing school 3's data (or one row of
    group 2 in an index-linked plate) changes that group's embedding and no other's."""
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    post = guide.posterior(params)
    e = lambda y: np.asarray(post.group_embed(_batch(guide, y=y, sigma=EIGHT_SCHOOLS_SIGMA)))[0]
    diff = np.abs(e(EIGHT_SCHOOLS_Y) - e(EIGHT_SCHOOLS_Y.at[3].add(10.0))).max(-1)
    assert diff[3] > 1e-3 and np.all(diff[np.arange(8) != 3] == 0)

    y = jnp.zeros(30)
    guide, params = _setup(varying_intercepts, GROUP, 6, y=y)
    post = guide.posterior(params)
    assert post.local_idx == tuple((2 + j,) for j in range(6)) and post.global_idx == (0, 1, 8)
    e = lambda y: np.asarray(post.group_embed(_batch(guide, y=y, group=GROUP)))[0]
    row = int(np.flatnonzero(np.asarray(GROUP) == 2)[0])
    diff = np.abs(e(y) - e(y.at[row].set(3.0))).max(-1)
    assert diff[2] > 1e-3 and np.all(diff[np.arange(6) != 2] == 0)


def test_density_matches_its_draws():
    """``log_prob`` of the guide's own draws equals the log density they were drawn with, and the
    draws come back with the plate dimension."""
    guide, params = _setup(varying_intercepts, GROUP, 6, y=jnp.zeros(30))
    post = guide.posterior(params)
    batch = _batch(guide, y=jnp.linspace(-2, 2, 30), group=GROUP)
    u, lq = post.sample_and_log_prob(KEY, batch, (7,))
    assert u.shape == (7, 1, guide.latent_layout.dim)
    lp = post.log_prob(jnp.moveaxis(u, 0, 1), batch)
    np.testing.assert_allclose(np.asarray(lp).T, np.asarray(lq), rtol=1e-4, atol=1e-3)
    draws = guide.sample_posterior(KEY, params, GROUP, 6, y=jnp.linspace(-2, 2, 30),
                                   sample_shape=(5,))
    assert draws["a"].shape == (5, 6) and draws["mu"].shape == (5,)


def test_checkpoint_round_trip(tmp_path):
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    save(tmp_path / "g.ckpt", guide, params)
    loaded, loaded_params = load(tmp_path / "g.ckpt", eight_schools)
    assert isinstance(loaded.posterior(loaded_params), HierarchicalPosterior)
    a = guide.sample_posterior(KEY, params, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                               sample_shape=(4,))
    b = loaded.sample_posterior(KEY, loaded_params, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                                sample_shape=(4,))
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(b["theta"]), rtol=1e-5)


def _sum_of_groups(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
    numpyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)


def test_what_cannot_be_factorized_is_said():
    with pytest.warns(UserWarning, match="cannot factorize over its groups"):
        guide, params = _setup(_sum_of_groups, y=jnp.zeros(()))
    assert type(guide.posterior(params)) is AmortizedPosterior
    with pytest.raises(ValueError, match="groups"):
        _setup(_sum_of_groups, y=jnp.zeros(()), hierarchical=True)

    def flat(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", 5):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent site of the model is inside a plate"):
        _setup(flat, y=jnp.zeros(5), hierarchical=True)


def _errors(draws, exact):
    """Per-school |mean error| and sd ratio, in exact posterior sds."""
    a, b = np.asarray(draws["theta"]), exact["theta"]
    return np.abs(a.mean(0) - b.mean(0)) / b.std(0), a.std(0) / b.std(0)


@pytest.mark.slow
def test_eight_schools_matches_the_exact_posterior():
    """Trained once (online, 3,000 steps), against the exact posterior on the classic data and on
    a prior-predictive dataset with spread-out schools: each theta_j's mean within 0.2 and sd
    within 20% of the exact one, C2ST <= 0.6 on (mu, log tau) and on each theta_j. A guide whose
    schools read each other's data (embeddings rolled by one school) fails."""
    guide = AutoAmortizedFlow(eight_schools)
    result = fit(guide, KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y, num_steps=3000,
                 progress_bar=False)
    rng = np.random.default_rng(0)
    spread = jnp.asarray([-25.0, 30.0, 2.0, 45.0, -8.0, 12.0, 60.0, -40.0])
    for i, y in enumerate([EIGHT_SCHOOLS_Y, spread]):
        exact = eight_schools_posterior(EIGHT_SCHOOLS_SIGMA, y, 4000, rng)
        draws = guide.sample_posterior(jax.random.PRNGKey(i), result.params, EIGHT_SCHOOLS_SIGMA,
                                       y=y, sample_shape=(4000,))
        mean_err, sd_ratio = _errors(draws, exact)
        assert mean_err.max() < 0.2, (i, mean_err)
        assert np.all(np.abs(np.log(sd_ratio)) < np.log(1.2)), (i, sd_ratio)
        glob = lambda d: np.column_stack([d["mu"], np.log(d["tau"])])[:2000]
        assert c2st(glob(exact), glob(draws)) < 0.6
        for j in (0, 3, 7):
            assert c2st(exact["theta"][:2000, j:j + 1], np.asarray(draws["theta"])[:2000, j:j + 1]) < 0.6
    post = guide.posterior(result.params)
    rolled = lambda data, f=post.group_embed: jnp.roll(f(data), 1, axis=-2)
    object.__setattr__(post, "group_embed", rolled)
    batch = _batch(guide, y=spread, sigma=EIGHT_SCHOOLS_SIGMA)
    u = post.sample(KEY, batch, (4000,))[:, 0]
    broken, _ = guide.latent_layout.constrain(u)
    assert _errors(broken, exact)[0].max() > 1.0
