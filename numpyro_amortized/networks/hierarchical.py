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
from numpyro_amortized.networks.factories import local_flow_factory
from numpyro_amortized.networks.flows import ConditionalFlow
from numpyro_amortized.networks.layers import MLP, Buffer, buffer_value, least_squares, map_sets
from numpyro_amortized.networks.posterior import AmortizedPosterior, compress_tails

__all__ = ["GroupEncoder", "HierarchicalPosterior", "hierarchical_posterior", "pool_groups"]

#: between- to within-group variance ratios ``r`` of the pools over groups (:func:`pool_groups`)
POOL_RATIOS = (0.0, 0.03, 0.3, 3.0, np.inf)


class GroupEncoder(nnx.Module):
    """Per-group embeddings ``(B, J, out)`` of rows tagged with their group, each group's
    number of rows ``(B, J, 1)`` and its exact statistics ``(B, J, stats_dim)``.

    The statistics of a group's rows (standardized) are their means and log-sds per feature,
    the means of the products of features (for up to ``max_cross_features`` features) and
    ``log(1 + n_j)``; where rows hold ``responses`` observations followed by ``covariates`` of
    their own, also each response's least-squares fit on ``[1, covariates]`` (coefficients, log
    residual sd, log standard errors; a ridge of ``1e-3`` keeps groups with fewer rows than
    coefficients finite). A neural network approximates a division poorly, and a group's
    regression fit is what its local latents and the globals' spread depend on. The embedding
    is an MLP of these statistics and of the mean of the rows' MLP outputs (a DeepSet).

    Where rows hold responses and covariates, the encoder also fits each response on the
    covariates over all of a dataset's rows, and within groups (rows centred by their group's
    means): the pooled and the fixed-effects estimates of coefficients the groups share, which
    the groups' own fits (noisy, or undefined where a covariate does not vary in a group)
    give poorly. They come fourth in the output, ``(B, panel_dim)``.
    """

    def __init__(self, features, num_groups, *, responses=0, covariates=0, width=64, out=32,
                 max_cross_features=16, max_regressors=8, rngs):
        self.num_groups = num_groups
        self.features = features
        self.cross = features if 1 < features <= max_cross_features else 0
        self.responses = responses if 0 < covariates <= max_regressors and responses else 0
        self.covariates = covariates if self.responses else 0
        k = self.covariates + 1
        self.stats_dim = (2 * features + self.cross * (self.cross - 1) // 2 + 1
                          + (self.responses * (k + 1) + k if self.responses else 0))
        self.panel_dim = 2 * (self.responses * (k + 1) + k) if self.responses else 0
        self.phi = MLP(features, (width, width), width, rngs=rngs)
        self.rho = MLP(width + self.stats_dim, (width,), out, rngs=rngs)
        self.out_features = out

    def __call__(self, rows, group, mask):
        b, r = group.shape
        weight = mask.astype(rows.dtype)
        total = functools.partial(self._total, group=group, weight=weight)
        count = total(jnp.ones((b, r, 1), rows.dtype))  # (B, J, 1)
        n = jnp.maximum(count, 1.0)
        pool = lambda h: total(h) / n
        mean = pool(rows)
        var = jnp.maximum(pool(rows**2) - mean**2, 0.0)
        stats = [mean, 0.5 * jnp.log(var + 1e-4), jnp.log1p(count)]
        if self.cross:  # the rows' exact second moments
            i, j = np.triu_indices(self.cross, k=1)
            stats.append(pool(rows[..., i] * rows[..., j]))
        if self.responses:
            y = rows[..., :self.responses]
            stats += least_squares(y, rows[..., self.responses:self.responses + self.covariates],
                                   total, n)
        stats = jnp.concatenate(stats, axis=-1) * (count > 0)
        phi = lambda rows, group, weight: self._total(jax.nn.silu(self.phi(rows)), group, weight)
        h = map_sets(phi, rows, group, weight, width=self.phi.out.out_features) / n
        panel = (self._panel(rows, group, weight, mean) if self.responses
                 else jnp.zeros((b, 0), rows.dtype))
        return self.rho(jnp.concatenate([h, stats], axis=-1)), count, stats, panel

    def _total(self, h, group, weight):
        """``h`` ``(B, R, ...)`` summed over each group's rows: ``(B, J, ...)``."""
        b, r = group.shape
        ids = jnp.reshape(group + self.num_groups * jnp.arange(b)[:, None], -1)
        h = h * jnp.reshape(weight, weight.shape + (1,) * (h.ndim - 2))
        out = jax.ops.segment_sum(jnp.reshape(h, (b * r,) + h.shape[2:]), ids,
                                  num_segments=b * self.num_groups)
        return jnp.reshape(out, (b, self.num_groups) + h.shape[2:])

    def _panel(self, rows, group, weight, mean):
        """The fits over all rows and within groups (class docstring), ``(B, panel_dim)``."""
        every = lambda h: (h * jnp.reshape(weight, weight.shape + (1,) * (h.ndim - 2))).sum(1)
        n = jnp.maximum(weight.sum(1, keepdims=True), 1.0)
        k, r = self.responses + self.covariates, self.responses
        z = rows[..., :k]
        centred = z - mean[jnp.arange(rows.shape[0])[:, None], group][..., :k]
        fits = (least_squares(z[..., :r], z[..., r:], every, n)
                + least_squares(centred[..., :r], centred[..., r:], every, n))
        return jnp.concatenate(fits, axis=-1)


