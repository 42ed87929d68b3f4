"""Hierarchical example models with known answers.

- :func:`eight_schools`: the eight schools model (Rubin 1981; BDA3 section 5.5), centered as
  NumPyro users write it, with an exact posterior sampler :func:`eight_schools_posterior` and
  the classic data :data:`EIGHT_SCHOOLS_Y`, :data:`EIGHT_SCHOOLS_SIGMA`.
- :func:`varying_intercepts`: group intercepts over a flat plate of observations linked by a
  group-index argument (``a[group]``), the usual way NumPyro users write a multilevel model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["EIGHT_SCHOOLS_SIGMA", "EIGHT_SCHOOLS_Y", "eight_schools", "eight_schools_posterior",
           "varying_intercepts"]

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
