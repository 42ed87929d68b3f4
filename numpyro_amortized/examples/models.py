"""Example models with known answers.

- :func:`gaussian_linear`: sbibm's gaussian_linear task, with the exact posterior
  :func:`gaussian_linear_posterior`.
- :func:`two_moons`: sbibm's two_moons task (a bimodal, crescent-shaped posterior), with an
  exact reference sampler :func:`two_moons_reference_posterior`.
- :func:`linear_regression`: the linear regression of the BayesFlow tutorial, with a covariate
  written as an observed sample site and a variable number of observations, with an exact
  posterior sampler :func:`linear_regression_posterior`.
- :func:`peak_model`: a Gaussian peak on a linear background, measured at random positions with
  known heteroscedastic errors (the MCMC/HMC/SBI comparison tutorial); NUTS is its reference,
  :func:`peak_datasets` draws datasets from its prior predictive.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from numpyro_amortized.simulation import simulate

__all__ = [
    "gaussian_linear",
    "gaussian_linear_posterior",
    "linear_regression",
    "linear_regression_posterior",
    "peak_datasets",
    "peak_model",
    "two_moons",
    "two_moons_reference_posterior",
]


def gaussian_linear(x=None, dim=10, prior_var=0.1, noise_var=0.1):
    """theta ~ N(0, prior_var I), x ~ N(theta, noise_var I) (sbibm gaussian_linear).

    **Example**::

        guide = AutoAmortizedFlow(gaussian_linear)
        fit(guide, key, x=jnp.zeros(10))
    """
    theta = numpyro.sample(
        "theta", dist.Normal(jnp.zeros(dim), jnp.sqrt(prior_var)).to_event(1)
    )
    numpyro.sample("x", dist.Normal(theta, jnp.sqrt(noise_var)).to_event(1), obs=x)


def gaussian_linear_posterior(x, prior_var=0.1, noise_var=0.1):
    """The exact posterior of :func:`gaussian_linear`: ``(mean, sd)`` arrays.

    With the sbibm settings it is N(x / 2, 0.05 I).
    """
    x = jnp.asarray(x)
    var = 1.0 / (1.0 / prior_var + 1.0 / noise_var)
    return var * x / noise_var, jnp.full(x.shape, jnp.sqrt(var))


def linear_regression(x, y=None):
    """beta ~ N([2, 0], [3, 1]), sigma ~ Gamma(1, 1), x_i ~ N(0, 1), y_i ~ N(b0 + b1 x_i, sigma).

    ``x`` is a covariate declared as an observed sample site, so it is simulated along with
    ``y`` and seen by the summary network; ``len(x)`` is the number of observations.

    **Example**::

        guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
        fit(guide, key, x=jnp.zeros(15), y=jnp.zeros(15))
    """
    beta = numpyro.sample("beta", dist.Normal(jnp.array([2.0, 0.0]),
                                              jnp.array([3.0, 1.0])).to_event(1))
    sigma = numpyro.sample("sigma", dist.Gamma(1.0, 1.0))
    with numpyro.plate("N", jnp.shape(x)[0]):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
        numpyro.sample("y", dist.Normal(beta[0] + beta[1] * x, sigma), obs=y)


def linear_regression_posterior(x, y, num_samples, rng, num_grid=4000):
    """Exact posterior draws ``(num_samples, 3)`` of (beta0, beta1, sigma) for
    :func:`linear_regression`.

    Given sigma the model is conjugate, so beta | sigma, y is Gaussian; sigma's marginal
    posterior (Gamma prior times the Gaussian marginal likelihood of y) is tabulated on a fine
    grid and sampled by inversion.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    design = np.column_stack([np.ones_like(x), x])
    m0, s0 = np.array([2.0, 0.0]), np.diag([9.0, 1.0])
    grid = np.linspace(2e-3, 10.0, num_grid)
    cov = grid[:, None, None] ** 2 * np.eye(len(x)) + design @ s0 @ design.T
    resid = y - design @ m0
    _, logdet = np.linalg.slogdet(cov)
    quad = np.einsum("i,gij,j->g", resid, np.linalg.inv(cov), resid)
    log_post = -0.5 * (logdet + quad) - grid  # Gamma(1, 1) prior
    w = np.exp(log_post - log_post.max())
    sigma = rng.choice(grid, size=num_samples, p=w / w.sum())
    sigma = sigma + (grid[1] - grid[0]) * (rng.random(num_samples) - 0.5)
    precision = np.linalg.inv(s0) + design.T @ design / sigma[:, None, None] ** 2
    post_cov = np.linalg.inv(precision)
    post_mean = np.einsum("nij,nj->ni", post_cov,
                          np.linalg.inv(s0) @ m0 + (design.T @ y) / sigma[:, None] ** 2)
    chol = np.linalg.cholesky(post_cov)
    beta = post_mean + np.einsum("nij,nj->ni", chol, rng.normal(size=(num_samples, 2)))
    return np.column_stack([beta, sigma])