def pool_groups(stats, count, ratios=POOL_RATIOS):
    """Statistics ``(B, P)`` of datasets from their groups' exact statistics ``stats``
    ``(B, J, S)`` and numbers of rows ``count`` ``(B, J, 1)``: for each ratio ``r``, the mean of
    the statistics over the groups with data weighted by ``n_j / (1 + r n_j)``, their log
    weighted sd, and the log weighted mean of ``1 / n_j``.

    Those weights are a random-effects estimate's of a shared mean when the between-groups
    variance is ``r`` times the within-groups one (``r = 0``: weights by rows, which pools a
    shared noise scale as the likelihood does; ``r = inf``: equal weights). The posterior
    weighs the groups somewhere between, by a ratio it learns, and the spread of the group
    means is the between-groups variance plus the sampling noise, ``sigma^2`` times the mean
    of ``1 / n_j``: a network computes neither a weighted mean nor that difference precisely
    from plain means.
    """
    n = jnp.maximum(count, 1.0)
    out = []
    for r in ratios:
        w = (count > 0) * (1.0 if np.isinf(r) else count / (1.0 + r * count))
        total = jnp.maximum(w.sum(-2), 1e-6)
        mean = (w * stats).sum(-2) / total
        var = (w * (stats - mean[..., None, :]) ** 2).sum(-2) / total
        out += [mean, 0.5 * jnp.log(var + 1e-4), jnp.log((w / n).sum(-2) / total + 1e-4)]
    return jnp.concatenate(out, axis=-1)


