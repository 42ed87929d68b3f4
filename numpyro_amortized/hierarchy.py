"""A model's hierarchy, read from its plates: global latents, local latents per group, and
which observations belong to which group.

A hierarchical NumPyro model puts group effects inside a ``numpyro.plate`` and shared
hyperparameters outside every plate. :func:`find_hierarchy` finds

- the **global** latents (outside every plate) and the **group plate** (the plate that holds
  latents) with its **local** latents;
- for each observed site, how its values belong to groups: inside the group plate (possibly in
  a plate nested in it: the group axis is the plate's), or in a flat observation plate through
  an **index array** (``a[group]``). The index is read from the model itself: the log density of
  each observation depends on exactly one group's local values, so the pattern of non-zero
  derivatives (one forward-mode Jacobian on two prior draws) gives each row's group, and the
  model argument holding those values is the link. Where no argument holds them (an index
  computed inside the model) or several do, ``group_index={site: argument}`` names it.

What is not a two-level hierarchy is refused with an error naming the sites and plates: latents
in nested plates (three levels), latents in two different plates (crossed effects), and
observations whose density involves several groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.handlers import block, seed, substitute, trace

from numpyro_amortized.design import covariate_values

__all__ = ["GroupPlate", "Hierarchy", "find_hierarchy"]


class GroupPlate(NamedTuple):
    """The plate of a model's group effects.

    :param name: the plate's name; :param size: its size (the number of groups) in the traced
        arguments; :param dim: its ``dim``.
    :param local: the latent sites inside it, in model order.
    :param observed: the observed sites that belong to groups, in model order.
    :param index: observed site -> ``None`` when the site is inside the group plate, else the
        name of the model argument holding each of its rows' group (``a[group]``).
    """

    name: str
    size: int
    dim: int
    local: tuple
    observed: tuple
    index: dict


class Hierarchy(NamedTuple):
    """Global latents and the group plate (``None`` for a model with global latents only)."""

    global_latents: tuple
    group: GroupPlate | None

    @property
    def hierarchical(self) -> bool:
        return self.group is not None


def _trace(model, rng_key, args, kwargs, values=None):
    fn = seed(model, rng_key) if values is None else substitute(seed(model, rng_key), data=values)
    with block(), numpyro.validation_enabled(False):
        return trace(fn).get_trace(*args, **kwargs)


def _samples(tr):
    return [s for s in tr.values() if s["type"] == "sample"
            and not s.get("infer", {}).get("is_auxiliary", False)]


def find_hierarchy(model, *args, group_index=None, rng_key=None, **kwargs) -> Hierarchy:
    """The hierarchy of ``model`` called with ``*args, **kwargs`` (observed sites given).

    :param group_index: optional ``{observed site: argument name}``: the argument holding each
        row's group, for a site in a flat plate linked to groups by an index array the model
        cannot show (an index computed inside the model, or several arguments with its values).
    :param rng_key: the key of the two prior draws read (default ``PRNGKey(0)``).
    :return: a :class:`Hierarchy`.
    :raises ValueError: for latents in nested plates, latents in two plates, an observation
        that depends on several groups, or a group link that cannot be named.

    **Example**::

        def model(group, num_groups, y=None):
            mu = numpyro.sample("mu", dist.Normal(0, 5))
            with numpyro.plate("groups", num_groups):
                a = numpyro.sample("a", dist.Normal(mu, 1))
            with numpyro.plate("N", group.shape[0]):
                numpyro.sample("y", dist.Normal(a[group], 1), obs=y)

        h = find_hierarchy(model, group, 6, y=y)
        assert h.group.local == ("a",) and h.group.index == {"y": "group"}
    """
    group_index = dict(group_index or {})
    keys = jax.random.split(jax.random.PRNGKey(0) if rng_key is None else rng_key)
    tr = _trace(model, keys[0], args, kwargs)
    sites = _samples(tr)
    latents = [s for s in sites if not s["is_observed"]]
    observed = [s for s in sites if s["is_observed"]]
    unknown = set(group_index) - {s["name"] for s in observed}
    if unknown:
        raise ValueError(f"group_index names {sorted(unknown)}, which are not observed sites of "
                         f"the model; its observed sites are {[s['name'] for s in observed]}.")
    for s in latents:
        if len(s["cond_indep_stack"]) > 1:
            raise ValueError(
                f"Latent site '{s['name']}' is inside nested plates "
                f"{[f.name for f in reversed(s['cond_indep_stack'])]}: a hierarchy of more "
                "than two levels. The amortized guide supports global latents and local latents in one "
                "group plate; marginalize or flatten the inner level.")
    plates = {s["cond_indep_stack"][0].name: s["cond_indep_stack"][0]
              for s in latents if s["cond_indep_stack"]}
    global_latents = tuple(s["name"] for s in latents if not s["cond_indep_stack"])
    if not plates:
        return Hierarchy(global_latents, None)
    if len(plates) > 1:
        by_plate = {p: [s["name"] for s in latents if s["cond_indep_stack"]
                        and s["cond_indep_stack"][0].name == p] for p in plates}
        raise ValueError(
            f"Latent sites sit in several plates ({by_plate}): crossed or separate group "
            "effects. The amortized guide supports local latents in one group plate.")
    (name, frame), = plates.items()
    local = tuple(s["name"] for s in latents if s["cond_indep_stack"])
    inside, outside = [], []
    for s in observed:
        (inside if name in {f.name for f in s["cond_indep_stack"]} else outside).append(s)
    index = {s["name"]: None for s in inside}
    if outside:
        rows = _group_of_rows(model, keys, args, kwargs, tr, local, name, frame, outside)
        arrays = {k: np.asarray(v) for k, v in covariate_values(model, args, kwargs).items()
                  if jnp.issubdtype(jnp.result_type(v), jnp.integer) and np.ndim(v) == 1}
        for s in outside:
            if rows[s["name"]] is not None:
                index[s["name"]] = _link(s["name"], rows[s["name"]], arrays, group_index, name)
    group = GroupPlate(name, int(frame.size), int(frame.dim), local,
                       tuple(s["name"] for s in observed if s["name"] in index),
                       {k: index[k] for k in (s["name"] for s in observed) if k in index})
    return Hierarchy(global_latents, group)


def _group_of_rows(model, keys, args, kwargs, tr, local, plate, frame, sites):
    """Observed site -> each row's group (``None`` for a site that no local latent enters),
    from which local values each row's log density depends on, on two prior draws."""
    patterns = {s["name"]: None for s in sites}
    for key in keys:
        draw = _trace(model, key, args, kwargs)
        values = {k: s["value"] for k, s in draw.items() if s["type"] == "sample"}

        def log_densities(local_values, values=values, key=key):
            t = _trace(model, key, args, kwargs, {**values, **local_values})
            return {s["name"]: t[s["name"]]["fn"].log_prob(t[s["name"]]["value"])
                    for s in sites}

        jac = jax.jacfwd(log_densities)({k: values[k] for k in local})
        for s in sites:
            per_row = None
            for k in local:
                d = np.asarray(jac[s["name"]][k])  # (*site batch, *local shape)
                lat = tr[k]
                axis = np.ndim(lat["value"]) - lat["fn"].event_dim + frame.dim
                batch_ndim = d.ndim - np.ndim(lat["value"])
                d = np.moveaxis(d.reshape((-1,) + d.shape[batch_ndim:]), 1 + axis, 1)
                nz = np.abs(d.reshape(d.shape[0], d.shape[1], -1)).max(-1) > 0
                per_row = nz if per_row is None else per_row | nz
            prev = patterns[s["name"]]
            patterns[s["name"]] = per_row if prev is None else prev | per_row
    rows = {}
    for s in sites:
        nz = patterns[s["name"]]
        counts = nz.sum(1)
        if not counts.any():
            rows[s["name"]] = None  # the site depends on global latents only
            continue
        if (counts != 1).any():
            raise ValueError(
                f"Observed site '{s['name']}' is outside the group plate '{plate}', and the "
                f"density of some of its values depends on {int(counts.max())} groups' local "
                f"latents ({', '.join(local)}) or on none: each row must belong to exactly one "
                f"group (as in a[group]). Put the site inside plate '{plate}', or index it by "
                "one group per row.")
        rows[s["name"]] = nz.argmax(1)
    return rows


def _link(site, rows, arrays, group_index, plate):
    """The model argument holding ``rows`` (each row's group) for observed site ``site``."""
    matching = [k for k, v in arrays.items() if v.shape == rows.shape and np.array_equal(v, rows)]
    if site in group_index:
        declared = group_index[site]
        if declared not in matching:
            raise ValueError(
                f"group_index names '{declared}' for observed site '{site}', but the model "
                f"reads its rows' groups (plate '{plate}') from other values"
                + (f" (those of {matching})" if matching else "") + ".")
        return declared
    if len(matching) == 1:
        return matching[0]
    raise ValueError(
        f"Observed site '{site}' belongs to groups of plate '{plate}' through an index "
        + ("that no integer argument of the model holds (computed inside the model?); pass "
           "it as an argument" if not matching else
           f"that several arguments hold ({matching})")
        + f" and name it: group_index={{'{site}': '<argument>'}}.")
