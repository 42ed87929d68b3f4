"""An ensemble of conditional flows: members trained side by side, the posterior their mixture.

Each member is fitted as if alone (the training objective is the mean of the members' log
densities, so no member leans on another), and the posterior is the mixture
``q(u | c) = sum_k w_k q_k(u | c)``. The weights start equal; :func:`~numpyro_amortized.fit`
sets them after training to the ones that maximize the likelihood of its held-out simulations
(a convex problem in the weights, solved by EM): members that generalize better get more weight.

On a fixed simulation budget, flows of different kinds over-fit in different ways: a spline
flow memorizes a bank of 10-dimensional Gaussian posteriors that an affine flow fits well,
while the affine flow cannot bend around a crescent. The mixture is never worse than its best
member by more than the weight that member gets (``-log w_k`` nats), and usually better.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.networks.flows.flow import coupling_flow

__all__ = ["FlowEnsemble", "ensemble_flow", "mixture_log_weights"]


class FlowEnsemble(nnx.Module):
    """A mixture of conditional flows ``q(u | c) = sum_k w_k q_k(u | c)``.

    :param members: :class:`~numpyro_amortized.networks.flows.ConditionalFlow` objects over the
        same dimension and condition.
    :param dim: dimension of ``u``.

    The log weights are a parameter that no gradient reaches (they are set from held-out data by
    :func:`~numpyro_amortized.fit`, see :func:`mixture_log_weights`).

    **Example**::

        flow = ensemble_flow(2, 3, rngs=nnx.Rngs(0))  # spline, affine, and both weight-decayed
        u, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(0), jnp.zeros((5, 3)), (100,))
    """

    def __init__(self, members, dim):
        if len(members) < 1:
            raise ValueError("FlowEnsemble needs at least one member flow.")
        self.members = nnx.List(members)
        self.dim = dim
        self.log_weights = nnx.Param(jnp.full((len(members),), -np.log(len(members)),
                                              jnp.float32))

    def _log_weights(self):
        return jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(self.log_weights[...])))

    def member_log_probs(self, u, condition):
        """``log q_k(u | condition)`` of each member, stacked on a leading axis of size K."""
        return jnp.stack([m.log_prob(u, condition) for m in self.members])

    def log_prob(self, u, condition):
        """The mixture's ``log q(u | condition)``."""
        lw = self._log_weights()
        lps = self.member_log_probs(u, condition)
        return jax.nn.logsumexp(jnp.reshape(lw, (-1,) + (1,) * (lps.ndim - 1)) + lps, axis=0)

    def training_log_prob(self, u, condition):
        """The mean of the members' ``log q_k``: what NPE maximizes, each member on its own."""
        return jnp.mean(self.member_log_probs(u, condition), axis=0)

    def sample_and_log_prob(self, rng_key, condition, sample_shape=()):
        """Draws from the mixture, shape ``sample_shape + cond_batch + (dim,)``, and their
        mixture ``log q``: each draw comes from member ``k`` with probability ``w_k``."""
        k_choice, *keys = jax.random.split(rng_key, len(self.members) + 1)
        draws = jnp.stack([m.sample_and_log_prob(k, condition, sample_shape)[0]
                           for m, k in zip(self.members, keys, strict=True)])
        batch = draws.shape[1:-1]
        which = jax.random.categorical(k_choice, self._log_weights(), shape=batch)
        u = jnp.take_along_axis(draws, which[None, ..., None], axis=0)[0]
        return u, self.log_prob(u, condition)

    def sample(self, rng_key, condition, sample_shape=()):
        """Samples only (see :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(rng_key, condition, sample_shape)[0]


def ensemble_flow(dim, context_dim, *, transformers=("spline", "affine", "spline", "affine"),
                  weight_decay=(0.0, 0.0, 2.0, 2.0), loc=None, scale=None, rngs: nnx.Rngs, **kwargs):
    """A :class:`FlowEnsemble` of one :func:`coupling_flow` per entry of ``transformers``
    (default: a spline flow and an affine flow, each twice: plain and with weight decay 2);
    ``kwargs`` go to every member.

    :param weight_decay: one number for every member, or one per member (see
        :func:`~numpyro_amortized.networks.coupling_flow`): members that differ only in their
        weight decay let the held-out mixture weights choose how strongly to regularize.

    The default flow of :class:`~numpyro_amortized.AutoAmortizedFlow` when
    :func:`~numpyro_amortized.fit` trains it on a fixed simulation budget.

    **Example**::

        guide = AutoAmortizedFlow(model, flow=ensemble_flow)
        guide = AutoAmortizedFlow(model, flow=functools.partial(ensemble_flow,
                                                                transformers=("spline",) * 3))
    """
    decays = (weight_decay,) * len(transformers) if np.ndim(weight_decay) == 0 else weight_decay
    if len(decays) != len(transformers):
        raise ValueError(f"weight_decay has {len(decays)} entries for {len(transformers)} "
                         "transformers; give one per member, or one number for all.")
    members = [coupling_flow(dim, context_dim, transformer=t, loc=loc, scale=scale,
                             weight_decay=w, rngs=rngs, **kwargs)
               for t, w in zip(transformers, decays, strict=True)]
    return FlowEnsemble(members, dim)


def mixture_log_weights(member_log_probs, num_iterations=500):
    """The mixture weights that maximize ``sum_i log sum_k w_k exp(L[k, i])`` (EM).

    :param member_log_probs: ``(K, N)`` member log densities of N held-out points; points where
        no member is finite are left out, a non-finite member value counts as density zero.
    :return: ``(K,)`` log weights (numpy); equal weights when no point is usable.
    """
    lps = np.asarray(member_log_probs, np.float64)
    lps = np.where(np.isfinite(lps), lps, -np.inf)
    lps = lps[:, np.isfinite(lps).any(axis=0)]
    num_members = lps.shape[0]
    log_w = np.full(num_members, -np.log(num_members))
    if lps.shape[1] == 0:
        return log_w
    for _ in range(num_iterations):
        joint = log_w[:, None] + lps
        resp = joint - np.logaddexp.reduce(joint, axis=0, keepdims=True)
        new = np.logaddexp.reduce(resp, axis=1) - np.log(lps.shape[1])
        converged = np.max(np.abs(np.exp(new) - np.exp(log_w))) < 1e-6
        log_w = new
        if converged:
            break
    return log_w
