"""The guide: supports, densities, NumPyro compatibility, batches, and clear errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.examples import gaussian_linear, linear_regression
from numpyro_amortized.networks import affine_flow

KEY = jax.random.PRNGKey(0)


def one_latent_model(prior):
    def model(y=None):
        z = numpyro.sample("z", prior)
        loc = jnp.atleast_1d(z)[0]
        with numpyro.plate("N", 6):
            numpyro.sample("y", dist.Normal(loc, 0.5), obs=y)

    return model


def trained(model, steps=200, **kwargs):
    guide = AutoAmortizedFlow(model, **kwargs)
    result = fit(guide, KEY, y=jnp.zeros(6), num_steps=steps, batch_size=128, progress_bar=False)
    return guide, result.params


@pytest.mark.slow
def test_all_kinds_of_supports_stay_in_support():
    def model(y=None):
        s = numpyro.sample("s", dist.LogNormal(0.0, 0.5))
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
        o = numpyro.sample("o", dist.TransformedDistribution(
            dist.Normal(jnp.zeros(3), 1.0).to_event(1), dist.transforms.OrderedTransform()))
        L = numpyro.sample("L", dist.LKJCholesky(3, 2.0))
        with numpyro.plate("N", 6):
            numpyro.sample("y", dist.Normal(s * p + w[0] + o[0] + L[1, 0], 1.0), obs=y)

    guide = AutoAmortizedFlow(model)
    params = guide.setup(KEY, y=jnp.zeros(6))  # supports hold by construction, trained or not
    y = jnp.array([0.5, 1.0, -0.3, 2.0, 0.1, 0.7])
    d = guide.sample_posterior(jax.random.PRNGKey(1), params, y=y, sample_shape=(5000,))
    assert d["s"].shape == (5000,) and d["w"].shape == (5000, 3) and d["L"].shape == (5000, 3, 3)
    assert bool(jnp.all(d["s"] > 0))
    assert bool(jnp.all((d["p"] > 0) & (d["p"] < 1)))
    assert bool(jnp.all(d["w"] > 0)) and np.allclose(d["w"].sum(-1), 1.0, atol=1e-5)
    assert bool(jnp.all(jnp.diff(d["o"], axis=-1) > 0))
    corr = jnp.einsum("...ij,...kj->...ik", d["L"], d["L"])
    np.testing.assert_allclose(jnp.diagonal(corr, axis1=-2, axis2=-1), 1.0, atol=1e-4)
    assert bool(jnp.all(jnp.triu(d["L"], 1) == 0))
    lp = guide.log_prob(params, d, y=y)
    assert lp.shape == (5000,) and bool(jnp.all(jnp.isfinite(lp)))


@pytest.mark.parametrize(
    "prior, known",
    [
        (dist.LogNormal(0.3, 0.7), lambda loc, scale: dist.LogNormal(loc, scale)),
        (dist.Beta(2.0, 3.0), lambda loc, scale: dist.TransformedDistribution(
            dist.Normal(loc, scale), dist.transforms.SigmoidTransform())),
    ],
    ids=["positive", "unit_interval"],
)
def test_log_prob_of_untrained_guide_is_the_known_transformed_density(prior, known):
    """An untrained spline flow is the identity after standardization, so q(z | y) is exactly
    the standardizing normal pushed through exp (LogNormal) or sigmoid (logit-normal)."""
    model = one_latent_model(prior)
    guide = AutoAmortizedFlow(model)
    params = guide.setup(KEY, y=jnp.zeros(6))
    standardize = guide.posterior(params).flow.bijections[-1]
    loc, scale = float(standardize.loc[...][0]), float(standardize.scale[...][0])
    z = prior.sample(jax.random.PRNGKey(2), (200,))
    lp = guide.log_prob(params, {"z": z}, y=jnp.ones(6))
    np.testing.assert_allclose(lp, known(loc, scale).log_prob(z), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "prior, lo, hi",
    [(dist.LogNormal(0.0, 0.5), 1e-6, 30.0), (dist.Beta(2.0, 2.0), 1e-7, 1 - 1e-7)],
    ids=["positive", "unit_interval"],
)
@pytest.mark.slow
def test_log_prob_of_trained_guide_integrates_to_one(prior, lo, hi):
    guide, params = trained(one_latent_model(prior))
    y = jnp.array([0.2, 0.9, 1.4, 0.3, 0.6, 1.1])
    grid = jnp.linspace(lo, hi, 200001)
    density = jnp.exp(guide.log_prob(params, {"z": grid}, y=y))
    np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, atol=5e-3)


@pytest.mark.slow
def test_simplex_log_prob_integrates_to_one():
    guide, params = trained(one_latent_model(dist.Dirichlet(jnp.array([2.0, 3.0, 4.0]))))
    y = jnp.full(6, 0.4)
    n = 600
    a = (jnp.arange(n) + 0.5) / n
    w1, w2 = jnp.meshgrid(a, a, indexing="ij")
    inside = (w1 + w2) < 1.0
    w = jnp.stack([w1, w2, jnp.clip(1.0 - w1 - w2, 1e-9)], axis=-1).reshape(-1, 3)
    density = jnp.exp(guide.log_prob(params, {"z": w}, y=y)).reshape(n, n)
    total = float(jnp.sum(jnp.where(inside, density, 0.0)) / n**2)
    assert abs(total - 1.0) < 0.02


@pytest.fixture(scope="module")
def regression():
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    result = fit(guide, KEY, x=jnp.zeros(15), y=jnp.zeros(15), num_steps=300, batch_size=128,
                 progress_bar=False)
    return guide, result.params


def test_works_in_numpyro_predictive(regression):
    guide, params = regression
    x = jnp.linspace(-1, 1, 9)
    y = 1.0 + 0.5 * x
    pred = Predictive(linear_regression, guide=guide, params=params, num_samples=2000,
                      return_sites=["beta", "sigma"])
    out = pred(jax.random.PRNGKey(3), x=x, y=y)
    assert out["beta"].shape == (2000, 2) and out["sigma"].shape == (2000,)
    direct = guide.sample_posterior(jax.random.PRNGKey(4), params, x=x, y=y, sample_shape=(2000,))
    sd = direct["beta"].std(0)
    np.testing.assert_array_less(jnp.abs(out["beta"].mean(0) - direct["beta"].mean(0)), 0.15 * sd)
    # posterior predictive from guide draws, as NumPyro users write it
    ppc = Predictive(linear_regression, posterior_samples=direct)(jax.random.PRNGKey(5), x=x)
    assert ppc["y"].shape == (2000, 9)


def test_batch_of_datasets_in_one_call_matches_single_calls(regression):
    guide, params = regression
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 15)), jnp.float32)
    y = jnp.asarray(2 + x + rng.normal(size=(4, 15)), jnp.float32)
    draws = guide.sample_posterior_batch(KEY, params, {"x": x, "y": y}, sample_shape=(3000,))
    assert draws["beta"].shape == (4, 3000, 2) and draws["sigma"].shape == (4, 3000)
    for i in range(4):
        one = guide.sample_posterior(jax.random.PRNGKey(i), params, x=x[i], y=y[i],
                                     sample_shape=(3000,))
        sd = one["beta"].std(0)
        np.testing.assert_array_less(jnp.abs(draws["beta"][i].mean(0) - one["beta"].mean(0)),
                                     0.15 * sd)
    # padded datasets with num_obs give exactly the density of the unpadded dataset
    lp_padded = guide.log_prob_batch(params, {k: v[:1, :5] for k, v in draws.items()},
                                     {"x": x[:1], "y": y[:1]}, num_obs=jnp.array([7]))
    lp_short = guide.log_prob(params, {k: v[0, :5] for k, v in draws.items()}, x=x[0, :7],
                              y=y[0, :7])
    np.testing.assert_allclose(lp_padded[0], lp_short, rtol=1e-5, atol=1e-5)


def test_model_log_density_masks_observations_beyond_the_dataset_size(regression):
    """What AmortizedELBO uses on padded datasets: exactly the model on the first n points."""
    guide, _ = regression
    x = jnp.linspace(-1, 1, 15)
    y = 1.0 + x + jnp.sin(7 * x)
    theta = {"beta": jnp.array([1.0, 0.5]), "sigma": jnp.array(0.7)}
    masked = guide.model_log_density(theta, {"x": x, "y": y}, 7, x=jnp.zeros(15), y=jnp.zeros(15))
    short = log_density(linear_regression, (), {"x": x[:7], "y": y[:7]}, theta)[0]
    full = log_density(linear_regression, (), {"x": x, "y": y}, theta)[0]
    np.testing.assert_allclose(masked, short, rtol=1e-6)
    assert abs(float(full - short)) > 1.0


def test_median_and_quantiles(regression):
    guide, params = regression
    x = jnp.linspace(-1, 1, 10)
    y = 2.0 + x
    q = guide.quantiles(params, [0.05, 0.5, 0.95], x=x, y=y)
    med = guide.median(params, x=x, y=y)
    assert q["beta"].shape == (3, 2)
    assert bool(jnp.all(q["beta"][0] < q["beta"][2]))
    np.testing.assert_allclose(med["sigma"], q["sigma"][1])


def test_dataset_size_outside_training_range_warns(regression):
    guide, params = regression
    x = jax.random.normal(jax.random.PRNGKey(3), (20,))  # data like the model's
    y = 2.0 + 0.5 * x + 0.5 * jnp.sin(7 * x)
    with pytest.warns(UserWarning, match="20 observations.*trained on 5 to 15"):
        guide.sample_posterior(KEY, params, x=x, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide.sample_posterior(KEY, params, x=x[:5], y=y[:5])


@pytest.mark.parametrize("bad, match", [
    (jnp.zeros((15, 2)), r"'y' has shape \(15, 2\).*built for shape \(15,\)"),
    (jnp.zeros(15).at[3].set(jnp.nan), r"'y' has 1 non-finite.*index \(3,\)"),
    (jnp.zeros(15).at[0].set(jnp.inf).at[5].set(-jnp.inf), r"'y' has 2 non-finite"),
    (None, r"No value for observed site 'y'"),
])
def test_bad_observed_data_gets_a_clear_error(regression, bad, match):
    guide, params = regression
    with pytest.raises(ValueError, match=match):
        guide.sample_posterior(KEY, params, x=jnp.zeros(15), y=bad)


def test_fixed_size_guide_rejects_other_sizes():
    guide = AutoAmortizedFlow(gaussian_linear, flow=affine_flow)
    params = guide.setup(KEY, x=jnp.zeros(10))
    with pytest.raises(ValueError, match=r"'x' has shape \(9,\) but the guide was built for shape \(10,\)"):
        guide.sample_posterior(KEY, params, x=jnp.zeros(9))
    with pytest.raises(ValueError, match="x.*non-finite"):
        guide.sample_posterior_batch(KEY, params, {"x": jnp.full((2, 10), jnp.nan)})


def test_untrained_guide_says_how_to_train():
    guide = AutoAmortizedFlow(gaussian_linear)
    with pytest.raises(RuntimeError, match="not been set up.*fit"):
        guide.sample_posterior(KEY, {}, x=jnp.zeros(10))


def lognormal_model(y=None, n=10):
    """log y_i ~ Normal(mu, 0.5), mu ~ Normal(0, 1): the posterior of mu is Normal, exactly."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", n):
        numpyro.sample("y", dist.LogNormal(mu, 0.5), obs=y)


