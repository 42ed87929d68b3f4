"""A conditional density defined by a velocity field (flow matching), with an exact log density.

``q(u | c)`` is the law at time 1 of ``dz/dt = v(z, t, c)`` started from a standard normal at
time 0 (in standardized units ``z = (u - loc) / scale``). The velocity network is trained by
conditional flow matching (Lipman et al. 2023; for posteriors, Wildberger et al. 2023): for a
simulated ``(u, x)``, a time ``t ~ U(0, 1)`` and base noise ``z0``, it regresses on the
straight path's velocity, ``|| v(z_t, t, c) - (z1 - (1 - s) z0) ||^2`` with
``z_t = (1 - (1 - s) t) z0 + t z1``. No ODE is solved during training.

Draws integrate the ODE from 0 to 1 with a fixed-step solver (diffrax, ``num_steps`` steps of
Heun's method by default, on a grid finer toward the data end: ``grid_exponent``). The log
density integrates the divergence of the velocity along the same path (the instantaneous change
of variables, Chen et al. 2018):
``log q(z1) = log N(z0) - int_0^1 div v(z_t, t, c) dt``, so ``log_prob``, PSIS k-hat and the
package's exact-density checks work as with a coupling flow. The divergence is computed
exactly (one forward-mode derivative per latent dimension) up to ``EXACT_DIVERGENCE_MAX_DIM``
latents, and above by Hutchinson's estimator (one derivative per probe; Grathwohl et al.
2019). The error of an exact divergence is the solver's: fewer steps are faster and less exact
(see ``benchmarks/``).

**Hutchinson's estimate.** Each draw gets ``num_probes`` Rademacher vectors ``e`` (entries
+-1), fixed along its path, and the integral of the divergence is estimated by the mean over
probes of ``e' B e``, where ``B = int_0^1 dv/dz (z_t, t, c) dt`` is the Jacobian integrated
along the path. The estimate of ``log q`` is unbiased, with variance
``sum_{i != j} (B_ij + B_ji)^2 / (2 num_probes)``: zero when ``B`` is diagonal, and growing
with how much the velocity of one coordinate depends on the others. The noise enters PSIS
weights as noise in ``log q``, so k-hat is somewhat pessimistic with it; more probes (or
``divergence="exact"``) remove it at a cost per step of ``num_probes`` (or ``dim``) forward
derivatives.
"""

from __future__ import annotations

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.networks.flows.flow import flatten_batch, standard_normal_log_prob
from numpyro_amortized.networks.layers import MLP, Buffer, buffer_value

__all__ = ["FlowMatching", "flow_matching"]

