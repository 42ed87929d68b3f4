"""A conditional density defined by a velocity field (flow matching), with an exact log density.

``q(u | c)`` is the law at time 1 of ``dz/dt = v(z, t, c)`` started from a standard normal at
time 0 (in standardized units ``z = (u - loc) / scale``). The velocity network is trained by
conditional flow matching (Lipman et al. 2023; for posteriors, Wildberger et al. 2023): for a
simulated ``(u, x)``, a time ``t ~ U(0, 1)`` and base noise ``z0``, it regresses on the
straight path's velocity, ``|| v(z_t, t, c) - (z1 - (1 - s) z0) ||^2`` with
``z_t = (1 - (1 - s) t) z0 + t z1``. No ODE is solved during training.

Draws integrate the ODE from 0 to 1 with a fixed-step solver (diffrax, ``num_steps`` steps of
Heun's method by default). The log density integrates the divergence of the velocity along the
same path (the instantaneous change of variables, Chen et al. 2018):
``log q(z1) = log N(z0) - int_0^1 div v(z_t, t, c) dt``, with the divergence computed exactly
(one forward-mode derivative per latent dimension), so ``log_prob``, PSIS k-hat and the
package's exact-density checks work as with a coupling flow. Its error is the solver's:
fewer steps are faster and less exact (see ``benchmarks/``).
"""

from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.flows.flow import flatten_batch, standard_normal_log_prob
from numpyro_amortized.networks.layers import MLP, Buffer, buffer_value

__all__ = ["FlowMatching", "flow_matching"]

_FREQUENCIES = 4  # sin/cos features of t at frequencies 1..4
_SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint,
            "ralston": diffrax.Ralston}


def _time_features(t):
    k = jnp.arange(1, _FREQUENCIES + 1, dtype=t.dtype)
    angle = 2 * math.pi * t[..., None] * k
    return jnp.concatenate([t[..., None], jnp.sin(angle), jnp.cos(angle)], axis=-1)


