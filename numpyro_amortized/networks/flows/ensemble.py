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

Members of the same structure (same layers and sizes; their permutations are arrays, so they
may differ) are stacked into one vectorized flow (``jax.vmap`` over their
parameters): one copy of the flow in the compiled program instead of one per member. XLA's
compile time on CPU grows faster than the program, so this matters: the default four-member
ensemble compiles its training step about three times faster than with the members side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.networks.flows.affine_coupling import AffineCoupling
from numpyro_amortized.networks.flows.flow import ConditionalFlow, coupling_flow
from numpyro_amortized.networks.flows.spline_coupling import SplineCoupling
from numpyro_amortized.networks.layers import stack_modules

__all__ = ["FlowEnsemble", "StackedFlows", "ensemble_flow", "mixture_log_weights"]


class StackedFlows(nnx.Module):
    """K flows of one structure as one flow whose parameters carry a leading axis of size K.

    :param members: :class:`~numpyro_amortized.networks.flows.ConditionalFlow` objects with the
        same structure (layers and sizes; permutations may differ).

    Every method evaluates all K members at once (``jax.vmap`` over the stacked parameters) and
    returns their results stacked on a leading axis.
    """

    def __init__(self, members):
        self.flow = stack_modules(members, "StackedFlows")
        self.size = len(members)

    def _vmap(self, fn, *args):
        graphdef, state = nnx.split(self.flow)
        return jax.vmap(lambda st, *a: fn(nnx.merge(graphdef, st), *a))(state, *args)

    def log_probs(self, u, condition):
        """``(K, ...)``: each member's ``log q_k(u | condition)``."""
        return self._vmap(lambda f: f.log_prob(u, condition))

    def training_log_probs(self, u, condition):
        """``(K, ...)``: each member's training objective (its ``training_log_prob``)."""
        return self._vmap(lambda f: f.training_log_prob(u, condition))

    def sample_and_log_probs(self, rng_keys, condition, sample_shape=()):
        """Member ``k`` draws with ``rng_keys[k]``: ``(K, *sample_shape, *batch, dim)`` draws and
        their ``(K, ...)`` log densities under the member that drew them."""
        return self._vmap(lambda f, k: f.sample_and_log_prob(k, condition, sample_shape), rng_keys)



def _stack_same_structure(members):
    """Group ``members`` by graph into :class:`StackedFlows`, in order of first appearance;
    also return each member's (group, index in group)."""
    groups, where = [], []
    for m in members:
        graphdef = nnx.split(m)[0]
        for gi, (g, ms) in enumerate(groups):
            if g == graphdef:
                where.append((gi, len(ms)))
                ms.append(m)
                break
        else:
            where.append((len(groups), 0))
            groups.append((graphdef, [m]))
    return [StackedFlows(ms) for _, ms in groups], where


