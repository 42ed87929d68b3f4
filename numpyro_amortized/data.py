"""Observed sites -> the input of the summary network.

Observed sites inside the data plate become a *set*: one feature row per observation,
``(N, F)``, with a mask so that datasets of different sizes share one padded shape. Observed
sites outside the plate are flattened into one *flat* vector ``(G,)``. Sites whose
distribution has positive continuous support (LogNormal, Gamma, Exponential, ...) are read on the
log scale, unbounded counts (Poisson, negative binomial) as ``log(1 + y)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DataBatch", "DataLayout", "DataSpec", "Simulations", "pilot_statistics",
           "raw_counts"]


class DataSpec(NamedTuple):
    """Sizes of the network input: set features per observation, largest set, flat features,
    and how many of the set features (the last ones) are covariates rather than responses."""

    set_features: int
    max_set_size: int
    flat_features: int
    set_covariates: int = 0


class DataBatch(NamedTuple):
    """A batch of encoded datasets.

    :param set: ``(B, N, F)`` set-valued data (zeros where masked), or ``None``.
    :param mask: ``(B, N)`` booleans, ``True`` for real observations, or ``None``.
    :param flat: ``(B, G)`` fixed-size data, or ``None``.
    :param group_rows: ``(B, R, F)`` rows of a hierarchical model's groups, each tagged by
        ``group_index`` ``(B, R)`` and masked by ``group_mask`` ``(B, R)``
        (:class:`~numpyro_amortized.group_data.GroupLayout`), or ``None``.
    """

    set: jax.Array | None
    mask: jax.Array | None
    flat: jax.Array | None
    group_rows: jax.Array | None = None
    group_index: jax.Array | None = None
    group_mask: jax.Array | None = None

    @property
    def num_datasets(self) -> int:
        x = self.flat if self.flat is not None else self.set
        return x.shape[0]


class DataLayout:
    """Encodes a dict of observed values into a :class:`DataBatch` and checks shapes.

    :param observed: a sequence of :class:`~numpyro_amortized.simulation.ObservedSite`.
    :param max_set_size: size of the data plate in the traced model (the padded size).
    :param covariates: covariates read next to the observations (``ObservedSite`` too), after
        them.
    """

    def __init__(self, observed, max_set_size=None, covariates=()):
        self.sites = tuple(observed) + tuple(covariates)
        self.set_sites = tuple(s for s in self.sites if s.plate_axis is not None)
        self.flat_sites = tuple(s for s in self.sites if s.plate_axis is None)
        self.max_set_size = int(max_set_size or 0)
        width = lambda s: math.prod(s.shape) // s.shape[s.plate_axis] * max(1, s.categories)
        flat_features = sum(math.prod(s.shape) for s in self.flat_sites)
        self.spec = DataSpec(sum(map(width, self.set_sites)),
                             self.max_set_size if self.set_sites else 0, flat_features,
                             sum(width(s) for s in covariates if s.plate_axis is not None))

    def set_size(self, data: dict, batch_ndim: int = 0) -> int | None:
        """Number of observations in the data plate, checking all sites agree."""
        sizes = {s.name: data[s.name].shape[batch_ndim + s.plate_axis] for s in self.set_sites}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Observed sites disagree on the size of the data plate: {sizes}.")
        return next(iter(sizes.values()), None)

    def check(self, data: dict, batch_ndim: int = 0, allow_other_sizes: bool = True,
              any_shape=()):
        """Raise a clear error for missing sites, wrong shapes (but for sites in
        ``any_shape``), or non-finite values."""
        for s in self.sites:
            if s.name not in data or data[s.name] is None:
                raise ValueError(
                    f"No value for observed site '{s.name}'. The guide reads the data from the "
                    f"model's arguments: pass '{s.name}' as you would to the model."
                )
            if s.name in any_shape:
                continue
            shape = tuple(np.shape(data[s.name]))[batch_ndim:]
            expected = list(s.shape)
            if s.plate_axis is not None and allow_other_sizes and len(shape) == len(expected):
                expected[s.plate_axis] = shape[s.plate_axis]
            if shape != tuple(expected):
                extra = (
                    f" (any size along axis {s.plate_axis}, the data plate)"
                    if s.plate_axis is not None and allow_other_sizes else ""
                )
                raise ValueError(
                    f"Observed site '{s.name}' has shape {shape} but the guide was built for "
                    f"shape {tuple(s.shape)}{extra}. Pass data shaped like the data the guide "
                    "was trained on, or build and train a guide for this shape."
                )
        self.set_size(data, batch_ndim)
        for s in self.sites:
            value = data[s.name]
            if isinstance(value, jax.core.Tracer):
                continue
            value = np.asarray(value)
            bad = ~np.isfinite(value)
            if s.log_scale and not bad.any() and (value <= 0).any():
                first = tuple(int(i) for i in np.argwhere(value <= 0)[0])
                raise ValueError(
                    f"Observed site '{s.name}' has {int((value <= 0).sum())} value(s) <= 0, "
                    f"the first at index {first}, but its distribution only takes positive "
                    "values (the model gives such data zero probability). Check the data's "
                    "units and transformation, or model the site with a distribution on the "
                    "real line."
                )
            if s.counts and not bad.any():
                not_count = (value < 0) | (value != np.round(value))
                if not_count.any():
                    first = tuple(int(i) for i in np.argwhere(not_count)[0])
                    raise ValueError(
                        f"Observed site '{s.name}' has a value at index {first} that is not "
                        "a count (an integer >= 0), which its distribution gives zero "
                        "probability. Pass the counts themselves (not rates or transformed "
                        "values), or model the site with a continuous distribution.")
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"Observed site '{s.name}' has {int(bad.sum())} non-finite value(s) "
                    f"(NaN or infinity), the first at index {first}. Remove or impute them "
                    "before inference; the guide cannot condition on them."
                )

    def encode(self, data: dict, num_obs=None, pad_to: int | None = None) -> DataBatch:
        """Encode observed values with one leading dataset axis into a :class:`DataBatch`.

        :param data: observed values, each of shape ``(B, *site_shape)`` (the set size may be
            smaller than the trained maximum).
        :param num_obs: optional ``(B,)`` integer array: observations beyond it are padding.
        :param pad_to: set size to pad to (default: the trained maximum).
        """
        set_x = mask = flat = None
        if self.set_sites:
            rows = []
            for s in self.set_sites:
                v = jnp.moveaxis(_read(s, data[s.name]), 1 + s.plate_axis, 1)
                rows.append(jnp.reshape(v, v.shape[:2] + (-1,)))
            set_x = jnp.concatenate(rows, axis=-1).astype(jnp.result_type(float))
            b, n = set_x.shape[:2]
            size = max(n, pad_to or self.max_set_size)
            set_x = jnp.pad(set_x, ((0, 0), (0, size - n), (0, 0)))
            counts = jnp.full((b,), n) if num_obs is None else jnp.minimum(num_obs, n)
            mask = jnp.arange(size)[None, :] < jnp.asarray(counts)[:, None]
            set_x = jnp.where(mask[..., None], set_x, 0.0)
        if self.flat_sites:
            parts = [
                jnp.reshape(_read(s, data[s.name]), (-1, math.prod(s.shape)))
                for s in self.flat_sites
            ]
            flat = jnp.concatenate(parts, axis=-1).astype(jnp.result_type(float))
        return DataBatch(set_x, mask, flat)


def raw_counts(structure):
    """``structure`` with its counts read as they are: the rule of checkpoints written before
    counts were read as ``log(1 + y)`` (their statistics have no ``"log_counts"``)."""
    return structure._replace(observed=tuple(s._replace(counts=False) for s in structure.observed))


def _read(site, value):
    """A site's values as the summary network sees them: positive data on the log scale
    (spread over orders of magnitude, multiplicative noise), unbounded counts as
    ``log(1 + y)`` (for the same reasons; a log-linear model's fit is linear there), category
    indices one-hot, others as they are."""
    value = jnp.asarray(value)
    if site.categories:  # category indices: one-hot (an index beyond the categories: zeros)
        return jax.nn.one_hot(value, site.categories)
    if site.counts:
        return jnp.log1p(jnp.maximum(value.astype(jnp.result_type(float)), 0.0))
    if not site.log_scale:
        return value
    value = value.astype(jnp.result_type(float))
    return jnp.log(jnp.maximum(value, jnp.finfo(value.dtype).tiny))


class Simulations(NamedTuple):
    """A batch of prior-predictive simulations, ready for training.

    :param latents: constrained latent values by site, leading axis ``B``.
    :param u: ``(B, D)`` unconstrained latents.
    :param log_det: ``(B,)`` ``log|det d theta/d u|`` at ``u``.
    :param observed: observed values by site, leading axis ``B``.
    :param data: the encoded :class:`~numpyro_amortized.data.DataBatch`.
    :param num_obs: ``(B,)`` dataset sizes (``None`` without a data plate).
    :param valid: ``(B,)`` ``False`` where the simulation produced NaN or infinity (those
        entries are zeroed and must be left out of any loss).
    :param design: covariates drawn per simulation from a declared design, by argument name,
        leading axis ``B`` (empty without one): the model's arguments for that simulation.
    """

    latents: dict
    u: jax.Array
    log_det: jax.Array
    observed: dict
    data: DataBatch
    num_obs: jax.Array | None
    valid: jax.Array
    design: dict | None = None

    @classmethod
    def of(cls, latent_layout, latents, observed, data, num_obs, design):
        """Simulations from the model's draws (``latent_layout``: a
        :class:`~numpyro_amortized.transforms.LatentLayout`): those whose unconstrained latents
        or encoded data are not all finite are marked invalid and zeroed, so that they add
        nothing to a masked loss, and no NaN to its gradient."""
        u = latent_layout.unconstrain(latents)
        finite = [jnp.all(jnp.isfinite(u), axis=-1)]
        for x in (data.set, data.flat, data.group_rows):
            if x is not None:
                finite.append(jnp.all(jnp.isfinite(x.reshape(u.shape[0], -1)), axis=-1))
        valid = functools.reduce(jnp.logical_and, finite)
        clean = lambda x: jnp.where(jnp.reshape(valid, valid.shape + (1,) * (x.ndim - 1)), x,
                                    jnp.zeros((), x.dtype))
        u = clean(u)
        _, log_det = latent_layout.constrain(u)
        data = DataBatch(*(None if x is None else clean(x) for x in data))
        return cls(jax.tree.map(clean, latents), u, log_det, jax.tree.map(clean, observed), data,
                   num_obs, valid, design)


def pilot_statistics(pilot: Simulations):
    """Locations and scales of unconstrained latents and of data features, from valid
    simulations: medians and interquartile ranges (scaled to equal the sd of a normal), so
    that a heavy-tailed prior predictive (a Student-t likelihood, a Cauchy prior) does not
    shrink every typical dataset to zero; the sd where the quartiles coincide (a feature that
    is mostly one value)."""
    valid = np.asarray(pilot.valid)
    if valid.mean() < 0.5:
        raise ValueError(
            f"{int((~valid).sum())} of {valid.size} prior simulations produced NaN or infinity. "
            "Check the model's priors and likelihood for values outside their domain."
        )

    moments = lambda x, mask=None: _feature_moments(x, valid, mask)
    u_loc, u_scale = moments(pilot.u)
    set_stats = moments(pilot.data.set, pilot.data.mask) if pilot.data.set is not None else (None,) * 2
    flat_stats = moments(pilot.data.flat) if pilot.data.flat is not None else (None,) * 2
    stats = {"u_loc": u_loc, "u_scale": u_scale, "data": (*set_stats, *flat_stats),
             "log_counts": True}  # counts were read as log(1 + y) (see raw_counts)
    if pilot.data.group_rows is not None:
        stats["group"] = moments(pilot.data.group_rows, pilot.data.group_mask)
    return stats


def _feature_moments(x, valid, mask=None):
    """Robust location and scale of each feature (last axis) over valid simulations (and
    unmasked rows of set data, ``x`` ``(B, N, F)`` with ``mask`` ``(B, N)``)."""
    x = np.asarray(x, dtype=np.float64)
    w = valid.astype(float)
    if mask is not None:
        w = (np.asarray(mask) * w[:, None]).reshape(-1)
    x = x.reshape(-1, x.shape[-1])  # (rows, features)
    w = w / w.sum()
    q25, median, q75 = _weighted_quantiles(x, w, (0.25, 0.5, 0.75))
    sd = np.sqrt(np.einsum("i,i...->...", w, (x - np.einsum("i,i...->...", w, x)) ** 2))
    scale = np.where((q75 - q25) / 1.349 > 1e-8, (q75 - q25) / 1.349, sd)
    scale = np.where(scale > 1e-8, scale, 1.0)
    return median.astype(np.float32), scale.astype(np.float32)


def _weighted_quantiles(x, w, qs):
    """Quantiles ``qs`` of each column of ``x`` (N, F) under row weights ``w`` (sum 1) that are
    equal where they are not zero (valid, unmasked rows): for each ``q`` the first value in
    sorted order whose cumulative weight reaches ``q``, found by a partition of each column
    (linear in the rows, where a sort is not)."""
    kept = x[w > 0]
    cw = np.cumsum(w[w > 0])  # the same partial sums as over the sorted rows
    ks = [min(int(np.count_nonzero(cw < q)), len(kept) - 1) for q in qs]
    columns = np.partition(np.ascontiguousarray(kept.T), sorted(set(ks)), axis=1)
    return [columns[:, k] for k in ks]