class FlowMatching(nnx.Module):
    """``q(u | condition)`` as the time-1 law of a learned velocity field (see the module doc).

    :param dim: dimension of ``u``; :param context_dim: length of the condition vector.
    :param hidden: widths of the velocity network (an :class:`~numpyro_amortized.networks.MLP`
        of ``[z, time features, condition]``).
    :param num_steps: solver steps from time 0 to 1 for draws and log densities.
    :param solver: the fixed-step solver: ``"heun"`` (second order, the default),
        ``"midpoint"``, ``"euler"`` or ``"ralston"`` (diffrax's).
    :param sigma_min: the noise left at time 1 of the straight paths.
    :param time_exponent: training times are drawn as ``U^(1 / (1 + time_exponent))``, with
        density ``∝ t^time_exponent``: above 0, more of them near the data end (``t = 1``),
        where a narrow posterior needs the velocity most precise (0: uniform).
    :param loc: prior mean of ``u``; :param scale: its sd (standardized units inside).

    **Example**::

        density = FlowMatching(2, 3, rngs=nnx.Rngs(0))
        u, log_q = density.sample_and_log_prob(jax.random.PRNGKey(0), jnp.zeros((5, 3)), (100,))
    """

    def __init__(self, dim, context_dim, *, hidden=(128, 128, 128, 128), num_steps=32,
                 solver="heun", sigma_min=1e-3, time_exponent=0.0, loc=None, scale=None,
                 rngs: nnx.Rngs):
        self.net = MLP(dim + 1 + 2 * _FREQUENCIES + context_dim, hidden, dim, rngs=rngs)
        self.loc = Buffer(jnp.zeros(dim) if loc is None else jnp.asarray(loc))
        self.scale = Buffer(jnp.ones(dim) if scale is None else jnp.asarray(scale))
        self.dim = dim
        self.num_steps = int(num_steps)
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {solver!r}.")
        self.solver = solver
        self.sigma_min = float(sigma_min)
        self.time_exponent = float(time_exponent)

    def velocity(self, z, t, c):
        """``v(z, t, c)`` for ``z (N, D)``, ``t`` a scalar or ``(N,)``, ``c (N, C)``."""
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype), z.shape[:-1])
        return self.net(jnp.concatenate([z, _time_features(t), c], axis=-1))

    def _divergence(self, z, t, c):
        def one(zi, ci):
            return jnp.trace(jax.jacfwd(lambda x: self.velocity(x[None], t, ci[None])[0])(zi))

        return jax.vmap(one)(z, c)

    def _solve(self, z, c, t0, t1, with_divergence):
        """Integrate from ``t0`` to ``t1``; returns the end point and ``int div v dt`` (from
        ``t0`` to ``t1``, signed), or zeros when not asked."""
        def field(t, y, args):
            zt, _ = y
            v = self.velocity(zt, t, c)
            div = self._divergence(zt, t, c) if with_divergence else jnp.zeros(zt.shape[0])
            return v, div

        y0 = (z, jnp.zeros(z.shape[0], z.dtype))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), _SOLVERS[self.solver](), t0=t0, t1=t1,
            dt0=(t1 - t0) / self.num_steps, y0=y0, stepsize_controller=diffrax.ConstantStepSize(),
            saveat=diffrax.SaveAt(t1=True), max_steps=self.num_steps + 1)
        zt, integral = sol.ys
        return zt[0], integral[0]

    def _standardize(self):
        return buffer_value(self.loc), buffer_value(self.scale)

    def log_prob(self, u, condition):
        """``log q(u | condition)``: the ODE solved backwards from ``u`` with the divergence."""
        x, c, batch = flatten_batch(u, condition)
        loc, scale = self._standardize()
        z0, integral = self._solve((x - loc) / scale, c, 1.0, 0.0, True)
        # integral = int_1^0 div dt = -int_0^1 div dt
        log_q = standard_normal_log_prob(z0) + integral - jnp.sum(jnp.log(scale))
        return jnp.reshape(log_q, batch)

    def _forward(self, rng_key, condition, sample_shape, with_divergence):
        """Base draws carried from time 0 to 1: the draws and, when asked, their ``log q``."""
        batch = tuple(sample_shape) + condition.shape[:-1]
        z0 = jax.random.normal(rng_key, batch + (self.dim,))
        zf, c, _ = flatten_batch(z0, condition)
        z1, integral = self._solve(zf, c, 0.0, 1.0, with_divergence)
        loc, scale = self._standardize()
        log_q = standard_normal_log_prob(zf) - integral - jnp.sum(jnp.log(scale))
        return jnp.reshape(loc + scale * z1, batch + (self.dim,)), jnp.reshape(log_q, batch)

    def sample_and_log_prob(self, rng_key, condition, sample_shape=()):
        """``sample_shape + cond_batch + (dim,)`` draws and their ``log q``."""
        return self._forward(rng_key, condition, sample_shape, True)

    def sample(self, rng_key, condition, sample_shape=()):
        """Draws only: the ODE without the divergence (``dim`` times cheaper per step)."""
        return self._forward(rng_key, condition, sample_shape, False)[0]

    def training_log_prob(self, u, condition, rng_key=None):
        """What NPE maximizes: minus the conditional flow-matching loss of each ``u`` (one time
        and one base draw per ``u``, from ``rng_key``)."""
        if rng_key is None:
            raise ValueError("FlowMatching is trained by flow matching, which draws a time and "
                             "base noise per simulation: pass rng_key (NPE does).")
        x, c, batch = flatten_batch(u, condition)
        loc, scale = self._standardize()
        z1 = (x - loc) / scale
        k_t, k_z = jax.random.split(rng_key)
        t = jax.random.uniform(k_t, z1.shape[:-1], z1.dtype) ** (1 / (1 + self.time_exponent))
        z0 = jax.random.normal(k_z, z1.shape, z1.dtype)
        s = self.sigma_min
        zt = (1 - (1 - s) * t[:, None]) * z0 + t[:, None] * z1
        target = z1 - (1 - s) * z0
        loss = jnp.sum((self.velocity(zt, t, c) - target) ** 2, axis=-1)
        return jnp.reshape(-loss, batch)

    def member_log_probs(self, u, condition):
        """Not a mixture: ``None``."""
        return


def flow_matching(dim, context_dim, *, loc=None, scale=None, rngs: nnx.Rngs, **kwargs):
    """A :class:`FlowMatching` density (a factory for ``AutoAmortizedFlow(model,
    flow=flow_matching)``; options through ``functools.partial``)."""
    return FlowMatching(dim, context_dim, loc=loc, scale=scale, rngs=rngs, **kwargs)
