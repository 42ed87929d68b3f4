"""Hierarchical example models with known answers.

- :func:`eight_schools`: the eight schools model (Rubin 1981; BDA3 section 5.5), centered as
  NumPyro users write it (:func:`eight_schools_noncentered`: the same posterior for NUTS), with an exact posterior sampler :func:`eight_schools_posterior` and
  the classic data :data:`EIGHT_SCHOOLS_Y`, :data:`EIGHT_SCHOOLS_SIGMA`.
- :func:`varying_intercepts`: group intercepts over a flat plate of observations linked by a
  group-index argument (``a[group]``), the usual way NumPyro users write a multilevel model.
- :func:`varying_slopes`: a hierarchical regression, group intercepts and slopes of a covariate.
- :func:`multilevel_binomial`: group log-odds around a shared mean, a count of successes per
  group (Statistical Rethinking's multilevel tadpoles, written with a group plate).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["EIGHT_SCHOOLS_SIGMA", "EIGHT_SCHOOLS_Y", "eight_schools", "eight_schools_noncentered",
           "eight_schools_posterior", "multilevel_binomial", "varying_intercepts",
           "varying_slopes"]

EIGHT_SCHOOLS_Y = jnp.asarray([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = jnp.asarray([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
_MU_SD, _TAU_SCALE = 5.0, 5.0


def eight_schools(sigma, y=None):
    """``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``, ``theta_j ~ N(mu, tau)``,
    ``y_j ~ N(theta_j, sigma_j)`` with known ``sigma``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, _MU_SD))
    tau = numpyro.sample("tau", dist.HalfCauchy(_TAU_SCALE))
    with numpyro.plate("J", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(sigma, y=None):
    """:func:`eight_schools` with ``theta_j = mu + tau * eta_j``, ``eta_j ~ N(0, 1)``: the same
    posterior (``theta`` a deterministic site), the geometry NUTS needs."""
    mu = numpyro.sample("mu", dist.Normal(0.0, _MU_SD))
    tau = numpyro.sample("tau", dist.HalfCauchy(_TAU_SCALE))
    with numpyro.plate("J", sigma.shape[0]):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * eta)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_posterior(sigma, y, num_samples, rng, num_grid=20000, tau_max=400.0):
    """Exact posterior draws of :func:`eight_schools`: ``{"mu", "tau", "theta"}``.

    Given ``tau`` the model is Gaussian: ``y_j ~ N(mu, sigma_j^2 + tau^2)`` marginally, so
    ``mu | tau, y`` is normal and ``tau``'s marginal posterior (the prior times the Gaussian
    marginal likelihood, BDA3 eq. 5.21 with ``mu``'s normal prior) is tabulated on a fine grid
    and sampled by inversion; then ``theta_j | mu, tau, y`` is normal.
    """
    sigma, y = np.asarray(sigma, np.float64), np.asarray(y, np.float64)
    grid = np.linspace(tau_max / num_grid, tau_max, num_grid)
    var = sigma[None] ** 2 + grid[:, None] ** 2  # (grid, J)
    prec_mu = 1.0 / _MU_SD**2 + (1.0 / var).sum(1)
    mu_hat = (y / var).sum(1) / prec_mu
    log_post = (-np.log1p((grid / _TAU_SCALE) ** 2) - 0.5 * np.log(prec_mu)
                - 0.5 * np.log(var).sum(1)
                - 0.5 * (((y - mu_hat[:, None]) ** 2 / var).sum(1) + mu_hat**2 / _MU_SD**2))
    w = np.exp(log_post - log_post.max())
    i = rng.choice(num_grid, size=num_samples, p=w / w.sum())
    tau = grid[i] + (grid[1] - grid[0]) * (rng.random(num_samples) - 0.5)
    mu = mu_hat[i] + rng.normal(size=num_samples) / np.sqrt(prec_mu[i])
    prec = 1.0 / sigma**2 + 1.0 / tau[:, None] ** 2
    mean = (y / sigma**2 + mu[:, None] / tau[:, None] ** 2) / prec
    theta = mean + rng.normal(size=mean.shape) / np.sqrt(prec)
    return {"mu": mu, "tau": tau, "theta": theta}


def varying_intercepts(group, num_groups, y=None):
    """``a_j ~ N(mu, tau)`` for ``num_groups`` groups, ``y_i ~ N(a[group_i], sigma)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(a[group], sigma), obs=y)


def varying_slopes(group, x, num_groups, y=None):
    """``a_j ~ N(mu_a, tau_a)``, ``b_j ~ N(mu_b, tau_b)`` for ``num_groups`` groups,
    ``y_i ~ N(a[group_i] + b[group_i] x_i, sigma)``."""
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 2.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 2.0))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu_a, tau_a))
        b = numpyro.sample("b", dist.Normal(mu_b, tau_b))
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(a[group] + b[group] * x, sigma), obs=y)


def multilevel_binomial(trials, successes=None):
    """``a_bar ~ N(0, 1.5)``, ``sigma ~ Exponential(1)``, ``a_j ~ N(a_bar, sigma)``,
    ``successes_j ~ Binomial(trials_j, logit^-1(a_j))`` for each group ``j`` of ``trials``."""
    a_bar = numpyro.sample("a_bar", dist.Normal(0.0, 1.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    with numpyro.plate("groups", trials.shape[0]):
        a = numpyro.sample("a", dist.Normal(a_bar, sigma))
        numpyro.sample("successes", dist.Binomial(trials, logits=a), obs=successes)