_FREQUENCIES = 4  # sin/cos features of t at frequencies 1..4
VALIDATION_DRAWS = 8  # flow-matching draws per held-out simulation in fit's validation
EXACT_DIVERGENCE_MAX_DIM = 16  # divergence="auto": exact up to this many latents
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
    :param grid_exponent: the solver's times are ``t_k = 1 - (1 - k / num_steps)^grid_exponent``:
        1 is a uniform grid; above 1 (2, the default) the steps shrink toward the data end
        (``t = 1``), where the velocity of a narrow posterior changes fastest (for a posterior of
        sd ``s`` in standardized units, at a rate of about ``1 / ((1 - t) + s)``: 32 uniform Heun
        steps draw one of ``s = 0.01`` 1.8 times too wide, 32 steps with exponent 2 within 6%).
    :param solver: the fixed-step solver: ``"heun"`` (second order, the default),
        ``"midpoint"``, ``"euler"`` or ``"ralston"`` (diffrax's).
    :param sigma_min: the noise left at time 1 of the straight paths.
    :param time_exponent: training times are drawn as ``U^(1 / (1 + time_exponent))``, with
        density ``∝ t^time_exponent``: above 0, more of them near the data end (``t = 1``),
        where a narrow posterior needs the velocity most precise (0: uniform).
    :param divergence: ``"exact"``, ``"hutchinson"`` (``num_probes`` Rademacher probes per
        draw; see the module's description for its variance) or ``"auto"`` (exact up to
        ``EXACT_DIVERGENCE_MAX_DIM`` latents).
    :param loc: prior mean of ``u``; :param scale: its sd (standardized units inside).

    **Example**::

        density = FlowMatching(2, 3, rngs=nnx.Rngs(0))
        u, log_q = density.sample_and_log_prob(jax.random.PRNGKey(0), jnp.zeros((5, 3)), (100,))
    """

    def __init__(self, dim, context_dim, *, hidden=(128, 128, 128, 128), num_steps=32,
                 solver="heun", sigma_min=1e-3, time_exponent=0.0, divergence="auto",
                 num_probes=4, grid_exponent=2.0, loc=None, scale=None, rngs: nnx.Rngs):
        self.net = MLP(dim + 1 + 2 * _FREQUENCIES + context_dim, hidden, dim, rngs=rngs)
        self.loc = Buffer(jnp.zeros(dim) if loc is None else jnp.asarray(loc))
        self.scale = Buffer(jnp.ones(dim) if scale is None else jnp.asarray(scale))
        self.dim = dim
        self.num_steps = int(num_steps)
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {solver!r}.")
        self.solver = solver
        if divergence not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"divergence must be 'auto', 'exact' or 'hutchinson', got "
                             f"{divergence!r}.")
        if int(num_probes) < 1:
            raise ValueError(f"num_probes={num_probes}: Hutchinson's estimate needs at least "
                             "one probe.")
        if divergence == "auto":
            divergence = "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
        self.divergence = divergence
        self.num_probes = int(num_probes)
        self.sigma_min = float(sigma_min)
        self.time_exponent = float(time_exponent)
        if not float(grid_exponent) >= 1.0:
            raise ValueError(f"grid_exponent={grid_exponent}: the solver's grid needs an exponent "
                             ">= 1 (1: uniform; above 1: finer toward the data end).")
        self.grid_exponent = float(grid_exponent)

    def velocity(self, z, t, c):
        """``v(z, t, c)`` for ``z (N, D)``, ``t`` a scalar or ``(N,)``, ``c (N, C)``."""
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype), z.shape[:-1])
        return self.net(jnp.concatenate([z, _time_features(t), c], axis=-1))

    def _divergence(self, z, t, c):
        def one(zi, ci):
            return jnp.trace(jax.jacfwd(lambda x: self.velocity(x[None], t, ci[None])[0])(zi))

        return jax.vmap(one)(z, c)

    def _hutchinson(self, z, t, c, probes):
        """The mean over ``probes (P, N, D)`` of ``e' (dv/dz) e``, one derivative per probe."""
        def one(e):
            return jnp.sum(jax.jvp(lambda x: self.velocity(x, t, c), (z,), (e,))[1] * e, -1)

        return jnp.mean(jax.vmap(one)(probes), axis=0)

    def _probes(self, rng_key, z):
        """Rademacher probes ``(P, N, D)`` for Hutchinson's estimate, ``None`` when exact."""
        if self.divergence == "exact":
            return None
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        return jax.random.rademacher(key, (self.num_probes,) + z.shape, z.dtype)

    def _solve(self, z, c, t0, t1, with_divergence, probes=None):
        """Integrate from ``t0`` to ``t1``; returns the end point and ``int div v dt`` (from
        ``t0`` to ``t1``, signed; Hutchinson's estimate with ``probes``), or zeros when not
        asked."""
        def field(t, y, args):
            zt, _ = y
            v = self.velocity(zt, t, c)
            if not with_divergence:
                div = jnp.zeros(zt.shape[0])
            elif probes is None:
                div = self._divergence(zt, t, c)
            else:
                div = self._hutchinson(zt, t, c, probes)
            return v, div

        y0 = (z, jnp.zeros(z.shape[0], z.dtype))
        n, steps = self.num_steps, {"dt0": (t1 - t0) / self.num_steps}
        if self.grid_exponent != 1.0:  # finer toward t = 1, in either direction
            grid = 1.0 - (1.0 - np.arange(n + 1) / n) ** self.grid_exponent
            grid = jnp.asarray(grid if t0 < t1 else grid[::-1], z.dtype)
            steps = {"dt0": None, "stepsize_controller": diffrax.StepTo(grid)}
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), _SOLVERS[self.solver](), t0=t0, t1=t1, y0=y0,
            saveat=diffrax.SaveAt(t1=True), max_steps=n + 1, **steps)
        zt, integral = sol.ys
        return zt[0], integral[0]

    def _standardize(self):
        return buffer_value(self.loc), buffer_value(self.scale)

    def log_prob(self, u, condition, rng_key=None):
        """``log q(u | condition)``: the ODE solved backwards from ``u`` with the divergence
        (Hutchinson's probes drawn from ``rng_key``, by default a fixed key)."""
        x, c, batch = flatten_batch(u, condition)
        loc, scale = self._standardize()
        z = (x - loc) / scale
        z0, integral = self._solve(z, c, 1.0, 0.0, True, self._probes(rng_key, z))
        # integral = int_1^0 div dt = -int_0^1 div dt
        log_q = standard_normal_log_prob(z0) + integral - jnp.sum(jnp.log(scale))
        return jnp.reshape(log_q, batch)

    def _forward(self, rng_key, condition, sample_shape, with_divergence):
        """Base draws carried from time 0 to 1: the draws and, when asked, their ``log q``."""
        batch = tuple(sample_shape) + condition.shape[:-1]
        z0 = jax.random.normal(rng_key, batch + (self.dim,))
        zf, c, _ = flatten_batch(z0, condition)
        probes = self._probes(jax.random.fold_in(rng_key, 1), zf) if with_divergence else None
        z1, integral = self._solve(zf, c, 0.0, 1.0, with_divergence, probes)
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

    def validation_log_prob(self, u, condition, rng_key=None):
        """What :func:`~numpyro_amortized.fit` tracks on held-out simulations: minus the
        flow-matching loss, averaged over ``VALIDATION_DRAWS`` times and base draws per
        simulation (from ``rng_key``, which ``fit`` keeps fixed, so that two checks score the
        same draws). The log density would cost an ODE solve with the divergence per
        simulation, far more than the training steps between two checks; one draw per
        simulation is too noisy to pick the best step or to see a plateau by."""
        x, c, batch = flatten_batch(u, condition)
        k = VALIDATION_DRAWS
        lp = self.training_log_prob(jnp.tile(x, (k, 1)), jnp.tile(c, (k, 1)), rng_key)
        return jnp.reshape(jnp.mean(jnp.reshape(lp, (k, -1)), axis=0), batch)

    def member_log_probs(self, u, condition):
        """Not a mixture: ``None``."""
        return


def flow_matching(dim, context_dim, *, loc=None, scale=None, rngs: nnx.Rngs, **kwargs):
    """A :class:`FlowMatching` density (a factory for ``AutoAmortizedFlow(model,
    flow=flow_matching)``; options through ``functools.partial``)."""
    return FlowMatching(dim, context_dim, loc=loc, scale=scale, rngs=rngs, **kwargs)