def test_positive_data_is_read_on_the_log_scale_and_non_positive_data_is_refused():
    from numpyro_amortized.simulation import inspect_model

    def model(a=None, b=None, c=None, d=None):
        numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("a", dist.LogNormal(jnp.zeros(3), 1.0).to_event(1), obs=a)
        numpyro.sample("b", dist.Gamma(2.0, 1.0), obs=b)
        numpyro.sample("c", dist.Normal(0.0, 1.0), obs=c)
        numpyro.sample("d", dist.Poisson(3.0), obs=d)

    obs = inspect_model(model, a=jnp.ones(3), b=1.0, c=0.0, d=1).observed
    assert {s.name: s.log_scale for s in obs} == {"a": True, "b": True, "c": False, "d": False}
    assert {s.name: s.counts for s in obs} == {"a": False, "b": False, "c": False, "d": True}

    guide = AutoAmortizedFlow(lognormal_model)
    y = jnp.exp(jnp.linspace(-1.0, 1.0, 10))
    guide.setup(jax.random.PRNGKey(0), y=y)
    batch = guide.data_layout.encode({"y": y[None]})
    np.testing.assert_allclose(batch.set[0, :, 0], np.log(y), rtol=1e-6)
    with pytest.raises(ValueError, match=r"'y' has 1 value\(s\) <= 0, the first at index \(3,\)"):
        guide.data_layout.check({"y": y.at[3].set(0.0)})


