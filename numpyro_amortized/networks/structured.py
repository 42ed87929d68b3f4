"""Summary networks for structured data: a set transformer and a time-series network.

Both take the masked set of a :class:`~numpyro_amortized.data.DataBatch` (observations in the
data plate, padded to the largest size) and ignore the padding exactly, so one network, compiled
once, serves datasets of every size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.data import DataBatch, DataSpec
from numpyro_amortized.networks.layers import (
    MLP,
    host_lecun_normal,
    masked_moments,
    summarize_sets,
)

__all__ = ["SetTransformer", "TimeSeriesNet"]


class _MAB(nnx.Module):
    """Multi-head attention block (pre-norm): ``h = q + Att(q, k); h + MLP(h)``."""

    def __init__(self, dim, num_heads, *, rngs):
        self.norm_q = nnx.LayerNorm(dim, rngs=rngs)
        self.norm_k = nnx.LayerNorm(dim, rngs=rngs)
        self.norm_h = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads, dim, decode=False, deterministic=True,
                                                rngs=rngs)
        self.mlp = MLP(dim, (dim,), dim, rngs=rngs)

    def __call__(self, q, k, key_mask=None):
        mask = None
        if key_mask is not None:  # (B, Nk) -> (B, 1 head, 1 query, Nk)
            mask = key_mask[..., None, None, :]
        h = q + self.attention(self.norm_q(q), self.norm_k(k), mask=mask)
        return h + self.mlp(self.norm_h(h))


class SetTransformer(nnx.Module):
    """A masked set transformer for exchangeable observations (Lee et al. 2019).

    Observations are embedded, pass ``num_blocks`` induced-set attention blocks (ISAB: attention
    from ``num_inducing`` learned points to the set and back, linear in the set size), and are
    pooled by attention from ``num_seeds`` learned seeds (PMA). Padding is masked out of every
    attention over the set, so it never changes the output. As in
    :class:`~numpyro_amortized.networks.DeepSet`, the per-dataset means, log-sds and correlations
    of the features are passed on exactly (``moments=True``), with ``log n``.

    :param spec: the data sizes.
    :param summary_dim: length of the summary vector.
    :param dim: width of the attention blocks (the cost grows with its square; the default
        is sized for CPUs, raise it on accelerators or for complex sets).
    :param num_heads: attention heads.
    :param num_inducing: inducing points per ISAB.
    :param num_blocks: ISAB blocks.
    :param num_seeds: PMA seeds (their outputs are concatenated).
    :param moments: pass the per-dataset moments on (see above).

    **References:** Lee et al. (2019), *Set Transformer: A Framework for Attention-based
    Permutation-Invariant Neural Networks*, ICML.

    **Example**::

        guide = AutoAmortizedFlow(model, summary_net=partial(SetTransformer, summary_dim=16))
    """

    accepts_variable_size = True

    def __init__(self, spec: DataSpec, *, summary_dim=32, dim=32, num_heads=4, num_inducing=8,
                 num_blocks=1, num_seeds=1, moments=True, rngs: nnx.Rngs):
        if spec.set_features == 0:
            raise ValueError("SetTransformer needs observations in a plate; use MLPSummary "
                             "instead.")
        f = spec.set_features
        self.moments = moments
        self.width = max(dim, num_heads * num_inducing)  # embeddings; attention to the rows
        self.embed = nnx.Linear(f, dim, kernel_init=host_lecun_normal(), rngs=rngs)
        init = jax.nn.initializers.normal(1.0)
        self.inducing = nnx.List([
            nnx.Param(init(rngs.params(), (num_inducing, dim))) for _ in range(num_blocks)])
        self.to_inducing = nnx.List([_MAB(dim, num_heads, rngs=rngs) for _ in range(num_blocks)])
        self.from_inducing = nnx.List([_MAB(dim, num_heads, rngs=rngs)
                                       for _ in range(num_blocks)])
        self.seeds = nnx.Param(init(rngs.params(), (num_seeds, dim)))
        self.pool = _MAB(dim, num_heads, rngs=rngs)
        self.num_corr = f * (f - 1) // 2 if moments and f <= 16 else 0
        outer_in = num_seeds * dim + 1 + spec.flat_features + (
            2 * f + self.num_corr if moments else 0)
        self.outer = MLP(outer_in, (dim, dim), summary_dim, rngs=rngs)
        self.summary_dim = summary_dim

    def __call__(self, data: DataBatch):
        return summarize_sets(self._set_features, self.outer, data, self.width)

    def _set_features(self, x, mask):
        """Each set's pooled attention output, ``log n`` and moments."""
        n_safe = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True).astype(x.dtype), 1.0)
        parts = [jnp.log(n_safe)]
        if self.moments:
            x, stats = masked_moments(x, mask, max_corr_features=16 if self.num_corr else 0)
            parts += stats
        batch = x.shape[:-2]
        h = self.embed(x)
        for inducing, down, up in zip(self.inducing, self.to_inducing, self.from_inducing,
                                      strict=True):
            points = jnp.broadcast_to(inducing[...], batch + inducing.shape)
            summary = down(points, h, key_mask=mask)
            h = up(h, summary)
        seeds = jnp.broadcast_to(self.seeds[...], batch + self.seeds.shape)
        pooled = self.pool(seeds, h, key_mask=mask)
        return jnp.concatenate([pooled.reshape(batch + (-1,))] + parts, axis=-1)


