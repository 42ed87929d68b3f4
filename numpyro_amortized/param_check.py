"""Parameters checked against a guide's networks before use: a clear error, never a silent
sample from the wrong weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_params"]


def check_params(params, init_params, structure, param_name):
    """Raise a ``ValueError`` naming what differs when the pure dict ``params`` does not fit
    the networks whose initial parameters are ``init_params`` (tree ``structure``)."""
    if jax.tree.structure(params) != structure:
        want = {jax.tree_util.keystr(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(init_params)[0]}
        got = {jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]}
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(
            f"The parameters do not fit this guide's networks (missing: {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}; unexpected: {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}). Pass the parameters this guide was trained "
            f"with: fit(...).params, or svi.get_params(state) with the '{param_name}' "
            "entry."
        )
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(init_params), strict=True):
        if jnp.shape(got) != jnp.shape(want):
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(got)}; this "
                f"guide's networks need {jnp.shape(want)}. Pass the parameters this guide "
                "was trained with."
            )