class HierarchicalPosterior(AmortizedPosterior):
    """``q(u | x)`` factorized over the groups of a hierarchical model (module docstring).

    :param summary_net: the guide's summary network; it reads only observations outside every
        group (``other_data``), and its ``summary_dim`` sizes ``s(x)``.
    :param flow: the density of the global latents given the summary (``flow`` as in
        :class:`AmortizedPosterior`; a flow ensemble's mixture weights are fitted as there).
    :param local_flow: one flow for the local latents of a group, conditioned on
        ``[summary, group embedding, standardized globals, their products with the group's
        row means]`` (a local's location given the globals is often such a product: the group's
        mean response less a shared slope times its mean covariate).
    :param encoder: a :class:`GroupEncoder`.
    :param data_stats: as :class:`AmortizedPosterior`; :param group_stats: ``(loc, scale)`` of
        the group rows' features.
    :param global_idx: ``(Dg,)`` positions of the globals in ``u``; :param local_idx:
        ``(J, Dl)`` positions of each group's locals.
    :param global_loc, global_scale: prior location and scale of the globals (to standardize
        them as a condition).
    :param local_affine: ``(loc, scale)``, each ``(Dl,)``: the positions in the globals of each
        local column's prior location and log scale, or ``-1``
        (:func:`~numpyro_amortized.group_data.local_affine`); where a scale is given, the local
        flow models the local standardized by its approximate posterior given the globals
        (:meth:`_affine`).
    """

    def __init__(self, summary_net, flow, local_flow, encoder, data_stats, group_stats,
                 global_idx, local_idx, global_loc, global_scale, *, other_data=False,
                 local_affine=None, local_stats=None, rngs):
        super().__init__(summary_net, flow, data_stats)
        self.local_flow = local_flow
        self.encoder = encoder
        self.row_means = (encoder.out_features, encoder.features)  # where e holds the means
        self.other_data = bool(other_data)
        width, out = encoder.out_features, summary_net.summary_dim
        self.group_pool = MLP(width, (width,), width, rngs=rngs)
        pooled = len(POOL_RATIOS) * (2 * encoder.stats_dim + 1) + encoder.panel_dim
        self.global_head = MLP(width + pooled + 2 + (out if other_data else 0),
                               (2 * width,), out, rngs=rngs)
        self.group_loc = Buffer(jnp.asarray(group_stats[0]))
        self.group_scale = Buffer(jnp.asarray(group_stats[1]))
        self.global_loc = Buffer(jnp.asarray(global_loc))
        self.global_scale = Buffer(jnp.asarray(global_scale))
        self.global_idx = tuple(int(i) for i in global_idx)
        self.local_idx = tuple(tuple(int(i) for i in row) for row in local_idx)
        none = (-1,) * len(self.local_idx[0])
        self.local_affine = tuple(tuple(int(i) for i in f) for f in local_affine or (none, none))
        self.precision_net = nnx.data(None)
        if max(self.local_affine[1]) >= 0:  # a local prior's scale is a global: see _affine
            self.local_loc = Buffer(jnp.asarray(local_stats[0]))
            self.local_scale = Buffer(jnp.asarray(local_stats[1]))
            cond = local_flow_condition_dim(summary_net.summary_dim, encoder, len(global_idx))
            self.precision_net = MLP(cond, (width,), 2 * len(none), zero_init=True, rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def _split(self, u):
        gidx, lidx = jnp.asarray(self.global_idx), jnp.asarray(self.local_idx)
        return u[..., gidx], u[..., lidx]  # (..., Dg), (..., J, Dl)

    def _join(self, ug, ul):
        dim = len(self.global_idx) + len(self.local_idx) * len(self.local_idx[0])
        u = jnp.zeros(ug.shape[:-1] + (dim,), ug.dtype)
        u = u.at[..., jnp.asarray(self.global_idx)].set(ug)
        return u.at[..., jnp.asarray(self.local_idx)].set(ul)

    def _affine(self, ug, cl):
        """Location and log scale ``(..., J, Dl)`` of the map from the local flow's variable to
        the locals ``ul``, for globals ``ug`` and local conditions ``cl``.

        A local with prior ``N(m0, sigma)`` (``m0``, ``sigma`` globals) and data that inform it
        with a precision ``exp(h_j)`` around ``mu_j`` has, given the globals, roughly the
        posterior ``N(w m0 + (1 - w) mu_j, 1 / (sigma^-2 + exp(h_j)))`` with
        ``w = sigma^-2 / (sigma^-2 + exp(h_j))``; the flow models the local standardized by it,
        with ``h_j`` and ``mu_j`` learned from the group's condition. Where ``sigma`` is small
        this is the non-centred form ``(a_j - m0) / sigma``, where the data dominate the
        centred one: the flow's variable keeps a scale near 1 either way (a partially
        non-centred parameterization, learned per group)."""
        pick = lambda idx: jnp.where(idx >= 0, ug[..., np.maximum(idx, 0)], 0.0)[..., None, :]
        loc_idx, scale_idx = (np.asarray(f, int) for f in self.local_affine)
        m0 = pick(loc_idx)
        if self.precision_net is None:
            return m0, jnp.zeros_like(m0)
        out = self.precision_net(cl)
        dl, spread = len(loc_idx), buffer_value(self.local_scale)
        mu = buffer_value(self.local_loc) + spread * out[..., :dl]
        prior = -2.0 * pick(scale_idx)  # the unconstrained scale is log sigma
        log_prec = jnp.logaddexp(prior, out[..., dl:] - 2.0 * jnp.log(spread))
        w = jnp.exp(prior - log_prec)
        scaled = scale_idx >= 0
        return (jnp.where(scaled, w * m0 + (1.0 - w) * mu, m0),
                jnp.where(scaled, -0.5 * log_prec, 0.0))

    def _to_standard(self, ug, ul, cl):
        """The local flow's variable for locals ``ul`` and its log-det ``(..., J)``."""
        loc, log_scale = self._affine(ug, cl)
        return (ul - loc) * jnp.exp(-log_scale), -log_scale.sum(-1)

    def _from_standard(self, ug, z, cl, log_q):
        loc, log_scale = self._affine(ug, cl)
        return loc + jnp.exp(log_scale) * z, log_q - log_scale.sum(-1)

    def group_embed(self, data: DataBatch):
        """Embeddings ``(B, J, E)`` of each dataset's groups (learned, then exact statistics)."""
        return self._embeddings(data)[1]

    def _encode_groups(self, data: DataBatch):
        rows = compress_tails((data.group_rows - buffer_value(self.group_loc))
                              / buffer_value(self.group_scale))
        rows = jnp.where(data.group_mask[..., None], rows, 0.0)
        return self.encoder(rows, data.group_index, data.group_mask)

    def _embeddings(self, data: DataBatch):
        """The summary ``(B, S)`` of all the data, and the group embeddings ``(B, J, E)``.

        The summary pools the groups that have data (the mean of their embeddings, the means
        and spreads of their exact statistics under the weights of :func:`pool_groups`, the
        log number of such groups and of rows, the fits of :class:`GroupEncoder` over all
        rows), and each group's embedding carries its exact statistics: the globals' likelihood is a
        product over groups, and a group without data leaves it unchanged, so a set function of
        the groups with data summarizes it, for any number of groups; observations outside
        every group add the summary network's output."""
        e, size, stats, panel = self._encode_groups(data)
        present = (size > 0).astype(e.dtype)
        count = present.sum(-2)
        total = data.group_mask.sum(-1, keepdims=True).astype(e.dtype)
        learned = (jax.nn.silu(self.group_pool(e)) * present).sum(-2) / jnp.maximum(count, 1.0)
        parts = [learned, pool_groups(stats, size), panel, jnp.log1p(count), jnp.log1p(total)]
        if self.other_data:
            parts.append(super().embed(data))
        c = self.global_head(jnp.concatenate(parts, axis=-1))
        return c, jnp.concatenate([e, stats], axis=-1)

    def embed(self, data: DataBatch):
        """Summary vectors ``(B, summary_dim)`` of a batch of datasets (see :meth:`_embeddings`)."""
        return self._embeddings(data)[0]

    def _local_condition(self, ug, c, e):
        """``(*sample, B, J, C)`` conditions of the local flow from globals ``(*sample, B, Dg)``,
        summaries ``(B, S)`` and embeddings ``(B, J, E)`` (dataset axis ``B`` given where)."""
        g = compress_tails((ug - buffer_value(self.global_loc)) / buffer_value(self.global_scale))
        batch = ug.shape[:-1]
        j = e.shape[-2]
        start, f = self.row_means  # the group's statistics begin with its row means
        means = jnp.broadcast_to(e[..., start:start + f], batch + (j, f))
        products = g[..., None, :, None] * means[..., None, :]  # (*sample, B, J, Dg, F)
        parts = [jnp.broadcast_to(c[..., None, :], batch + (j, c.shape[-1])),
                 jnp.broadcast_to(e, batch + e.shape[-2:]),
                 jnp.broadcast_to(g[..., None, :], batch + (j, g.shape[-1])),
                 jnp.reshape(products, batch + (j, -1))]
        return jnp.concatenate(parts, axis=-1)

    def _conditions(self, u, data):
        """Globals, the standardized locals and their log-det, the global condition
        ``(B, 1.., S)`` and the local one for ``u``'s globals."""
        c, e = self._embeddings(data)
        ones = (1,) * (u.ndim - 2)
        ug, ul = self._split(u)
        cg = jnp.reshape(c, c.shape[:1] + ones + c.shape[1:])
        cl = self._local_condition(ug, cg, jnp.reshape(e, e.shape[:1] + ones + e.shape[1:]))
        z, log_det = self._to_standard(ug, ul, cl)
        return ug, (z, log_det), cg, cl

    # ------------------------------------------------------------------ density protocol
    def log_prob(self, u, data: DataBatch, present=None):
        """``log q(u | x)`` (a group without data: its locals' conditional prior is learned);
        with a ``(J,)`` mask ``present``, of the globals and the present groups' locals only
        (the marginal, as the locals are independent given the globals)."""
        ug, (z, log_det), cg, cl = self._conditions(u, data)
        local = self.local_flow.log_prob(z, cl) + log_det
        return self.flow.log_prob(ug, cg) + (local if present is None
                                             else jnp.where(present, local, 0.0)).sum(-1)

    def training_log_prob(self, u, data: DataBatch, rng_key=None):
        return self._objective("training_log_prob", u, data, rng_key)

    def validation_log_prob(self, u, data: DataBatch, rng_key=None):
        return self._objective("validation_log_prob", u, data, rng_key)

    def _objective(self, name, u, data, rng_key):
        """The global and the local flows' ``name`` (their training or validation objective)."""
        ug, (z, log_det), cg, cl = self._conditions(u, data)
        kg, kl = (None, None) if rng_key is None else jax.random.split(rng_key)
        local = lambda z, cl, ld: (getattr(self.local_flow, name)(z, cl, kl) + ld).sum(-1)
        if isinstance(self.local_flow, ConditionalFlow):  # draws nothing: chunks of datasets
            return getattr(self.flow, name)(ug, cg, kg) + map_sets(local, z, cl, log_det,
                                                                   width=cl.shape[-1])
        return getattr(self.flow, name)(ug, cg, kg) + local(z, cl, log_det)

    def member_log_probs(self, u, data: DataBatch):
        ug, (z, log_det), cg, cl = self._conditions(u, data)
        members = self.flow.member_log_probs(ug, cg)
        if members is None:
            return None
        return members + (self.local_flow.log_prob(z, cl) + log_det).sum(-1)

    def sample_and_log_prob(self, rng_key, data: DataBatch, sample_shape=(), present=None):
        """Samples and their ``log q``; with a ``(J,)`` mask ``present``, the density of the
        globals and the present groups' locals, as in :meth:`log_prob`."""
        kg, kl = jax.random.split(rng_key)
        c, e = self._embeddings(data)
        ug, lq = self.flow.sample_and_log_prob(kg, c, sample_shape)
        cl = self._local_condition(ug, c, e)
        z, lq_local = self.local_flow.sample_and_log_prob(kl, cl)
        ul, lq_local = self._from_standard(ug, z, cl, lq_local)
        if present is not None:
            lq_local = jnp.where(present, lq_local, 0.0)
        return self._join(ug, ul), lq + lq_local.sum(-1)

    def sample(self, rng_key, data: DataBatch, sample_shape=()):
        kg, kl = jax.random.split(rng_key)
        c, e = self._embeddings(data)
        ug = self.flow.sample(kg, c, sample_shape)
        return self._join(ug, self._sample_locals(kl, ug, c, e))

    def sample_locals(self, rng_key, data: DataBatch, ug):
        """Draws ``(*sample, B, J, Dl)`` of every group's locals (unconstrained) given globals
        ``ug`` of shape ``(*sample, B, Dg)``: the guide's conditional ``q(local_j | globals,
        x)``, e.g. to check it against a model's exact conditional."""
        return self._sample_locals(rng_key, ug, *self._embeddings(data))

    def _sample_locals(self, rng_key, ug, c, e):
        cl = self._local_condition(ug, c, e)
        return self._from_standard(ug, self.local_flow.sample(rng_key, cl), cl, 0.0)[0]


def hierarchical_posterior(summary_net, flow_factory, groups, stats, rngs, local_factory=None):
    """A :class:`HierarchicalPosterior` for ``groups``
    (:func:`~numpyro_amortized.group_data.group_setup`): the global flow from ``flow_factory``,
    the local flow from ``local_factory``; by default
    :func:`~numpyro_amortized.networks.factories.local_flow_factory` of ``flow_factory`` for
    the locals' dimension (for the defaults, a spline flow or a flow ensemble, one spline flow
    ending in a conditional affine layer: the ensemble's mixture over the globals stays one
    mixture; the affine end keeps rare draws in the splines' bulk)."""
    layout, gidx, lidx = groups.layout, groups.global_idx, groups.local_idx
    u_loc, u_scale = np.asarray(stats["u_loc"]), np.asarray(stats["u_scale"])
    s_dim = summary_net.summary_dim
    glob = flow_factory(len(gidx), s_dim, loc=u_loc[gidx], scale=u_scale[gidx], rngs=rngs)
    encoder = GroupEncoder(layout.row_features, layout.num_groups,
                           responses=layout.response_features,
                           covariates=layout.covariate_features, rngs=rngs)
    if local_factory is None:
        local_factory = local_flow_factory(flow_factory, lidx.shape[1])
    cond = local_flow_condition_dim(s_dim, encoder, len(gidx))
    loc, scale = u_loc[lidx].mean(0), u_scale[lidx].mean(0)
    stats_local = (loc, scale)
    centre, spread = (np.asarray(f, int) >= 0 for f in groups.local_affine)
    # standardized columns: about mean 0 under the prior, and sd 1 where scaled
    loc, scale = np.where(centre | spread, 0.0, loc), np.where(spread, 1.0, scale)
    local = local_factory(lidx.shape[1], cond, loc=loc, scale=scale, rngs=rngs)
    return HierarchicalPosterior(summary_net, glob, local, encoder, stats["data"],
                                 stats["group"], gidx, lidx, u_loc[gidx], u_scale[gidx],
                                 other_data=groups.other_data,
                                 local_affine=groups.local_affine, local_stats=stats_local,
                                 rngs=rngs)


def local_flow_condition_dim(summary_dim, encoder, num_globals):
    """The width of the local flow's condition: summary, group embedding and statistics,
    standardized globals, and their products with the group's row means."""
    return (summary_dim + encoder.out_features + encoder.stats_dim
            + num_globals * (1 + encoder.features))
