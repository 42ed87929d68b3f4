"""The sbibm benchmark tasks (Lueckmann et al. 2021) as NumPyro models, with references.

Each task is a :class:`Task`: the model, an example of its data (which fixes the shapes), the
order of the latent sites in the parameter vector, and an exact reference sampler where one
exists (``gaussian_linear``, ``gaussian_linear_uniform``, ``gaussian_mixture``, ``two_moons``).
The others (``slcp``, ``bernoulli_glm`` and ``bernoulli_glm_raw``, ``sir``, ``lotka_volterra``)
have no exact sampler here; ``benchmarks/sbibm.py`` scores them against sbibm's stored reference
posteriors, or against long, checked NUTS runs on observations of its own (``slcp``'s four
sign-symmetric modes filled by flipping the signs of theta_3 and theta_4 at random).

The definitions are sbibm's (version 1.1.0): the same priors, simulators, observation times,
noise models and, for ``bernoulli_glm``, the same stimulus. One detail differs: the ODE tasks are
solved by diffrax's Tsit5 at relative tolerance 1e-6, where sbibm calls Julia's
DifferentialEquations at its default tolerance (1e-3). A failed solve gives NaN data, as in sbibm.

**Example**::

    task = TASKS["slcp"]
    guide = AutoAmortizedFlow(task.model)
    fit(guide, key, num_simulations=10_000, **task.data)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_amortized.examples.epidemics import sir
from numpyro_amortized.examples.models import (
    gaussian_linear,
    gaussian_linear_posterior,
    two_moons,
    two_moons_reference_posterior,
)

__all__ = [
    "TASKS",
    "SpikeStatistics",
    "Task",
    "bernoulli_glm",
    "bernoulli_glm_raw",
    "gaussian_linear_uniform",
    "gaussian_mixture",
    "lotka_volterra",
    "parameter_vector",
    "slcp",
    "slcp_symmetries",
]


class Task(NamedTuple):
    """An sbibm task: ``model(**data)``; ``latents`` in parameter-vector order.

    ``reference(x, num_samples, rng)`` draws exactly from the posterior (``None``: use NUTS,
    with ``nuts_symmetries`` applied to its draws when the posterior has symmetric modes).
    ``guide_kwargs`` is what a user declares about the data (``sir``'s plate is a time axis).
    """

    model: Callable
    data: dict
    latents: tuple
    reference: Callable | None = None
    nuts_symmetries: Callable | None = None
    guide_kwargs: dict | None = None


def gaussian_linear_uniform(x=None, dim=10, noise_var=0.1):
    """theta ~ U(-1, 1)^10, x ~ N(theta, 0.1 I)."""
    theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(dim), jnp.ones(dim)).to_event(1))
    numpyro.sample("x", dist.Normal(theta, jnp.sqrt(noise_var)).to_event(1), obs=x)


def gaussian_mixture(x=None):
    """theta ~ U(-10, 10)^2, x ~ 0.5 N(theta, I) + 0.5 N(theta, 0.01 I)."""
    theta = numpyro.sample("theta", dist.Uniform(-10 * jnp.ones(2), 10 * jnp.ones(2)).to_event(1))
    mixing = dist.Categorical(probs=jnp.array([0.5, 0.5]))
    scales = jnp.array([1.0, 0.1])
    components = dist.Normal(theta[..., None, :], scales[:, None]).to_event(1)
    numpyro.sample("x", dist.MixtureSameFamily(mixing, components), obs=x)


def slcp(x=None, num_draws=4):
    """theta ~ U(-3, 3)^5; ``num_draws`` independent draws of a 2-d Gaussian with mean
    (theta_1, theta_2), sds theta_3^2 and theta_4^2 and correlation tanh(theta_5). ``x`` has
    shape (4, 2) (sbibm's 8 numbers); the draws are a plate, since they are exchangeable."""
    theta = numpyro.sample("theta", dist.Uniform(-3 * jnp.ones(5), 3 * jnp.ones(5)).to_event(1))
    s1, s2, rho = theta[..., 2] ** 2, theta[..., 3] ** 2, jnp.tanh(theta[..., 4])
    cov = jnp.stack([jnp.stack([s1**2, rho * s1 * s2], -1),
                     jnp.stack([rho * s1 * s2, s2**2], -1)], -2)
    # a jitter keeps the covariance positive definite where theta_3 or theta_4 is ~ 0
    cov = cov + 1e-6 * jnp.eye(2)
    with numpyro.plate("draws", num_draws):
        numpyro.sample("x", dist.MultivariateNormal(theta[..., :2], cov), obs=x)


def slcp_symmetries(draws, rng):
    """The slcp likelihood depends on theta_3 and theta_4 through their squares: flip their
    signs at random to fill the four symmetric modes from draws of one."""
    draws = np.array(draws, copy=True)
    draws[:, 2:4] *= rng.choice([-1.0, 1.0], size=(len(draws), 2))
    return draws


def _glm_design(num_bins=100, num_lags=9, seed=42):
    """sbibm's design, (num_bins, num_lags): column j is the white-noise stimulus (numpy's
    ``RandomState(42)``, float32) delayed by j bins, zeros before it starts."""
    stim = np.random.RandomState(seed).randn(num_bins).astype(np.float32)
    design = np.zeros((num_bins, num_lags), np.float32)
    for j in range(num_lags):
        design[j:, j] = stim[:num_bins - j]
    return design


def _glm_filter_precision(num_lags=9):
    d = np.eye(num_lags) - np.eye(num_lags, k=-1)
    f = d @ d + np.diag(np.arange(num_lags) / num_lags) ** 0.5
    return f.T @ f


GLM_DESIGN = _glm_design()
GLM_PRECISION = _glm_filter_precision()


def _glm_latents():
    """The GLM's bias ~ N(0, 2) and 9-tap filter (sbibm's smoothing Gaussian prior), and the
    coefficient vector (bias, filter) they make."""
    bias = numpyro.sample("bias", dist.Normal(0.0, jnp.sqrt(2.0)))
    filt = numpyro.sample("filter", dist.MultivariateNormal(
        jnp.zeros(9), precision_matrix=jnp.asarray(GLM_PRECISION, jnp.float32)))
    return jnp.concatenate([bias[..., None], filt], axis=-1)


class SpikeStatistics(dist.Distribution):
    """The sufficient statistics ``X^T y`` of a Bernoulli GLM's spike train ``y``, with
    ``X = [1, design]`` (so the spike count and the nine spike-triggered stimulus sums).

    ``sample`` draws a spike train ``y ~ Bernoulli(sigmoid(X beta))`` and returns its
    statistics. ``log_prob(t)`` is ``t . beta - sum_t log(1 + exp((X beta)_t))``, the
    log-likelihood of any spike train with statistics ``t``: the statistics' own log
    probability up to the log number of such trains, which does not depend on ``beta``, so
    posteriors (NUTS, or an amortized guide) are exact.

    :param coef: the coefficients ``beta`` (intercept first), shape ``batch + (p,)``.
    :param design: the design matrix without the intercept column, ``(num_bins, p - 1)``.
    """

    arg_constraints: ClassVar[dict] = {"coef": dist.constraints.real_vector}
    support = dist.constraints.real_vector

    def __init__(self, coef, design, *, validate_args=None):
        self.coef = coef
        self.design = jnp.concatenate([jnp.ones((design.shape[0], 1), design.dtype), design], 1)
        super().__init__(batch_shape=jnp.shape(coef)[:-1], event_shape=(self.design.shape[1],),
                         validate_args=validate_args)

    @property
    def logits(self):
        """The spike train's Bernoulli logits ``X beta``, shape ``batch + (num_bins,)``."""
        return jnp.einsum("tl,...l->...t", self.design, self.coef)

    def sample(self, key, sample_shape=()):
        spikes = dist.Bernoulli(logits=self.logits).sample(key, sample_shape)
        return spikes @ self.design

    def log_prob(self, value):
        return (jnp.sum(value * self.coef, axis=-1)
                - jnp.sum(jnp.logaddexp(0.0, self.logits), axis=-1))


def bernoulli_glm(x=None):
    """sbibm's bernoulli_glm: a Bernoulli GLM of a neuron, bias ~ N(0, 2) and a 9-tap temporal
    filter with sbibm's smoothing Gaussian prior, spiking over 100 time bins of sbibm's
    white-noise stimulus; ``x`` is the 10 sufficient statistics sbibm observes (the spike
    count and the spike-triggered stimulus sums, :class:`SpikeStatistics`)."""
    coef = _glm_latents()
    numpyro.sample("x", SpikeStatistics(coef, jnp.asarray(GLM_DESIGN, jnp.float32)), obs=x)


def bernoulli_glm_raw(x=None):
    """sbibm's bernoulli_glm_raw: :func:`bernoulli_glm` observing the spike train itself (100
    bins), which has the same posterior. The spikes are one vector, not a plate: the stimulus
    differs between bins, so they are not exchangeable and a set network must not pool them."""
    logits = SpikeStatistics(_glm_latents(), jnp.asarray(GLM_DESIGN, jnp.float32)).logits
    numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


LV_TIMES = np.round(np.arange(10) * 2.1, 1)
"""lotka_volterra's observation times, sbibm's: every 21st point of its 0.1-day grid."""


def lotka_volterra(x=None):
    """sbibm's predator-prey task: dX/dt = aX - bXY, dY/dt = -cY + dXY from (30, 1), with
    a, c ~ LogNormal(-0.125, 0.5), b, d ~ LogNormal(-3, 0.5); x is both species' populations,
    clamped to [1e-10, 1e4], with log-normal noise (sd 0.1) at days 0, 2.1, ..., 18.9
    (:data:`LV_TIMES`; the prey's 10 values, then the predator's)."""
    import diffrax

    alpha = numpyro.sample("alpha", dist.LogNormal(-0.125, 0.5))
    beta = numpyro.sample("beta", dist.LogNormal(-3.0, 0.5))
    gamma = numpyro.sample("gamma", dist.LogNormal(-0.125, 0.5))
    delta = numpyro.sample("delta", dist.LogNormal(-3.0, 0.5))

    def vector_field(t, y, args):
        prey, predator = jnp.exp(y[0]), jnp.exp(y[1])  # log populations stay finite
        return jnp.stack([alpha - beta * predator, -gamma + delta * prey])

    times = jnp.asarray(LV_TIMES, jnp.float32)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), 0.0, times[-1], dt0=0.05,
        y0=jnp.log(jnp.array([30.0, 1.0])), saveat=diffrax.SaveAt(ts=times),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=4096,
        throw=False)
    ok = sol.result == diffrax.RESULTS.successful
    log_pop = jnp.clip(sol.ys.T.reshape(-1), jnp.log(1e-10), jnp.log(1e4))  # prey, predator
    numpyro.sample("x", dist.LogNormal(jnp.where(ok, log_pop, jnp.nan), 0.1).to_event(1), obs=x)


