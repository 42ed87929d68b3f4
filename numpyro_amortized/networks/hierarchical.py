"""A factorized amortized posterior for hierarchical models.

``q(globals, locals | x) = q(globals | s(x)) * prod_j q(local_j | globals, e_j(x), s(x))``:
the global latents get a flow conditioned on a summary ``s(x)`` of all the data (a set
function of the group embeddings, see :meth:`HierarchicalPosterior._embeddings`); every group's
local latents get one **shared** flow, conditioned on the globals, on ``s(x)`` and on an
embedding ``e_j`` of that group's own rows (a DeepSet over the rows of group ``j``, with their
exact moments and ``log(1 + n_j)``). The local flow is amortized over groups as well as
datasets: it is as large for 1,000 groups as for 8, and a group's locals see exactly that
group's data, which a summary pooled over all groups cannot tell apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_amortized.data import DataBatch
from numpyro_amortized.networks.flows import ensemble_flow, spline_flow
from numpyro_amortized.networks.layers import MLP, Buffer, buffer_value
from numpyro_amortized.networks.posterior import AmortizedPosterior, compress_tails

__all__ = ["GroupEncoder", "HierarchicalPosterior", "hierarchical_posterior"]


class GroupEncoder(nnx.Module):
    """Per-group embeddings ``(B, J, out)`` of rows tagged with their group, and each group's
    number of rows ``(B, J, 1)``.

    Each row (standardized) passes an MLP; a group's embedding is an MLP of the mean of its
    rows' outputs, their exact means and log-sds per feature, the means of the products of
    features (for up to ``max_cross_features`` features: with the means, a linear regression's
    sufficient statistics), and ``log(1 + n_j)``.
    """

    def __init__(self, features, num_groups, *, width=64, out=32, max_cross_features=16, rngs):
        self.num_groups = num_groups
        self.cross = features if 1 < features <= max_cross_features else 0
        num_cross = self.cross * (self.cross - 1) // 2
        self.phi = MLP(features, (width, width), width, rngs=rngs)
        self.rho = MLP(width + 2 * features + num_cross + 1, (width,), out, rngs=rngs)
        self.out_features = out

    def __call__(self, rows, group, mask):
        onehot = jax.nn.one_hot(group, self.num_groups, dtype=rows.dtype) * mask[..., None]
        count = onehot.sum(-2)[..., None]  # (B, J, 1)
        n = jnp.maximum(count, 1.0)
        pool = lambda h: jnp.einsum("brj,brf->bjf", onehot, h) / n
        mean = pool(rows)
        var = jnp.maximum(pool(rows**2) - mean**2, 0.0)
        h = pool(jax.nn.silu(self.phi(rows)))
        parts = [h, mean, 0.5 * jnp.log(var + 1e-4), jnp.log1p(count)]
        if self.cross:  # the rows' exact second moments: a group's least-squares fit
            i, j = np.triu_indices(self.cross, k=1)
            parts.append(pool(rows[..., i] * rows[..., j]))
        return self.rho(jnp.concatenate(parts, axis=-1)), count


class HierarchicalPosterior(AmortizedPosterior):
    """``q(u | x)`` factorized over the groups of a hierarchical model (module docstring).

    :param summary_net: the guide's summary network; it reads only observations outside every
        group (``other_data``), and its ``summary_dim`` sizes ``s(x)``.
    :param flow: the density of the global latents given the summary (``flow`` as in
        :class:`AmortizedPosterior`; a flow ensemble's mixture weights are fitted as there).
    :param local_flow: one flow for the local latents of a group, conditioned on
        ``[summary, group embedding, standardized globals]``.
    :param encoder: a :class:`GroupEncoder`.
    :param data_stats: as :class:`AmortizedPosterior`; :param group_stats: ``(loc, scale)`` of
        the group rows' features.
    :param global_idx: ``(Dg,)`` positions of the globals in ``u``; :param local_idx:
        ``(J, Dl)`` positions of each group's locals.
    :param global_loc, global_scale: prior location and scale of the globals (to standardize
        them as a condition).
    """

    def __init__(self, summary_net, flow, local_flow, encoder, data_stats, group_stats,
                 global_idx, local_idx, global_loc, global_scale, *, other_data=False, rngs):
        super().__init__(summary_net, flow, data_stats)
        self.local_flow = local_flow
        self.encoder = encoder
        self.other_data = bool(other_data)
        width, out = encoder.out_features, summary_net.summary_dim
        self.group_pool = MLP(width, (width,), width, rngs=rngs)
        self.global_head = MLP(width + 2 + (out if other_data else 0), (2 * width,), out,
                               rngs=rngs)
        self.group_loc = Buffer(jnp.asarray(group_stats[0]))
        self.group_scale = Buffer(jnp.asarray(group_stats[1]))
        self.global_loc = Buffer(jnp.asarray(global_loc))
        self.global_scale = Buffer(jnp.asarray(global_scale))
        self.global_idx = tuple(int(i) for i in global_idx)
        self.local_idx = tuple(tuple(int(i) for i in row) for row in local_idx)

    # ------------------------------------------------------------------ pieces
    def _split(self, u):
        gidx, lidx = jnp.asarray(self.global_idx), jnp.asarray(self.local_idx)
        return u[..., gidx], u[..., lidx]  # (..., Dg), (..., J, Dl)

    def _join(self, ug, ul):
        dim = len(self.global_idx) + len(self.local_idx) * len(self.local_idx[0])
        u = jnp.zeros(ug.shape[:-1] + (dim,), ug.dtype)
        u = u.at[..., jnp.asarray(self.global_idx)].set(ug)
        return u.at[..., jnp.asarray(self.local_idx)].set(ul)

    def group_embed(self, data: DataBatch):
        """Embeddings ``(B, J, E)`` of each dataset's groups."""
        return self._encode_groups(data)[0]

    def _encode_groups(self, data: DataBatch):
        rows = compress_tails((data.group_rows - buffer_value(self.group_loc))
                              / buffer_value(self.group_scale))
        rows = jnp.where(data.group_mask[..., None], rows, 0.0)
        return self.encoder(rows, data.group_index, data.group_mask)

    def _embeddings(self, data: DataBatch):
        """The summary ``(B, S)`` of all the data, and the group embeddings ``(B, J, E)``.

        The summary pools the embeddings of the groups that have data (their mean, the log
        number of such groups and of rows): the globals' likelihood is a product over groups,
        and a group without data leaves it unchanged, so a set function of the groups with data
        summarizes it, for any number of groups; observations outside every group add the
        summary network's output."""
        e, size = self._encode_groups(data)
        present = (size > 0).astype(e.dtype)
        count = present.sum(-2)
        pooled = (jax.nn.silu(self.group_pool(e)) * present).sum(-2) / jnp.maximum(count, 1.0)
        total = data.group_mask.sum(-1, keepdims=True).astype(e.dtype)
        parts = [pooled, jnp.log1p(count), jnp.log1p(total)]
        if self.other_data:
            parts.append(super().embed(data))
        return self.global_head(jnp.concatenate(parts, axis=-1)), e

    def embed(self, data: DataBatch):
        """Summary vectors ``(B, summary_dim)`` of a batch of datasets (see :meth:`_embeddings`)."""
        return self._embeddings(data)[0]

    def _local_condition(self, ug, c, e):
        """``(*sample, B, J, C)`` conditions of the local flow from globals ``(*sample, B, Dg)``,
        summaries ``(B, S)`` and embeddings ``(B, J, E)`` (dataset axis ``B`` given where)."""
        g = compress_tails((ug - buffer_value(self.global_loc)) / buffer_value(self.global_scale))
        batch = ug.shape[:-1]
        j = e.shape[-2]
        parts = [jnp.broadcast_to(c[..., None, :], batch + (j, c.shape[-1])),
                 jnp.broadcast_to(e, batch + e.shape[-2:]),
                 jnp.broadcast_to(g[..., None, :], batch + (j, g.shape[-1]))]
        return jnp.concatenate(parts, axis=-1)

    def _conditions(self, u, data):
        """Global condition ``(B, 1.., S)`` and the local one for ``u``'s globals."""
        c, e = self._embeddings(data)
        ones = (1,) * (u.ndim - 2)
        ug, ul = self._split(u)
        cg = jnp.reshape(c, c.shape[:1] + ones + c.shape[1:])
        cl = self._local_condition(ug, cg, jnp.reshape(e, e.shape[:1] + ones + e.shape[1:]))
        return ug, ul, cg, cl

    # ------------------------------------------------------------------ density protocol
    def log_prob(self, u, data: DataBatch):
        """``log q(u | x)`` (a group without data: its locals' conditional prior is learned)."""
        ug, ul, cg, cl = self._conditions(u, data)
        return self.flow.log_prob(ug, cg) + self.local_flow.log_prob(ul, cl).sum(-1)

    def training_log_prob(self, u, data: DataBatch, rng_key=None):
        ug, ul, cg, cl = self._conditions(u, data)
        kg, kl = (None, None) if rng_key is None else jax.random.split(rng_key)
        return (self.flow.training_log_prob(ug, cg, kg)
                + self.local_flow.training_log_prob(ul, cl, kl).sum(-1))

    def member_log_probs(self, u, data: DataBatch):
        ug, ul, cg, cl = self._conditions(u, data)
        members = self.flow.member_log_probs(ug, cg)
        if members is None:
            return None
        return members + self.local_flow.log_prob(ul, cl).sum(-1)

    def sample_and_log_prob(self, rng_key, data: DataBatch, sample_shape=()):
        kg, kl = jax.random.split(rng_key)
        c, e = self._embeddings(data)
        ug, lq = self.flow.sample_and_log_prob(kg, c, sample_shape)
        ul, lq_local = self.local_flow.sample_and_log_prob(kl, self._local_condition(ug, c, e))
        return self._join(ug, ul), lq + lq_local.sum(-1)

    def sample(self, rng_key, data: DataBatch, sample_shape=()):
        kg, kl = jax.random.split(rng_key)
        c, e = self._embeddings(data)
        ug = self.flow.sample(kg, c, sample_shape)
        return self._join(ug, self.local_flow.sample(kl, self._local_condition(ug, c, e)))


def hierarchical_posterior(summary_net, flow_factory, groups, stats, rngs):
    """A :class:`HierarchicalPosterior` for ``groups``
    (:func:`~numpyro_amortized.group_data.group_setup`): the global flow from ``flow_factory``;
    the local flow from it too, except for the defaults (a spline flow or a flow ensemble),
    whose local part is one spline flow ending in a conditional affine layer (the ensemble's
    mixture over the globals stays one mixture; the affine end keeps rare draws out of the
    splines' identity tails)."""
    layout, gidx, lidx = groups.layout, groups.global_idx, groups.local_idx
    u_loc, u_scale = np.asarray(stats["u_loc"]), np.asarray(stats["u_scale"])
    s_dim = summary_net.summary_dim
    glob = flow_factory(len(gidx), s_dim, loc=u_loc[gidx], scale=u_scale[gidx], rngs=rngs)
    encoder = GroupEncoder(layout.row_features, layout.num_groups, rngs=rngs)
    local_factory = flow_factory
    if flow_factory in (ensemble_flow, spline_flow):
        local_factory = functools.partial(spline_flow, conditional_affine=True)
    local = local_factory(lidx.shape[1], s_dim + encoder.out_features + len(gidx),
                          loc=u_loc[lidx].mean(0), scale=u_scale[lidx].mean(0), rngs=rngs)
    return HierarchicalPosterior(summary_net, glob, local, encoder, stats["data"],
                                 stats["group"], gidx, lidx, u_loc[gidx], u_scale[gidx],
                                 other_data=groups.other_data, rngs=rngs)