def poisson_regression(x, y=None):
    a = numpyro.sample("a", dist.Normal(1.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 0.5))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(a + b * x)), obs=y)


def test_counts_are_read_as_log1p_and_older_checkpoints_read_them_raw(tmp_path):
    """Unbounded counts reach the summary network as log(1 + y); values that are not counts
    are refused naming the site; a checkpoint written before that rule (its statistics have
    no "log_counts") is rebuilt reading counts raw, as it was trained."""
    from numpyro_amortized import load, save
    from numpyro_amortized.checkpoint import read_file, write_file

    x = jnp.linspace(-1.0, 1.0, 12)
    y = jnp.asarray([0, 1, 3, 2, 7, 5, 12, 9, 30, 25, 60, 410], jnp.float32)
    guide = AutoAmortizedFlow(poisson_regression, flow=affine_flow, num_pilot_simulations=256)
    params = guide.setup(jax.random.PRNGKey(0), x, y=y)
    assert guide._stats["log_counts"]
    read = lambda g: np.asarray(g.data_layout.encode({"y": y[None], "x": x[None]}).set[0, :, 0])
    np.testing.assert_allclose(read(guide), np.log1p(np.asarray(y)), rtol=1e-6)
    for bad, where in ((y.at[4].set(-1.0), 4), (y.at[7].set(2.5), 7)):
        with pytest.raises(ValueError, match=rf"'y' has a value at index \({where},\) that is "
                                             "not a count"):
            guide.data_layout.check({"y": bad, "x": x})

    save(tmp_path / "new.ckpt", guide, params)
    body = read_file(tmp_path / "new.ckpt")
    loaded, _ = load(tmp_path / "new.ckpt", poisson_regression)
    np.testing.assert_allclose(read(loaded), np.log1p(np.asarray(y)), rtol=1e-6)
    older = {k: v for k, v in body["stats"].items() if k != "log_counts"}
    write_file(tmp_path / "old.ckpt", {**body, "stats": older})
    loaded, _ = load(tmp_path / "old.ckpt", poisson_regression)
    assert not any(s.counts for s in loaded.structure.observed)
    np.testing.assert_allclose(read(loaded), np.asarray(y), rtol=1e-6)


