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
import warnings

import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.handlers import block, condition, seed, trace

from numpyro_amortized.data import _read
from numpyro_amortized.design import covariate_values
from numpyro_amortized.hierarchy import find_hierarchy

__all__ = ["GroupLayout", "group_setup", "local_indices"]


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
        self.row_features = self.encode(
            {k: jnp.asarray(v)[None] for k, v in {
                **{s.name: trace[s.name]["value"] for s in self.sites},
                **{k: arrays[k] for k in self.arguments}}.items()})[0].shape[-1]

    def argument_values(self, model, args, kwargs) -> dict:
        """The array arguments the group rows read, by name."""
        values = covariate_values(model, args, kwargs)
        return {k: jnp.asarray(values[k]) for k in self.arguments}

    def encode(self, values: dict, mask=None):
        """``(rows (B, R, F), group (B, R) int32, row mask (B, R))`` from observed values and
        :attr:`arguments`, each with a leading dataset axis ``B``; ``mask`` ``(B, R)`` masks
        rows of an index-linked plate (the data plate's mask, padded)."""
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
            feats += [jnp.take_along_axis(as_rows(k, self.num_groups), group[..., None], axis=1)
                      for k in self.group_arguments]
        rows = jnp.concatenate(feats, axis=-1).astype(jnp.result_type(float))
        if mask is None:
            mask = jnp.ones((b, r), bool)
        size = mask.shape[1]
        pad = lambda x: jnp.pad(x, [(0, 0), (0, size - r)] + [(0, 0)] * (x.ndim - 2))
        rows, group = pad(rows), pad(group)
        return jnp.where(mask[..., None], rows, 0.0), group, mask


def local_indices(latent_layout, hierarchy, trace):
    """``(global (Dg,), local (J, Dl))``: the positions of the global latents and of each
    group's local latents in the guide's flat unconstrained vector."""
    group, start = hierarchy.group, 0
    glob, local = [], []
    for site, size in zip(latent_layout.sites, latent_layout.sizes, strict=True):
        idx = np.arange(start, start + size).reshape(site.unconstrained_shape)
        start += size
        if site.name not in group.local:
            glob.append(idx.reshape(-1))
            continue
        tr = trace[site.name]
        axis = np.ndim(tr["value"]) - tr["fn"].event_dim + group.dim
        local.append(np.moveaxis(idx, axis, 0).reshape(group.size, -1))
    return (np.concatenate(glob) if glob else np.zeros(0, int),
            np.concatenate(local, axis=1))


def group_setup(model, args, kwargs, structure, latent_layout, *, option="auto", rng_key=None,
                set_sizes=None):
    """``(GroupLayout, global positions, local positions)`` for a hierarchical guide of
    ``model``, or ``None`` when the guide is not factorized over groups.

    :param option: ``"auto"`` factorizes a two-level hierarchy (:func:`find_hierarchy`) and
        warns, keeping one joint flow, where the model has a group plate the factorized guide
        cannot read; ``True`` raises there instead; ``False`` never factorizes.
    """
    if option is False:
        return None
    with block(), numpyro.validation_enabled(False):
        tr = trace(seed(model, rng_key)).get_trace(*args, **kwargs)
    values = {s.name: tr[s.name]["value"] for s in structure.observed}
    conditioned = functools.wraps(model)(
        lambda *a, **k: condition(model, data=values)(*a, **k))
    try:
        hierarchy = find_hierarchy(conditioned, *args, rng_key=rng_key, **kwargs)
        if not hierarchy.hierarchical:
            if option is True:
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
        if option is True:
            raise
        warnings.warn(
            f"The model has latents inside a plate, but the guide cannot factorize over its "
            f"groups ({err}); it treats all latents as one joint vector, which loses accuracy as "
            "groups are added. Pass hierarchical=False to silence this.",
            UserWarning, stacklevel=5)
        return None
    global_idx, local_idx = local_indices(latent_layout, hierarchy, tr)
    return layout, global_idx, local_idx
