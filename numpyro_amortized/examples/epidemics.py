"""An SIR epidemic, the ODE solved with diffrax inside the model.

dS/dt = -beta S I / N, dI/dt = beta S I / N - gamma I, with N = 10^6 people, one infected
person at day 0, and the sbibm task's priors and observation model: beta ~ LogNormal(log 0.4,
0.5), gamma ~ LogNormal(log 1/8, 0.2), and on days 0, 17, 34, ..., 153 (sbibm's: every 17th
day of its daily grid) the number of infected people in a sample of 1000, Binomial(1000,
I(t) / N). The observation days are a ``"time"`` plate, so
``AutoAmortizedFlow(sir, time_series=True)`` reads them with the time-series network.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = ["sir", "sir_log_infected"]

POPULATION = 1e6
DAYS = tuple(range(0, 160, 17))
"""sbibm's observation days."""


def sir_log_infected(beta, gamma, days, *, rtol=1e-6, max_steps=4096):
    """log(I(t) / N) at ``days`` (increasing, >= 0) for scalar rates.

    The ODE is solved for (S / N, log I / N), d log I / dt = beta S / N - gamma, so the result
    stays finite and differentiable even where the epidemic dies out (I / N far below 1e-12);
    Tsit5 with adaptive steps (relative tolerance ``rtol``), vmappable over ``beta`` and
    ``gamma``. NaN where the solver fails (``max_steps`` exhausted).
    """
    import diffrax

    def vector_field(t, y, args):
        s, log_i = y[0], y[1]
        return jnp.stack([-beta * s * jnp.exp(log_i), beta * s - gamma])

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, days[-1], dt0=0.5,
        y0=jnp.array([1.0 - 1.0 / POPULATION, -jnp.log(POPULATION)]),
        saveat=diffrax.SaveAt(ts=days),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=1e-8),
        max_steps=max_steps, throw=False,
    )
    # rates far in the tails (NUTS's first steps can go there) can exhaust max_steps: give NaN,
    # which NUTS treats as a divergence and fit() drops from a batch (counted)
    ok = solution.result == diffrax.RESULTS.successful
    return jnp.where(ok, solution.ys[:, 1], jnp.nan)


def sir(x=None, days=DAYS, total_count=1000):
    """beta, gamma ~ log-normal; x_t ~ Binomial(total_count, I(t) / N) on ``days``.

    **Example**::

        guide = AutoAmortizedFlow(sir, time_series=True)
        fit(guide, key, x=jnp.zeros(10))
    """
    beta = numpyro.sample("beta", dist.LogNormal(jnp.log(0.4), 0.5))
    gamma = numpyro.sample("gamma", dist.LogNormal(jnp.log(1 / 8), 0.2))
    log_i = jnp.minimum(sir_log_infected(beta, gamma, jnp.asarray(days, jnp.float32)), -1e-6)
    logits = log_i - jnp.log1p(-jnp.exp(log_i))
    with numpyro.plate("time", len(days)):
        numpyro.sample("x", dist.Binomial(total_count, logits=logits), obs=x)
