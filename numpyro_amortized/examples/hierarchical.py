"""Hierarchical example models with known answers.

- :func:`eight_schools`: the eight schools model (Rubin 1981; BDA3 section 5.5), centered as
  NumPyro users write it (:func:`eight_schools_noncentered`: the same posterior for NUTS), with an exact posterior sampler :func:`eight_schools_posterior` and
  the classic data :data:`EIGHT_SCHOOLS_Y`, :data:`EIGHT_SCHOOLS_SIGMA`.
- :func:`varying_intercepts`: group intercepts over a flat plate of observations linked by a
  group-index argument (``a[group]``), the usual way NumPyro users write a multilevel model.
- :func:`varying_slopes`: a hierarchical regression, group intercepts and slopes of a covariate,
  with its group effects integrated out (:func:`varying_slopes_collapsed`, five latents, for a
  reliable NUTS reference) and drawn exactly given the globals (:func:`varying_slopes_locals`).
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
           "varying_slopes", "varying_slopes_collapsed", "varying_slopes_locals"]

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


def _slopes_stats(mu_a, mu_b, tau_a, tau_b, sigma, group, x, y, num_groups, xp=jnp):
    """Per group: the precision ``P = D^-1 + U'U / sigma^2`` of ``(a_j, b_j)`` given the globals
    and the data (``U = [1, x]`` of the group's rows, ``D = diag(tau_a^2, tau_b^2)``), ``U'r``
    and ``r'r`` with ``r = y - mu_a - mu_b x``, and the group's size. The globals may carry
    leading (draw) axes, with a trailing axis of 1."""
    onehot = (xp.asarray(group)[:, None] == xp.arange(num_groups)).astype(float)
    r = y - mu_a - mu_b * x
    n, sx, sxx = onehot.sum(0), x @ onehot, (x * x) @ onehot
    s2 = sigma**2
    precision = (1 / tau_a**2 + n / s2, sx / s2, 1 / tau_b**2 + sxx / s2)
    return precision, (r @ onehot, (x * r) @ onehot), (r * r) @ onehot, n


def varying_slopes_collapsed(group, x, num_groups, y):
    """:func:`varying_slopes` with ``a`` and ``b`` integrated out: the five globals only, and
    each group's rows jointly Gaussian, ``y_j ~ N(mu_a + mu_b x_j, sigma^2 I + U D U')``
    (``U = [1, x_j]``, ``D = diag(tau_a^2, tau_b^2)``), its density computed through the 2 x 2
    matrices of the Woodbury identity. The same posterior of the globals as
    :func:`varying_slopes`, without the funnel: NUTS on it is a reliable reference."""
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 2.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 2.0))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    (p11, p12, p22), (h1, h2), rr, n = _slopes_stats(mu_a, mu_b, tau_a, tau_b, sigma, group,
                                                      x, y, num_groups)
    s2 = sigma**2
    det_p = p11 * p22 - p12**2
    quad = rr / s2 - (p22 * h1**2 - 2 * p12 * h1 * h2 + p11 * h2**2) / (s2**2 * det_p)
    # log det(sigma^2 I + U D U') = n log sigma^2 + log det D + log det P
    logdet = n * jnp.log(s2) + jnp.log(tau_a**2 * tau_b**2 * det_p)
    numpyro.factor("y", -0.5 * jnp.sum(quad + logdet + n * jnp.log(2 * jnp.pi)))


def varying_slopes_locals(draws, group, x, num_groups, y, rng):
    """Exact draws of ``a`` and ``b`` (each ``(draws, num_groups)``) given draws of the globals
    (``draws``: ``mu_a``, ``mu_b``, ``tau_a``, ``tau_b``, ``sigma``, e.g. NUTS on
    :func:`varying_slopes_collapsed`): given the globals, ``(a_j, b_j)`` is Gaussian with
    precision ``P`` and mean ``(mu_a, mu_b) + P^-1 U'r / sigma^2``."""
    g = {k: np.asarray(draws[k], np.float64)[:, None] for k in
         ("mu_a", "mu_b", "tau_a", "tau_b", "sigma")}
    (p11, p12, p22), (h1, h2), _, _ = _slopes_stats(
        g["mu_a"], g["mu_b"], g["tau_a"], g["tau_b"], g["sigma"], group,
        np.asarray(x, np.float64), np.asarray(y, np.float64), num_groups, np)
    det, s2 = p11 * p22 - p12**2, g["sigma"] ** 2
    mean_a = g["mu_a"] + (p22 * h1 - p12 * h2) / (det * s2)
    mean_b = g["mu_b"] + (p11 * h2 - p12 * h1) / (det * s2)
    # the covariance P^-1 = [[p22, -p12], [-p12, p11]] / det, through its Cholesky factor
    l11 = np.sqrt(p22 / det)
    l21 = -p12 / det / l11
    l22 = np.sqrt(p11 / det - l21**2)
    z1, z2 = rng.normal(size=mean_a.shape), rng.normal(size=mean_a.shape)
    return {"a": mean_a + l11 * z1, "b": mean_b + l21 * z1 + l22 * z2}