@pytest.mark.slow
def test_guide_for_positive_data_matches_the_exact_posterior():
    """Trained on the log scale, the guide's posterior of mu matches the exact Normal posterior
    on five datasets (mean within 0.25 sd, sd within 15%); a posterior as wide as the prior,
    or shifted by half an sd, fails the same check."""
    guide = AutoAmortizedFlow(lognormal_model)
    result = fit(guide, jax.random.PRNGKey(0), y=jnp.ones(10), num_steps=1500, progress_bar=False)
    rng = np.random.default_rng(0)
    errors, broken = [], []
    for i in range(5):
        mu = rng.normal()
        y = np.exp(mu + 0.5 * rng.normal(size=10))
        prec = 1.0 + 10 / 0.25
        mean, sd = np.log(y).sum() / 0.25 / prec, prec**-0.5
        d = guide.sample_posterior(jax.random.PRNGKey(i), result.params, y=jnp.asarray(y),
                                   sample_shape=(4000,))["mu"]
        errors.append((abs(float(d.mean()) - mean) / sd, abs(float(d.std()) / sd - 1)))
        broken.append((abs(float(d.mean()) + 0.5 * sd - mean) / sd,  # shifted by sd / 2
                       abs(1.0 / sd - 1)))                           # as wide as the prior
    errors, broken = np.array(errors), np.array(broken)
    assert broken[:, 0].min() > 0.25 and broken[:, 1].min() > 0.15
    print("posterior mean error / sd, sd ratio - 1:", errors.max(0))
    assert errors[:, 0].max() < 0.25 and errors[:, 1].max() < 0.15, errors


def test_sample_posterior_returns_deterministic_sites():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        numpyro.deterministic("snr", jnp.stack([mu / sigma, mu * sigma]))
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    guide = AutoAmortizedFlow(model, flow=affine_flow, num_pilot_simulations=256)
    params = guide.setup(jax.random.PRNGKey(0), y=jnp.zeros(10))
    for shape in ((), (7,), (3, 5)):
        draws = guide.sample_posterior(jax.random.PRNGKey(1), params, y=jnp.ones(10),
                                       sample_shape=shape)
        assert draws["snr"].shape == shape + (2,)
        np.testing.assert_allclose(draws["snr"][..., 0], draws["mu"] / draws["sigma"], rtol=1e-5)
        np.testing.assert_allclose(draws["snr"][..., 1], draws["mu"] * draws["sigma"], rtol=1e-5)


def test_posterior_predictive_in_one_call(regression):
    guide, params = regression
    x = jnp.linspace(-1.0, 1.0, 15)
    y = 1.0 + 2.0 * x
    out = guide.sample_posterior_predictive(jax.random.PRNGKey(0), params, x=x, y=y,
                                            num_samples=300)
    assert out["y"].shape == (300, 15) and "x" not in out  # responses replicated, not x
    assert {s.name for s in guide.latent_layout.sites} <= set(out)
    # each replicated dataset scatters around its own draw's regression line
    mean = out["beta"][:, :1] + out["beta"][:, 1:] * x
    resid = (out["y"] - mean) / out["sigma"][:, None]
    assert abs(float(resid.std()) - 1.0) < 0.05
