"""Models written with ``numpyro.contrib.control_flow.scan``: simulated series follow the
parameters exactly as ``Predictive``'s do, and a guide reads them as a time series."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.infer import Predictive

from numpyro_amortized import AutoAmortizedFlow, inspect_model
from numpyro_amortized.networks import affine_flow
from numpyro_amortized.simulation import simulate

T = 50


def ar1(y=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))

    def step(prev, y_t):
        y_t = numpyro.sample("y", dist.Normal(phi * prev, sigma), obs=y_t)
        return y_t, None

    scan(step, 0.0, y, length=T)


def lag1_correlation(draws):
    y = np.asarray(draws["y"])
    estimate = np.sum(y[:, 1:] * y[:, :-1], 1) / np.sum(y[:, :-1] ** 2, 1)
    return np.corrcoef(np.asarray(draws["phi"]), estimate)[0, 1]


def test_simulated_series_depend_on_the_parameters_as_predictives_do():
    sims = jax.jit(lambda k: simulate(ar1, k, 2000, y=jnp.zeros(T)))(jax.random.PRNGKey(0))
    reference = Predictive(ar1, num_samples=2000)(jax.random.PRNGKey(1))
    assert lag1_correlation(reference) > 0.95
    assert abs(lag1_correlation(sims) - lag1_correlation(reference)) < 0.02
    # the simulations the guide trains on (pilot, bank, online) come from the same function
    guide = AutoAmortizedFlow(ar1, flow=affine_flow, num_pilot_simulations=256)
    guide.setup(jax.random.PRNGKey(0), y=jnp.zeros(T))
    sims = guide.simulate(jax.random.PRNGKey(2), 2000, y=jnp.zeros(T))
    assert abs(lag1_correlation(sims.latents | sims.observed)
               - lag1_correlation(reference)) < 0.02


def test_a_scan_series_is_a_time_axis_for_time_series_guides():
    assert inspect_model(ar1, y=jnp.zeros(T)).data_plate is None
    structure = inspect_model(ar1, y=jnp.zeros(T), time_series=True)
    assert (structure.data_plate, structure.data_plate_size) == ("time", T)
    assert structure.observed[0].plate_axis == 0


def test_a_scan_model_that_cannot_run_without_its_observations_is_refused():
    def needs_data(data):  # the series is the only argument, and the scan needs its length
        phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))

        def step(prev, y_t):
            y_t = numpyro.sample("y", dist.Normal(phi * prev, 1.0), obs=y_t)
            return y_t, None

        scan(step, 0.0, data)

    with pytest.raises(ValueError, match=r"observes sites \['y'\] inside numpyro.contrib."
                                         r"control_flow.scan.*def model\(y=None\)"):
        simulate(needs_data, jax.random.PRNGKey(0), 4, jnp.zeros(T))


def test_posterior_predictive_of_a_scan_model_follows_the_draws():
    from numpyro_amortized.compare import posterior_predictive

    draws = {"phi": jnp.full(400, 0.9), "sigma": jnp.ones(400)}
    y = jax.random.normal(jax.random.PRNGKey(0), (T,))  # observed data: white noise
    rep = posterior_predictive(ar1, jax.random.PRNGKey(1), draws, y=y)["y"]
    assert rep.shape == (400, T)
    lag1 = np.sum(rep[:, 1:] * rep[:, :-1], 1) / np.sum(rep[:, :-1] ** 2, 1)
    assert abs(float(np.mean(lag1)) - 0.9) < 0.1  # replicated series are AR(1) with phi 0.9


def test_reading_the_data_of_a_scan_model_is_compiled_once():
    guide = AutoAmortizedFlow(ar1, time_series=True, num_pilot_simulations=256)
    guide.setup(jax.random.PRNGKey(0), y=jnp.zeros(T))
    ys = jax.random.normal(jax.random.PRNGKey(1), (3, T))
    for y in ys:  # three datasets of one kind: one program
        np.testing.assert_array_equal(guide.observed_data(y=y)["y"], y)
    [key] = [k for k in guide.programs._store if k[0] == "observed_values"]
    assert guide.programs.get(key, None)._cache_size() == 1


def test_a_model_that_reads_its_arguments_with_numpy_still_works():
    def with_numpy(x, y=None):
        x = np.asarray(x)  # not traceable: the data are read eagerly instead
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", len(x)):
            numpyro.sample("y", dist.Normal(mu + x, 1.0), obs=y)

    guide = AutoAmortizedFlow(with_numpy, num_pilot_simulations=256)
    guide.setup(jax.random.PRNGKey(0), np.zeros(5), y=jnp.zeros(5))
    for _ in range(2):
        assert guide.observed_data(np.zeros(5), y=jnp.ones(5))["y"].tolist() == [1.0] * 5
    [key] = [k for k in guide.programs._store if k[0] == "observed_values"]
    assert guide.programs.get(key, None) is None  # remembered as eager
