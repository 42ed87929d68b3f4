"""The model as simulator: site discovery, prior-predictive batches, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized import inspect_model, simulate
from numpyro_amortized.examples import linear_regression


def test_inspect_linear_regression():
    s = inspect_model(linear_regression, x=jnp.zeros(7), y=jnp.zeros(7))
    assert [(l.name, l.shape) for l in s.latents] == [("beta", (2,)), ("sigma", ())]
    assert [(o.name, o.shape, o.plate_axis) for o in s.observed] == [("x", (7,), 0), ("y", (7,), 0)]
    assert s.data_plate == "N" and s.data_plate_size == 7
    assert s.fingerprint() == inspect_model(linear_regression, x=jnp.ones(7), y=jnp.ones(7)).fingerprint()
    assert s.fingerprint() != inspect_model(linear_regression, x=jnp.ones(8), y=jnp.ones(8)).fingerprint()


def test_plate_axis_with_event_dims_and_other_dims():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(3), 1).to_event(1))
        with numpyro.plate("N", 5, dim=-1):
            numpyro.sample("y", dist.Normal(mu, 1).to_event(1), obs=y)

    s = inspect_model(model, y=jnp.zeros((5, 3)))
    assert s.observed[0].plate_axis == 0 and s.observed[0].shape == (5, 3)


def test_simulate_draws_from_the_prior_predictive():
    sims = jax.jit(lambda k: simulate(linear_regression, k, 20000, x=jnp.zeros(3), y=jnp.zeros(3)))(
        jax.random.PRNGKey(0)
    )
    assert sims["beta"].shape == (20000, 2) and sims["y"].shape == (20000, 3)
    np.testing.assert_allclose(sims["beta"].mean(0), [2.0, 0.0], atol=0.06)
    np.testing.assert_allclose(sims["beta"].std(0), [3.0, 1.0], rtol=0.03)
    np.testing.assert_allclose(sims["x"].std(), 1.0, rtol=0.03)  # covariates are simulated too
    resid = sims["y"] - sims["beta"][:, :1] - sims["beta"][:, 1:] * sims["x"]
    np.testing.assert_allclose(resid.std(0), np.sqrt(2.0), rtol=0.05)  # E[sigma^2] of Gamma(1,1)


def test_discrete_latent_is_rejected_with_a_fix():
    def model(y=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(z, 1), obs=y)

    with pytest.raises(ValueError, match=r"'z'.*discrete.*marginalize"):
        inspect_model(model, y=1.0)


def test_model_with_nothing_observed_is_rejected():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1), obs=y)

    with pytest.raises(ValueError, match="no observed site.*obs="):
        inspect_model(model)
    # naming the site as observed works
    s = inspect_model(model, observed=["y"])
    assert [o.name for o in s.observed] == ["y"]
    with pytest.raises(ValueError, match="names no sample site"):
        inspect_model(model, observed=["w"])


def test_latent_inside_data_plate_is_rejected():
    def model(y=None):
        with numpyro.plate("N", 4):
            z = numpyro.sample("z", dist.Normal(0, 1))
            numpyro.sample("y", dist.Normal(z, 1), obs=y)

    with pytest.raises(ValueError, match=r"\['z'\].*plate 'N'"):
        inspect_model(model, y=jnp.zeros(4), data_plate="N")


def test_support_depending_on_a_latent_is_rejected():
    def model(y=None):
        a = numpyro.sample("a", dist.Uniform(1, 2))
        b = numpyro.sample("b", dist.Uniform(0, a))
        numpyro.sample("y", dist.Normal(b, 1), obs=y)

    with pytest.raises(ValueError, match="support of latent site 'b'.*Reparametrize"):
        inspect_model(model, y=0.0)


def test_programs_that_run_once_compile_with_their_options_or_fall_back(monkeypatch):
    from numpyro_amortized import compile_options as co

    f = lambda x: jnp.sin(x) * 2.0 + jnp.cumsum(x) / x.size
    x = jnp.linspace(-3.0, 3.0, 1000)
    assert co.once_options() == co.ONCE_OPTIONS  # the CPU, and an XLA that knows them
    np.testing.assert_allclose(co.jit_once(f)(x), jax.jit(f)(x), rtol=1e-5, atol=1e-6)
    # the options reach XLA: one it does not know is refused when compiling ...
    accepted = co._accepted
    monkeypatch.setattr(co, "ONCE_OPTIONS", {"xla_no_such_option": True})
    monkeypatch.setattr(co, "_accepted", lambda backend: True)
    with pytest.raises(Exception, match="xla_no_such_option"):
        co.jit_once(f)(x)
    # ... and the check of what XLA accepts turns them off: a plain jax.jit
    monkeypatch.setattr(co, "_accepted", accepted)
    monkeypatch.setattr(co, "_ACCEPTED", {})
    assert co.once_options() is None
    np.testing.assert_allclose(co.jit_once(f)(x), jax.jit(f)(x))


def test_pilot_quartiles_are_those_of_the_valid_unmasked_rows():
    from numpyro_amortized.data import _weighted_quantiles

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(501, 3)), 1)  # ties
    keep = rng.uniform(size=501) > 0.4
    w = keep / keep.sum()
    for got, q in zip(_weighted_quantiles(x, w, (0.25, 0.5, 0.75)), (0.25, 0.5, 0.75)):
        np.testing.assert_array_equal(got, np.quantile(x[keep], q, axis=0, method="inverted_cdf"))
