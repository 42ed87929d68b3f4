"""Summary networks: a dataset of any size in, a fixed-length vector out.

Every summary network is an ``nnx.Module`` built as ``Net(spec, *, ..., rngs)`` from a
:class:`~numpyro_amortized.data.DataSpec`, called on a :class:`~numpyro_amortized.data.DataBatch`
(already standardized), and exposes ``summary_dim``. Pass a class or a
``functools.partial`` of one to :class:`~numpyro_amortized.AutoAmortizedFlow`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.data import DataBatch, DataSpec
from numpyro_amortized.networks.layers import (
    MLP,
    host_lecun_normal,
    least_squares,
    masked_moments,
    summarize_sets,
)

__all__ = ["DeepSet", "Identity", "LinearSummary", "MLPSummary"]


def _flatten_all(data: DataBatch):
    parts = []
    if data.set is not None:
        b = data.set.shape[0]
        parts.append(jnp.reshape(data.set, (b, -1)))
    if data.flat is not None:
        parts.append(data.flat)
    return jnp.concatenate(parts, axis=-1)


class Identity(nnx.Module):
    """The (standardized) data themselves are the summary: for small fixed-size data.

    **Example**::

        guide = AutoAmortizedFlow(model, summary_net=Identity)
    """

    accepts_variable_size = False

    def __init__(self, spec: DataSpec, *, rngs: nnx.Rngs | None = None):
        self.summary_dim = spec.set_features * spec.max_set_size + spec.flat_features

    def __call__(self, data: DataBatch):
        return _flatten_all(data)


class LinearSummary(nnx.Module):
    """A learned linear projection of the flattened data: for fixed-size data whose sufficient
    statistics are linear in it (a GLM's ``X^T y``, counts, sums), where an MLP would over-fit a
    small simulation budget.

    :param spec: the data sizes.
    :param summary_dim: length of the summary vector (at least the number of statistics).

    **Example**::

        guide = AutoAmortizedFlow(glm, summary_net=partial(LinearSummary, summary_dim=10))
    """

    accepts_variable_size = False

    def __init__(self, spec: DataSpec, *, summary_dim=16, rngs: nnx.Rngs):
        in_features = spec.set_features * spec.max_set_size + spec.flat_features
        self.linear = nnx.Linear(in_features, summary_dim, kernel_init=host_lecun_normal(), rngs=rngs)
        self.summary_dim = summary_dim

    def __call__(self, data: DataBatch):
        return self.linear(_flatten_all(data))


class MLPSummary(nnx.Module):
    """An MLP on the flattened data: for fixed-size data.

    :param spec: the data sizes.
    :param summary_dim: length of the summary vector.
    :param hidden: hidden layer widths.

    **Example**::

        guide = AutoAmortizedFlow(model, summary_net=partial(MLPSummary, summary_dim=16))
    """

    accepts_variable_size = False

    def __init__(self, spec: DataSpec, *, summary_dim=32, hidden=(128, 128), rngs: nnx.Rngs):
        in_features = spec.set_features * spec.max_set_size + spec.flat_features
        self.net = MLP(in_features, hidden, summary_dim, rngs=rngs)
        self.summary_dim = summary_dim

    def __call__(self, data: DataBatch):
        return self.net(_flatten_all(data))


class DeepSet(nnx.Module):
    """A masked DeepSet for exchangeable observations (Zaheer et al. 2017).

    With ``moments=True`` (default) each dataset is first standardized by its own masked mean
    and sd per feature; those means and log-sds, and the correlations between features (for up
    to 16 features), are passed to the outer network exactly, and the inner network sees the
    within-dataset standardized observations. This keeps within-dataset
    structure (a residual scale, a correlation) visible when datasets differ a lot in location
    and scale. Where the rows carry covariates (``spec.set_covariates``, up to
    ``max_regressors`` of them), each response's least-squares fit on them (coefficients, log
    residual sd, log standard errors; :func:`~numpyro_amortized.networks.layers.least_squares`)
    goes to the outer network too: an informative dataset's posterior sits where that fit
    does, to a precision that pooled moments and correlations cannot carry. Each observation
    then goes through an inner MLP; the masked mean over
    observations, ``log n`` and any fixed-size data go through an outer MLP. Padding (mask
    ``False``) never changes the output, so one network serves datasets of every size.

    :param spec: the data sizes.
    :param summary_dim: length of the summary vector.
    :param hidden: width of both MLPs.
    :param depth: hidden layers per MLP.
    :param moments: pool the per-dataset mean and sd of each feature too (see above).
    :param max_regressors: fit the responses on the covariates when there are at most this
        many covariate features (0: never).

    **References:** Zaheer et al. (2017), *Deep Sets*, NeurIPS.

    **Example**::

        guide = AutoAmortizedFlow(model, summary_net=partial(DeepSet, summary_dim=16))
    """

    accepts_variable_size = True

    def __init__(self, spec: DataSpec, *, summary_dim=32, hidden=64, depth=2, moments=True,
                 max_regressors=8, rngs: nnx.Rngs):
        if spec.set_features == 0:
            raise ValueError("DeepSet needs observations in a plate; use MLPSummary instead.")
        f, k = spec.set_features, spec.set_covariates
        self.moments, self.width = moments, hidden
        self.inner = MLP(f, (hidden,) * depth, hidden, rngs=rngs)
        self.num_corr = f * (f - 1) // 2 if moments and f <= 16 else 0
        self.responses = f - k if 0 < k <= max_regressors and k < f <= 16 else 0
        outer_in = (hidden + 1 + spec.flat_features + (2 * f + self.num_corr if moments else 0)
                    + (self.responses * (k + 2) + k + 1 if self.responses else 0))
        self.outer = MLP(outer_in, (hidden,) * depth, summary_dim, rngs=rngs)
        self.summary_dim = summary_dim

    def __call__(self, data: DataBatch):
        return summarize_sets(self._set_features, self.outer, data, self.width)

    def _set_features(self, x, mask):
        """Each set's pooled inner network, ``log n``, moments and fits, ``(B, outer_in)``."""
        m = mask[..., None].astype(x.dtype)
        n_safe = jnp.maximum(jnp.sum(m, axis=-2), 1.0)
        parts = []
        if self.responses:
            total = lambda h: jnp.sum(h * jnp.reshape(m, m.shape + (1,) * (h.ndim - 3)), axis=1)
            parts += least_squares(x[..., :self.responses], x[..., self.responses:], total,
                                   n_safe)
        if self.moments:
            x, stats = masked_moments(x, mask, max_corr_features=16 if self.num_corr else 0)
            parts += stats
        h = jnp.sum(jax.nn.silu(self.inner(x)) * m, axis=-2)
        return jnp.concatenate([h / n_safe, jnp.log(n_safe)] + parts, axis=-1)


def default_summary_net(spec: DataSpec, *, time_series=False):
    """The summary network chosen when the user passes none.

    A plate of observations gets a :class:`DeepSet` (exchangeable observations), or a
    :class:`~numpyro_amortized.networks.TimeSeriesNet` when the guide is told the plate is a
    time axis (``time_series=True``); fixed-size data of at most 64 numbers are used as they
    are (:class:`Identity`), larger ones get an :class:`MLPSummary`.
    """
    if time_series:
        if spec.set_features == 0:
            raise ValueError(
                "time_series=True reads the observations of the data plate as a series, but the "
                "model has no plate of observations. Put the time points in a "
                "numpyro.plate (observations conditionally independent given the latents).")
        from numpyro_amortized.networks.structured import TimeSeriesNet

        return TimeSeriesNet
    if spec.set_features > 0:
        return DeepSet
    if spec.flat_features <= 64:
        return Identity
    return MLPSummary