def _causal_shift(h, steps):
    """``h`` (..., T, C) delayed by ``steps`` along time, zeros first: position ``t`` gets
    ``h[t - steps]``, so nothing after ``t`` ever reaches it."""
    if steps == 0:
        return h
    pad = [(0, 0)] * (h.ndim - 2) + [(steps, 0), (0, 0)]
    return jnp.pad(h, pad)[..., : h.shape[-2], :]


class TimeSeriesNet(nnx.Module):
    """A summary network for time series of varying length.

    The observations in the data plate are read in order as a series (the plate is the time
    axis); a series of ``n`` points is padded at the end. A stack of causal dilated
    convolutions (a temporal convolutional network: layer ``l`` looks ``2**l`` steps apart, so
    four layers of width 3 see 31 steps) turns each step into features of itself and its past;
    since no step sees the future, the padding never reaches a real step. The features at each
    series' own last step and their masked mean over time, with ``log n`` and any fixed-size
    data, go through an MLP. There is no loop over time: the whole network is a few matrix
    products, fast inside the jitted training step.

    :param spec: the data sizes.
    :param summary_dim: length of the summary vector.
    :param channels: features per time step.
    :param kernel_size: taps per convolution.
    :param num_layers: convolution layers (dilations 1, 2, 4, ...).

    **References:** Bai, Kolter & Koltun (2018), *An Empirical Evaluation of Generic
    Convolutional and Recurrent Networks for Sequence Modeling*.

    **Example**::

        guide = AutoAmortizedFlow(model, time_series=True, set_sizes=(20, 100))
    """

    accepts_variable_size = True

    def __init__(self, spec: DataSpec, *, summary_dim=32, channels=64, kernel_size=3,
                 num_layers=4, rngs: nnx.Rngs):
        if spec.set_features == 0:
            raise ValueError("TimeSeriesNet reads the observations of a plate as a series; the "
                             "model has none. Use MLPSummary for fixed-size data.")
        f = spec.set_features + 2  # the time t / T_max and the mask as extra features
        self.time_scale = float(spec.max_set_size)
        self.kernel_size = kernel_size
        self.dilations = tuple(2 ** i for i in range(num_layers))
        self.input = nnx.Linear(f, channels, kernel_init=host_lecun_normal(), rngs=rngs)
        self.convs = nnx.List([nnx.Linear(kernel_size * channels, channels,
                                              kernel_init=host_lecun_normal(), rngs=rngs)
                               for _ in self.dilations])
        self.outer = MLP(2 * channels + 1 + spec.flat_features, (channels, channels),
                         summary_dim, rngs=rngs)
        self.summary_dim = summary_dim

    def __call__(self, data: DataBatch):
        width = self.kernel_size * self.input.out_features  # the convolutions' inputs
        return summarize_sets(self._set_features, self.outer, data, width)

    def _set_features(self, x, mask):
        """Each series' features at its last step, their mean over time and ``log n``."""
        batch, steps = x.shape[:-2], x.shape[-2]
        m = mask[..., None].astype(x.dtype)
        t = jnp.broadcast_to(jnp.arange(steps)[:, None] / self.time_scale, batch + (steps, 1))
        h = self.input(jnp.concatenate([x * m, t, m], axis=-1))
        for conv, d in zip(self.convs, self.dilations, strict=True):
            taps = [_causal_shift(h, j * d) for j in range(self.kernel_size)]
            h = h + jax.nn.silu(conv(jnp.concatenate(taps, axis=-1)))
        n = jnp.sum(mask, axis=-1)
        last = jnp.take_along_axis(h, jnp.maximum(n - 1, 0)[..., None, None], axis=-2)[..., 0, :]
        n_safe = jnp.maximum(n.astype(x.dtype), 1.0)[..., None]
        pooled = jnp.sum(h * m, axis=-2) / n_safe
        return jnp.concatenate([last, pooled, jnp.log(n_safe)], axis=-1)
