"""The amortized posterior network: standardize the data, summarize it, condition the flow."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.data import DataBatch
from numpyro_amortized.networks.layers import Buffer, buffer_value, compress_tails

__all__ = ["AmortizedPosterior", "compress_tails"]


class AmortizedPosterior(nnx.Module):
    """``q(u | x) = flow(u | summary_net(standardize(x)))``.

    Standardizing centres and scales each data feature by the prior predictive's median and
    interquartile range, then compresses values beyond ``TAIL`` of those scales
    logarithmically (monotone, the identity below): one far outlier of a heavy-tailed
    likelihood then moves the summary a little instead of saturating it.

    :param summary_net: a summary network (``__call__(DataBatch) -> (B, summary_dim)``).
    :param flow: a conditional density over ``u``: ``log_prob(u, c)``,
        ``sample_and_log_prob(key, c, sample_shape)``, ``sample(key, c, sample_shape)``,
        ``training_log_prob(u, c, rng_key)`` (what NPE maximizes) and ``member_log_probs(u, c)`` (``(K, ...)`` for a mixture whose weights are
        fitted on held-out data, ``None`` otherwise), as
        :class:`~numpyro_amortized.networks.flows.ConditionalFlow` and
        :class:`~numpyro_amortized.networks.flows.FlowEnsemble` have.
    :param data_stats: ``(set_loc, set_scale, flat_loc, flat_scale)`` from prior simulations;
        entries are ``None`` where the data have no such part.
    """

    def __init__(self, summary_net, flow, data_stats):
        self.summary_net = summary_net
        self.flow = flow
        set_loc, set_scale, flat_loc, flat_scale = data_stats
        self.set_loc = Buffer(jnp.asarray(set_loc if set_loc is not None else jnp.zeros(0)))
        self.set_scale = Buffer(jnp.asarray(set_scale if set_scale is not None else jnp.ones(0)))
        self.flat_loc = Buffer(jnp.asarray(flat_loc if flat_loc is not None else jnp.zeros(0)))
        self.flat_scale = Buffer(
            jnp.asarray(flat_scale if flat_scale is not None else jnp.ones(0))
        )

    def embed(self, data: DataBatch):
        """Summary vectors ``(B, summary_dim)`` of a batch of datasets."""
        set_x, flat = data.set, data.flat
        if set_x is not None:
            z = compress_tails((set_x - buffer_value(self.set_loc)) / buffer_value(self.set_scale))
            set_x = jnp.where(data.mask[..., None], z, 0.0)
        if flat is not None:
            flat = compress_tails((flat - buffer_value(self.flat_loc))
                                  / buffer_value(self.flat_scale))
        return self.summary_net(DataBatch(set_x, data.mask, flat))

    def _condition(self, u, data: DataBatch):
        c = self.embed(data)
        return jnp.reshape(c, c.shape[:1] + (1,) * (u.ndim - 2) + c.shape[1:])

    def log_prob(self, u, data: DataBatch):
        """``log q(u | x)`` for ``u`` of shape ``(B, ..., D)`` (dataset axis first)."""
        return self.flow.log_prob(u, self._condition(u, data))

    def training_log_prob(self, u, data: DataBatch, rng_key=None):
        """What NPE maximizes: ``log q(u | x)``, for a flow ensemble the mean of its members'
        (each member is fitted on its own), for a flow-matching density minus its
        flow-matching loss (drawn from ``rng_key``)."""
        return self.flow.training_log_prob(u, self._condition(u, data), rng_key)

    def validation_log_prob(self, u, data: DataBatch, rng_key=None):
        """What :func:`~numpyro_amortized.fit` tracks on held-out simulations: ``log q(u | x)``
        (a flow-matching density: minus its flow-matching loss, drawn from ``rng_key``)."""
        return self.flow.validation_log_prob(u, self._condition(u, data), rng_key)

    def member_log_probs(self, u, data: DataBatch):
        """``(K, B, ...)`` log densities of a flow ensemble's K members (``None`` for one flow)."""
        return self.flow.member_log_probs(u, self._condition(u, data))

    def sample_and_log_prob(self, rng_key, data: DataBatch, sample_shape=()):
        """Samples ``(*sample_shape, B, D)`` and their ``log q``."""
        return self.flow.sample_and_log_prob(rng_key, self.embed(data), sample_shape)

    def sample(self, rng_key, data: DataBatch, sample_shape=()):
        """Samples ``(*sample_shape, B, D)`` only."""
        return self.flow.sample(rng_key, self.embed(data), sample_shape)
