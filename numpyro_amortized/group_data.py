"""The data of each group of a hierarchical model, as rows tagged with their group.

A hierarchical guide (:class:`~numpyro_amortized.networks.HierarchicalPosterior`) summarizes
each group's data on its own, for that group's local latents. :class:`GroupLayout` reads them
from the model's values, in one of two ways that :func:`~numpyro_amortized.hierarchy.find_hierarchy`
tells apart:

- observed sites **inside the group plate** (eight schools' ``y``, a count per group, a
  ``(groups, n)`` block in a nested plate): one row per group, holding that group's values of
  every such site and of every array argument with one entry per group (``sigma``);
- observed sites in a flat plate **linked by an index argument** (``a[group]``): one row per
  observation, holding its values and the row's covariates (array arguments with one entry per
  observation; group-level arguments are gathered through the index), tagged with its group.

Rows beyond a dataset's size (``set_sizes``) are masked, as in the data plate.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.transforms import ExpTransform, IdentityTransform
from numpyro.handlers import condition

from numpyro_amortized.data import _read
from numpyro_amortized.design import covariate_values
from numpyro_amortized.hierarchy import _trace as model_trace
from numpyro_amortized.hierarchy import find_hierarchy

__all__ = ["GROUP_COUNT", "GroupLayout", "Groups", "encode_groups", "group_count", "group_setup",
           "local_affine", "local_indices", "pad_groups"]

GROUP_COUNT = "<groups>"  # the data-dict entry of each dataset's number of groups


class GroupLayout:
    """Encodes the group rows of a hierarchical model (see the module docstring).

    :param hierarchy: the model's :class:`~numpyro_amortized.hierarchy.Hierarchy`.
    :param structure: its :class:`~numpyro_amortized.simulation.ModelStructure`.
    :param trace: a trace of the model with its observed sites observed (for site shapes).
    :param arrays: the model's array arguments by name (:func:`covariate_values`).
    """

    def __init__(self, hierarchy, structure, trace, arrays):
        group = hierarchy.group
        self.plate, self.num_groups = group.name, group.size
        sites = {s.name: s for s in structure.observed}
        links = {group.index[name] for name in group.observed}
        if len(links) > 1:
            raise ValueError(
                f"The observations of plate '{group.name}' are linked to their groups in "
                f"several ways ({ {k: v or 'inside the plate' for k, v in group.index.items()} }); "
                "the hierarchical guide needs one: put them all inside the plate, or index them "
                "all by one argument. Or pass hierarchical=False.")
        self.index = links.pop()
        self.sites, self.axes = [], []
        self.row_plate, self.row_plate_size = group.name, group.size  # the plate rows are in
        for name in group.observed:
            site, value = trace[name], np.asarray(trace[name]["value"])
            batch_ndim = value.ndim - site["fn"].event_dim
            if self.index is None:
                axis = batch_ndim + next(f.dim for f in site["cond_indep_stack"]
                                     if f.name == group.name)
            elif batch_ndim != 1:
                raise ValueError(
                    f"Observed site '{name}' is indexed by '{self.index}' but has batch shape "
                    f"{value.shape[:batch_ndim]}: the hierarchical guide reads one row per "
                    "entry of a single plate. Flatten it into one plate, or pass "
                    "hierarchical=False.")
            else:
                axis = 0
                self.row_plate = site["cond_indep_stack"][0].name
                self.row_plate_size = value.shape[0]
            self.sites.append(sites[name])
            self.axes.append(axis)
        observed = {s.name for s in structure.observed}
        num_rows = arrays[self.index].shape[0] if self.index is not None else None
        aligned = lambda n: sorted(k for k, v in arrays.items() if k not in observed
                                   and k != self.index and np.shape(v)[0] == n)
        self.group_arguments = aligned(self.num_groups)
        self.row_arguments = aligned(num_rows) if self.index is not None else []
        if self.index is not None:  # an argument as long as both rows and groups: a row's
            self.group_arguments = [k for k in self.group_arguments
                                    if k not in self.row_arguments]
        self.arguments = ([self.index] if self.index is not None else []) + sorted(
            set(self.group_arguments) | set(self.row_arguments))
        # a row's leading features are its observations, then its own covariates (index-linked)
        self.response_features = sum(int(np.size(trace[s.name]["value"]))
                                     // np.shape(trace[s.name]["value"])[a]
                                     for s, a in zip(self.sites, self.axes, strict=True))
        self.covariate_features = sum(int(np.size(arrays[k])) // num_rows
                                      for k in self.row_arguments)
        self.row_features = self.encode(
            {k: jnp.asarray(v)[None] for k, v in {
                **{s.name: trace[s.name]["value"] for s in self.sites},
                **{k: arrays[k] for k in self.arguments}}.items()})[0].shape[-1]

    def argument_values(self, model, args, kwargs) -> dict:
        """The array arguments the group rows read, by name."""
        values = covariate_values(model, args, kwargs)
        return {k: jnp.asarray(values[k]) for k in self.arguments}

    def encode(self, values: dict, mask=None, num_groups=None):
        """``(rows (B, R, F), group (B, R) int32, row mask (B, R))`` from observed values and
        :attr:`arguments`, each with a leading dataset axis ``B``.

        :param mask: ``(B, R)`` masks rows of an index-linked plate (the data plate's mask,
            padded); rows of groups inside the plate are padded to the trained group count.
        :param num_groups: ``(B,)`` groups per dataset (default: all the data's groups);
            the rows of groups beyond are masked: those groups have no data.
        """
        feats = []
        for site, axis in zip(self.sites, self.axes, strict=True):
            v = jnp.moveaxis(_read(site, values[site.name]), 1 + axis, 1)
            feats.append(jnp.reshape(v, v.shape[:2] + (-1,)))
        b, r = feats[0].shape[:2]
        as_rows = lambda k, n: jnp.reshape(values[k], (b, n, -1))
        if self.index is None:
            feats += [as_rows(k, r) for k in self.group_arguments]
            group = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (b, r))
        else:
            group = jnp.asarray(values[self.index], jnp.int32)
            feats += [as_rows(k, r) for k in self.row_arguments]
            feats += [jnp.take_along_axis(as_rows(k, values[k].shape[1]), group[..., None],
                                          axis=1) for k in self.group_arguments]
        rows = jnp.concatenate(feats, axis=-1).astype(jnp.result_type(float))
        if mask is None:
            size = max(r, self.num_groups) if self.index is None else r
            mask = jnp.broadcast_to(jnp.arange(size) < r, (b, size))
        size = mask.shape[1]
        pad = lambda x: jnp.pad(x, [(0, 0), (0, size - r)] + [(0, 0)] * (x.ndim - 2))
        rows, group = pad(rows), pad(group)
        if num_groups is None:
            num_groups = jnp.full((b,), r if self.index is None else self.num_groups)
        present = jnp.arange(self.num_groups) < jnp.asarray(num_groups)[:, None]
        mask = mask & jnp.take_along_axis(present, group, axis=1)
        return jnp.where(mask[..., None], rows, 0.0), group, mask

    def check_groups(self, values: dict, batch_ndim: int = 0):
        """Raise a clear error for data with more groups than the guide was built for."""
        if self.index is None:
            site, axis = self.sites[0], self.axes[0]
            n = np.shape(values[site.name])[batch_ndim + axis]
        else:
            index = values[self.index]
            if isinstance(index, jax.core.Tracer) or np.size(index) == 0:
                return
            n = int(np.max(np.asarray(index))) + 1
        if n > self.num_groups:
            raise ValueError(
                f"The data have {n} groups in plate '{self.plate}' but the guide was built for "
                f"at most {self.num_groups}: set the guide up with the largest number of groups "
                "(and num_groups=(min, max) to train on fewer).")


class Groups(NamedTuple):
    """A hierarchical guide's groups: the :class:`GroupLayout`, the positions of the global
    ``(Dg,)`` and local ``(J, Dl)`` latents in the flat vector, each local site's group axis,
    and whether other observations (not in any group) feed the summary network too; then each
    local column's prior location and log scale as positions in the globals
    (:func:`local_affine`)."""

    layout: GroupLayout
    global_idx: np.ndarray
    local_idx: np.ndarray
    local_axes: dict
    other_data: bool
    local_affine: tuple


def local_indices(latent_layout, hierarchy, trace):
    """``(global (Dg,), local (J, Dl), axes)``: the positions of the global latents and of each
    group's local latents in the guide's flat unconstrained vector, and each local site's group
    axis."""
    group, start = hierarchy.group, 0
    glob, local, axes = [], [], {}
    for site, size in zip(latent_layout.sites, latent_layout.sizes, strict=True):
        idx = np.arange(start, start + size).reshape(site.unconstrained_shape)
        start += size
        if site.name not in group.local:
            glob.append(idx.reshape(-1))
            continue
        tr = trace[site.name]
        axis = np.ndim(tr["value"]) - tr["fn"].event_dim + group.dim
        axes[site.name] = axis
        local.append(np.moveaxis(idx, axis, 0).reshape(group.size, -1))
    return (np.concatenate(glob) if glob else np.zeros(0, int),
            np.concatenate(local, axis=1), axes)


def group_setup(model, args, kwargs, structure, latent_layout, *, option="auto", rng_key=None,
                set_sizes=None, num_groups=None):
    """The :class:`Groups` of a hierarchical guide of ``model``, or ``None`` when the guide is
    not factorized over groups.

    :param option: ``"auto"`` factorizes a two-level hierarchy (:func:`find_hierarchy`) and
        warns, keeping one joint flow, where the model has a group plate the factorized guide
        cannot read; ``True`` raises there instead; ``False`` never factorizes.
    """
    if option is False:
        if num_groups is not None:
            raise ValueError("num_groups was given with hierarchical=False.")
        return None
    tr = model_trace(model, rng_key, args, kwargs)
    values = {s.name: tr[s.name]["value"] for s in structure.observed}
    conditioned = functools.wraps(model)(
        lambda *a, **k: condition(model, data=values)(*a, **k))
    try:
        hierarchy = find_hierarchy(conditioned, *args, rng_key=rng_key, **kwargs)
        if not hierarchy.hierarchical:
            if option is True or num_groups is not None:
                raise ValueError("hierarchical=True, but no latent site of the model is inside "
                                 "a plate: there are no groups to factorize over.")
            return None
        if not hierarchy.global_latents or not hierarchy.group.observed:
            raise ValueError(
                f"The latents of plate '{hierarchy.group.name}' have "
                + ("no global latents above them" if not hierarchy.global_latents
                   else "no observations in their groups") + ".")
        layout = GroupLayout(hierarchy, structure, tr, covariate_values(model, args, kwargs))
        if set_sizes is not None and layout.index is None and structure.data_plate is not None:
            raise ValueError(
                f"set_sizes varies the size of plate '{structure.data_plate}', inside the groups "
                f"of plate '{hierarchy.group.name}': the factorized guide reads fixed-size groups.")
    except ValueError as err:
        if option is True or num_groups is not None:
            raise
        warnings.warn(
            f"The model has latents inside a plate, but the guide cannot factorize over its "
            f"groups ({err}); it treats all latents as one joint vector, which loses accuracy as "
            "groups are added. Pass hierarchical=False to silence this.",
            UserWarning, stacklevel=5)
        return None
    lo, hi = num_groups or (layout.num_groups,) * 2
    if not 1 <= lo <= hi or hi != layout.num_groups:
        raise ValueError(
            f"num_groups={num_groups}: need 1 <= min <= max, and max equal to the size of plate "
            f"'{layout.plate}' in the arguments ({layout.num_groups}). Set the guide up with the "
            "largest number of groups.")
    other = ({s.name for s in structure.observed} - set(hierarchy.group.observed)) | (
        {c.name for c in structure.covariates} - set(layout.arguments))
    gidx, lidx, axes = local_indices(latent_layout, hierarchy, tr)
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    traces = (tr, model_trace(model, jax.random.fold_in(key, 1), args, kwargs))
    return Groups(layout, gidx, lidx, axes, bool(other),
                  local_affine(latent_layout, traces, gidx, axes))


_LOCATION_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace, dist.Logistic,
                   dist.Gumbel)


def _location_scale(fn):
    """The base location-scale family of a site's distribution, or ``None``."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn if isinstance(fn, _LOCATION_SCALE) else None


def local_affine(latent_layout, traces, global_idx, local_axes):
    """``(loc, scale)``, each ``(Dl,)``: for every column of a group's locals, the position in
    the globals of the local prior's location (a real global) and of its scale (a positive
    global, whose unconstrained value is the log scale), or ``-1``.

    A local ``a_j ~ Normal(a_bar, sigma)`` (any location-scale family on the reals whose
    location and scale are global latents, in every group and in each of ``traces``) is then
    modelled by the guide standardized by its approximate posterior given the globals
    (:class:`~numpyro_amortized.networks.HierarchicalPosterior`): non-centred where ``sigma``
    is small, centred where the data dominate.
    """
    kinds = np.concatenate([np.full(size, 1 if isinstance(t, IdentityTransform) else
                                    2 if isinstance(t, ExpTransform) else 0)
                            for t, size in zip(latent_layout.transforms, latent_layout.sizes,
                                               strict=True)])[global_idx]
    found = []
    for kind, attr, fn in ((1, "loc", np.asarray), (2, "scale", np.log)):
        cols = []
        for tr in traces:
            u = np.asarray(latent_layout.unconstrain(
                {s.name: tr[s.name]["value"] for s in latent_layout.sites}))[global_idx]
            parts = []
            for s, t in zip(latent_layout.sites, latent_layout.transforms, strict=True):
                if s.name not in local_axes:
                    continue
                axis, base = local_axes[s.name], _location_scale(tr[s.name]["fn"])
                shape = s.unconstrained_shape
                if base is None or not isinstance(t, IdentityTransform):
                    parts.append(np.full((shape[axis], math.prod(shape) // shape[axis]), np.nan))
                    continue
                v = np.broadcast_to(fn(np.asarray(getattr(base, attr), np.float64)), shape)
                parts.append(np.moveaxis(v, axis, 0).reshape(shape[axis], -1))
            v = np.concatenate(parts, axis=1)  # (J, Dl)
            cols.append(np.all(np.abs(v[..., None] - u) <= 1e-5 * (1 + np.abs(u)), axis=0)
                        & (kinds == kind))  # (Dl, Dg)
        match = np.logical_and.reduce(cols)
        found.append(np.where(match.any(1), match.argmax(1), -1))
    return tuple(tuple(int(i) for i in f) for f in found)


def encode_groups(layout, batch, data, n):
    """``batch`` with the group rows of ``data`` (leading dataset axis) added; ``n`` is the
    data plate's size in ``data``, whose mask index-linked rows share."""
    rows = data[layout.index].shape[1] if layout.index is not None else None
    mask = batch.mask if batch.mask is not None and rows == n else None
    encoded = layout.encode(data, mask, data.get(GROUP_COUNT))
    return batch._replace(**dict(zip(
        ("group_rows", "group_index", "group_mask"), encoded, strict=True)))


def pad_groups(layout, data):
    """``data`` with the sites inside the group plate padded (zeros) to the trained number of
    groups along it, so the flat encoding keeps its size; the padding is never read (the
    summary of a hierarchical guide comes from the group rows)."""
    if layout.index is not None:
        return data
    out = dict(data)
    for site, axis in zip(layout.sites, layout.axes, strict=True):
        v = jnp.asarray(data[site.name])
        missing = layout.num_groups - v.shape[1 + axis]
        if missing > 0:
            out[site.name] = jnp.pad(v, [(0, missing) if i == 1 + axis else (0, 0)
                                         for i in range(v.ndim)])
    return out


def group_count(model, args, kwargs, plate):
    """The size of ``plate`` when ``model`` runs with ``args``/``kwargs`` (one trace)."""
    tr = model_trace(model, jax.random.PRNGKey(0), args, kwargs)
    return next(int(s["args"][0]) for s in tr.values()
                if s["type"] == "plate" and s["name"] == plate)
