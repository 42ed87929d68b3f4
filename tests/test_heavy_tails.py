"""Heavy-tailed data: under a Student-t likelihood whose degrees of freedom have a vague prior,
the prior predictive has values beyond 10^6 (draws with nu < 1), and the guide must still see
typical datasets at a usable scale (checked against the exact posterior, by quadrature)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import small_networks
from numpyro.infer import Predictive

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized import data as data_module
from numpyro_amortized.networks.posterior import compress_tails
from numpyro_amortized.train import GuideCheckWarning

N = 20


def student_t_location(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    nu = numpyro.sample("nu", dist.Gamma(2.0, 0.1))
    with numpyro.plate("N", N):
        numpyro.sample("y", dist.StudentT(nu, mu, 1.0), obs=y)


def exact_moments(y):
    """Posterior means and sds of mu and log nu, by quadrature on a grid."""
    mu = np.linspace(-25.0, 25.0, 1001)[:, None]
    log_nu = np.linspace(np.log(0.05), np.log(500.0), 300)[None]
    nu = np.exp(log_nu)
    logp = (dist.Normal(0.0, 5.0).log_prob(mu) + dist.Gamma(2.0, 0.1).log_prob(nu) + log_nu
            + dist.StudentT(nu[..., None], mu[..., None], 1.0).log_prob(y).sum(-1))
    w = np.exp(np.asarray(logp, np.float64) - np.max(logp))
    w /= w.sum()
    out = []
    for grid in (mu, log_nu):
        mean = (w * grid).sum()
        out.append((mean, np.sqrt((w * (grid - mean) ** 2).sum())))
    return out


def errors(guide, params, datasets):
    """Largest |mean error| (in posterior sds) and |log sd ratio| of mu and log nu, against
    the exact posterior."""
    mean_err, sd_err = [], []
    for i, y in enumerate(datasets):
        draws = guide.sample_posterior(jax.random.PRNGKey(i), params, sample_shape=(4000,), y=y)
        for x, (mean, sd) in zip((draws["mu"], jnp.log(draws["nu"])),
                                 exact_moments(np.asarray(y)), strict=True):
            x = np.asarray(x)
            mean_err.append(abs(x.mean() - mean) / sd)
            sd_err.append(abs(np.log(x.std() / sd)))
    return max(mean_err), max(sd_err)


def mean_and_sd(pilot):
    """The standardization before robust statistics: means and sds of the prior predictive."""
    stats = ROBUST(pilot)
    y = np.asarray(pilot.data.set, np.float64)[np.asarray(pilot.data.mask)]
    return {**stats, "data": (y.mean(0).astype(np.float32), y.std(0).astype(np.float32),
                              *stats["data"][2:])}


ROBUST = data_module.pilot_statistics


def test_compress_tails_is_the_identity_on_the_bulk_and_monotone_beyond():
    z = jnp.linspace(-1e6, 1e6, 200_001)
    out = compress_tails(z)
    assert np.all(np.diff(np.asarray(out)) > 0)
    bulk = jnp.abs(z) <= 5.0
    np.testing.assert_array_equal(out[bulk], z[bulk])
    assert float(out.max()) < 20.0


@pytest.fixture(scope="module")
def datasets():
    sims = Predictive(student_t_location, num_samples=4)(jax.random.PRNGKey(3))
    return [sims["y"][i] for i in range(4)]


def train(y):
    guide = AutoAmortizedFlow(student_t_location, **small_networks())
    return guide, fit(guide, jax.random.PRNGKey(0), num_steps=1500, progress_bar=False,
                      y=y).params


def test_a_heavy_tailed_likelihood_is_learned(datasets, monkeypatch):
    guide, params = train(datasets[0])
    scale = np.asarray(guide._stats["data"][1])
    assert 2.0 < scale[0] < 20.0, scale  # the prior predictive's sd is about 10^7
    mean_err, sd_err = errors(guide, params, datasets)
    assert mean_err < 0.35 and sd_err < 0.3, (mean_err, sd_err)  # measured .20 and .25

    # the same guide standardized by the prior predictive's mean and sd sees every typical
    # dataset as zeros, and returns about the prior
    monkeypatch.setattr("numpyro_amortized.guide_base.pilot_statistics", mean_and_sd)
    with pytest.warns(GuideCheckWarning):  # fit's exact-density check catches it
        broken, broken_params = train(datasets[0])
    assert np.asarray(broken._stats["data"][1])[0] > 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it also says the data look out of range
        mean_err, _ = errors(broken, broken_params, datasets)
    assert mean_err > 1.0, mean_err  # measured 53 posterior sds
