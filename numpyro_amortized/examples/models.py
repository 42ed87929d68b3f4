"""Example models with known answers.

- :func:`gaussian_linear`: sbibm's gaussian_linear task, with the exact posterior
  :func:`gaussian_linear_posterior`.
- :func:`linear_regression`: the linear regression of the BayesFlow tutorial, with a covariate
  written as an observed sample site and a variable number of observations.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = ["gaussian_linear", "gaussian_linear_posterior", "linear_regression"]


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