class TwoMoonsNoise(dist.Distribution):
    """x = p + (-|t1 + t2| / sqrt 2, (t2 - t1) / sqrt 2), p = (r cos a + 0.25, r sin a),
    a ~ U(-pi/2, pi/2), r ~ N(0.1, 0.01): the two_moons simulator with its exact density."""

    support = constraints.real_vector

    def __init__(self, theta):
        self.theta = theta
        super().__init__(batch_shape=jnp.shape(theta)[:-1], event_shape=(2,))

    def _shift(self):
        t1, t2 = self.theta[..., 0], self.theta[..., 1]
        return jnp.stack([-jnp.abs(t1 + t2) / math.sqrt(2), (t2 - t1) / math.sqrt(2)], -1)

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape
        k1, k2 = jax.random.split(key)
        a = jax.random.uniform(k1, shape, minval=-math.pi / 2, maxval=math.pi / 2)
        r = 0.1 + 0.01 * jax.random.normal(k2, shape)
        p = jnp.stack([r * jnp.cos(a) + 0.25, r * jnp.sin(a)], -1)
        return p + self._shift()

    def log_prob(self, value):
        p = value - self._shift() - jnp.array([0.25, 0.0])
        r = jnp.linalg.norm(p, axis=-1)
        a = jnp.arctan2(p[..., 1], p[..., 0])
        inside = jnp.abs(a) <= math.pi / 2
        lp = dist.Normal(0.1, 0.01).log_prob(r) - math.log(math.pi) - jnp.log(r)
        return jnp.where(inside, lp, -jnp.inf)


def two_moons(x=None):
    """sbibm two_moons: theta ~ U(-1, 1)^2 and the crescent-shaped simulator above.

    **Example**::

        guide = AutoAmortizedFlow(two_moons)
        fit(guide, key, x=jnp.zeros(2), num_simulations=10_000)
    """
    theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1))
    numpyro.sample("x", TwoMoonsNoise(theta), obs=x)


def two_moons_reference_posterior(x, num_samples, rng):
    """Exact draws from the two_moons posterior given ``x``.

    For each (a, r) drawn from their prior the simulator is inverted to the two values of
    theta it can come from (the map has unit Jacobian); one is picked at random and kept if it
    lies in the prior box. This is exact rejection sampling.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty((0, 2))
    while len(out) < num_samples:
        n = 4 * num_samples
        a = rng.uniform(-np.pi / 2, np.pi / 2, n)
        r = rng.normal(0.1, 0.01, n)
        q = x - np.column_stack([r * np.cos(a) + 0.25, r * np.sin(a)])
        s = -q[:, 0] * np.sqrt(2)
        d = q[:, 1] * np.sqrt(2)
        s = s * rng.choice([-1.0, 1.0], n)
        theta = np.column_stack([(s - d) / 2, (s + d) / 2])
        ok = (q[:, 0] <= 0) & np.all(np.abs(theta) <= 1, axis=1)
        out = np.concatenate([out, theta[ok]])
    return out[:num_samples]


def peak_model(x, y_err, y=None):
    """y = l exp(-(m - x)^2 / (2 s^2)) + a + b x + noise, noise ~ N(0, y_err^2).

    l, m, a, b ~ U(-2, 2), s ~ U(0, 2). The positions ``x ~ U(0, 1)`` and the known errors
    ``y_err ~ U(0.05, 0.25)`` are observed sample sites: they change from dataset to dataset and
    the summary network sees them with ``y``. ``len(x)`` is the number of points (40 in the
    tutorial).

    **Example**::

        guide = AutoAmortizedFlow(peak_model)
        fit(guide, key, x=jnp.zeros(40), y_err=jnp.ones(40), y=jnp.zeros(40))
    """
    u = dist.Uniform(-2.0, 2.0)
    l = numpyro.sample("l", u)
    m = numpyro.sample("m", u)
    s = numpyro.sample("s", dist.Uniform(0.0, 2.0))
    a = numpyro.sample("a", u)
    b = numpyro.sample("b", u)
    with numpyro.plate("N", jnp.shape(x)[0]):
        x = numpyro.sample("x", dist.Uniform(0.0, 1.0), obs=x)
        y_err = numpyro.sample("y_err", dist.Uniform(0.05, 0.25), obs=y_err)
        mu = l * jnp.exp(-((m - x) ** 2) / (2 * s**2)) + a + b * x
        numpyro.sample("y", dist.Normal(mu, y_err), obs=y)


def peak_datasets(rng_key, num_datasets, num_points=40):
    """Datasets from the prior predictive of :func:`peak_model`.

    :return: ``(datasets, truths)``: a list of ``dict(x=, y_err=, y=)`` keyword arguments and
        a list of the true latents of each.
    """
    z = jnp.zeros(num_points)
    sims = simulate(peak_model, rng_key, num_datasets, x=z, y_err=z + 0.1, y=z)
    data = [{k: sims[k][i] for k in ("x", "y_err", "y")} for i in range(num_datasets)]
    truths = [{k: sims[k][i] for k in ("l", "m", "s", "a", "b")} for i in range(num_datasets)]
    return data, truths