class FlowEnsemble(nnx.Module):
    """A mixture of conditional flows ``q(u | c) = sum_k w_k q_k(u | c)``.

    :param members: :class:`~numpyro_amortized.networks.flows.ConditionalFlow` objects over the
        same dimension and condition.
    :param dim: dimension of ``u``.

    The log weights are a parameter that no gradient reaches (they are set from held-out data by
    :func:`~numpyro_amortized.fit`, see :func:`mixture_log_weights`). Members of one structure
    are stacked into a :class:`StackedFlows` (``groups``); ``member_kinds`` describes the
    members in the order given (the order of the weights), and ``member_groups`` says which
    members each group stacks, in its order (what a per-member optimizer setting, such as
    :func:`~numpyro_amortized.train.flow_weight_decay`, needs).

    **Example**::

        flow = ensemble_flow(2, 3, rngs=nnx.Rngs(0))  # spline, affine, spline, affine
        u, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(0), jnp.zeros((5, 3)), (100,))
    """

    def __init__(self, members, dim):
        if len(members) < 1:
            raise ValueError("FlowEnsemble needs at least one member flow.")
        if not all(isinstance(m, ConditionalFlow) for m in members):
            raise TypeError("FlowEnsemble's members must be ConditionalFlow objects "
                            "(e.g. from coupling_flow).")
        self.member_kinds = tuple(_kind(m) for m in members)
        groups, where = _stack_same_structure(members)
        self.member_groups = tuple(tuple(k for k, (gk, _) in sorted(
            enumerate(where), key=lambda item: item[1]) if gk == g) for g in range(len(groups)))
        self.groups = nnx.List(groups)
        # position of member k in the concatenation of the groups' outputs
        offsets = np.cumsum([0] + [g.size for g in groups])
        self.order = tuple(int(offsets[g] + i) for g, i in where)
        self.dim = dim
        self.log_weights = nnx.Param(jnp.full((len(members),), -np.log(len(members)),
                                              jnp.float32))

    @property
    def num_members(self):
        return len(self.order)

    def _log_weights(self):
        return jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(self.log_weights[...])))

    def _in_member_order(self, stacked):
        return jnp.concatenate(stacked)[np.asarray(self.order)]

    def member_log_probs(self, u, condition):
        """``log q_k(u | condition)`` of each member, stacked on a leading axis of size K."""
        return self._in_member_order([g.log_probs(u, condition) for g in self.groups])

    def log_prob(self, u, condition):
        """The mixture's ``log q(u | condition)``."""
        lw = self._log_weights()
        lps = self.member_log_probs(u, condition)
        return jax.nn.logsumexp(jnp.reshape(lw, (-1,) + (1,) * (lps.ndim - 1)) + lps, axis=0)

    def validation_log_prob(self, u, condition, rng_key=None):
        """What :func:`~numpyro_amortized.fit` tracks on held-out simulations: the mixture's
        ``log q``."""
        return self.log_prob(u, condition)

    def training_log_prob(self, u, condition, rng_key=None):
        """The mean of the members' training objectives (``log q_k``): what NPE maximizes,
        each member on its own (``rng_key`` is not used)."""
        if all(g.flow.fitted_end() is None for g in self.groups):
            return jnp.mean(self.member_log_probs(u, condition), axis=0)
        return jnp.mean(self._in_member_order([g.training_log_probs(u, condition)
                                               for g in self.groups]), axis=0)

    def sample_and_log_prob(self, rng_key, condition, sample_shape=()):
        """Draws from the mixture, shape ``sample_shape + cond_batch + (dim,)``, and their
        mixture ``log q``: each draw comes from member ``k`` with probability ``w_k``."""
        k_choice, k_members = jax.random.split(rng_key)
        keys = jax.random.split(k_members, self.num_members)
        draws, start = [], 0
        for g in self.groups:
            draws.append(g.sample_and_log_probs(keys[start:start + g.size], condition,
                                                sample_shape)[0])
            start += g.size
        draws = self._in_member_order(draws)
        batch = draws.shape[1:-1]
        which = jax.random.categorical(k_choice, self._log_weights(), shape=batch)
        u = jnp.take_along_axis(draws, which[None, ..., None], axis=0)[0]
        return u, self.log_prob(u, condition)

    def sample(self, rng_key, condition, sample_shape=()):
        """Samples only (see :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(rng_key, condition, sample_shape)[0]


def _kind(flow):
    """``"spline"``, ``"affine"`` or ``"mixed"``: the couplings of a flow (for labels)."""
    types = flow.layer_types()
    spline = any(issubclass(t, SplineCoupling) for t in types)
    affine = any(issubclass(t, AffineCoupling) for t in types)
    return "mixed" if spline and affine else "spline" if spline else "affine" if affine else "flow"


def ensemble_flow(dim, context_dim, *, transformers=("spline", "affine", "spline", "affine"),
                  loc=None, scale=None, rngs: nnx.Rngs, **kwargs):
    """A :class:`FlowEnsemble` of one :func:`coupling_flow` per entry of ``transformers``
    (default: a spline flow and an affine flow, each twice); ``kwargs`` go to every member.

    The default flow of :class:`~numpyro_amortized.AutoAmortizedFlow` when
    :func:`~numpyro_amortized.fit` trains it on a fixed simulation budget, where ``fit``'s
    default optimizer decays the weights of the second spline and affine members (see
    :func:`~numpyro_amortized.train.fixed_budget_weight_decay`): members that differ only in
    how they are regularized let the held-out mixture weights choose how strongly.

    **Example**::

        guide = AutoAmortizedFlow(model, flow=ensemble_flow)
        guide = AutoAmortizedFlow(model, flow=functools.partial(ensemble_flow,
                                                                transformers=("spline",) * 3))
    """
    members = [coupling_flow(dim, context_dim, transformer=t, loc=loc, scale=scale, rngs=rngs,
                             **kwargs) for t in transformers]
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