def _gaussian_linear_reference(x, num_samples, rng):
    mean, sd = map(np.asarray, gaussian_linear_posterior(x))
    return mean + sd * rng.normal(size=(num_samples, len(mean)))


def _gaussian_linear_uniform_reference(x, num_samples, rng, noise_var=0.1):
    from scipy.stats import truncnorm

    x = np.asarray(x, np.float64)
    sd = np.sqrt(noise_var)
    return truncnorm.rvs((-1 - x) / sd, (1 - x) / sd, loc=x, scale=sd,
                         size=(num_samples, len(x)), random_state=rng)


def _gaussian_mixture_reference(x, num_samples, rng):
    x = np.asarray(x, np.float64)
    out = np.empty((0, 2))
    while len(out) < num_samples:  # the flat prior truncates the mixture to the box
        scale = rng.choice([1.0, 0.1], size=(num_samples, 1))
        theta = x + scale * rng.normal(size=(num_samples, 2))
        out = np.concatenate([out, theta[np.all(np.abs(theta) <= 10, axis=1)]])
    return out[:num_samples]


TASKS = {
    "gaussian_linear": Task(gaussian_linear, {"x": jnp.zeros(10)}, ("theta",),
                            _gaussian_linear_reference),
    "gaussian_linear_uniform": Task(gaussian_linear_uniform, {"x": jnp.zeros(10)}, ("theta",),
                                    _gaussian_linear_uniform_reference),
    "gaussian_mixture": Task(gaussian_mixture, {"x": jnp.zeros(2)}, ("theta",),
                             _gaussian_mixture_reference),
    "two_moons": Task(two_moons, {"x": jnp.zeros(2)}, ("theta",),
                      two_moons_reference_posterior),
    "slcp": Task(slcp, {"x": jnp.zeros((4, 2))}, ("theta",), None, slcp_symmetries),
    "bernoulli_glm": Task(bernoulli_glm, {"x": jnp.zeros(10)}, ("bias", "filter")),
    "bernoulli_glm_raw": Task(bernoulli_glm_raw, {"x": jnp.zeros(100)}, ("bias", "filter")),
    "sir": Task(sir, {"x": jnp.zeros(10, jnp.int32)}, ("beta", "gamma"),
                guide_kwargs={"time_series": True}),
    "lotka_volterra": Task(lotka_volterra, {"x": jnp.ones(20)},
                           ("alpha", "beta", "gamma", "delta")),
}
"""The eight tasks, by sbibm name, and ``bernoulli_glm_raw`` (sbibm's variant of
``bernoulli_glm`` that observes the spike train; no published NPE figures)."""


def parameter_vector(draws: dict, task: Task):
    """Stack a dict of draws into sbibm's parameter vectors, shape (..., dim)."""
    parts = []
    for name in task.latents:
        v = np.asarray(draws[name])
        parts.append(v if v.ndim >= 2 and name in ("theta", "filter") else v[..., None])
    return np.concatenate(parts, axis=-1)
