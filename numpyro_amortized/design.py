"""Covariates: the model's arguments that the summary network reads besides the observations,
and the checks that data fit what the guide was trained on.

An array argument with one row per observation of the data plate (a design matrix, a group
index, exposures) is a covariate: the network reads it row by row next to the responses (an
index vector one-hot). Training simulates with the values given at set-up (the design), or,
with a declared design (``AutoAmortizedFlow(model, design=...)``), with covariates drawn
anew for every simulation; without one, other values at sampling time are an extrapolation and
warn. A model whose rows differ without a covariate saying how cannot be summarized by pooling
its rows, and warns at set-up.
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["categories_of", "covariate_values", "draw_designs", "row_differences",
           "warn_other_design", "warn_unpaired_rows", "with_arguments"]

MAX_CATEGORIES = 64


def categories_of(value) -> int:
    """The number of categories of an integer index vector (values ``0 .. k - 1`` with
    ``k <= MAX_CATEGORIES``), read one-hot; 0 for anything else (read as numbers)."""
    if np.ndim(value) != 1 or not jnp.issubdtype(jnp.result_type(value), jnp.integer):
        return 0
    if isinstance(value, jax.core.Tracer):
        return 0
    value = np.asarray(value)
    if value.size == 0 or value.min() < 0 or value.max() >= MAX_CATEGORIES:
        return 0
    return int(value.max()) + 1


def covariate_values(model, args, kwargs) -> dict:
    """The model's numeric array arguments by parameter name (``name[i]`` for ``*args``)."""
    try:
        bound = inspect.signature(model).bind(*args, **kwargs)
    except (TypeError, ValueError):  # not introspectable: positional names
        bound = None
    named = dict(bound.arguments) if bound is not None else {
        **{f"args[{i}]": a for i, a in enumerate(args)}, **kwargs}
    if bound is not None:
        for name, param in inspect.signature(model).parameters.items():
            if param.kind is param.VAR_POSITIONAL and name in named:
                named.update({f"{name}[{i}]": a for i, a in enumerate(named.pop(name))})
            elif param.kind is param.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
    return {name: v for name, v in named.items()
            if isinstance(v, np.ndarray | jax.Array) and np.ndim(v) >= 1
            and (jnp.issubdtype(v.dtype, jnp.number) or v.dtype == bool)}


def row_differences(pilot, num_features: int) -> float:
    """How far the observations of the data plate are from exchangeable in the prior
    predictive: the largest difference between one row's mean (or variance) and all rows', in
    standard errors, over the first ``num_features`` set features; 0 when rows' means and
    standard deviations also differ by less than a fifth of a standard deviation
    (immaterial)."""
    if pilot.data.set is None or num_features == 0:
        return 0.0
    valid = np.asarray(pilot.valid)
    x = np.asarray(pilot.data.set, np.float64)[valid][..., :num_features]
    w = np.asarray(pilot.data.mask, np.float64)[valid][..., None]
    count = w.sum(0)  # (N, 1) simulations that have row r
    rows = count[:, 0] >= 0.5 * len(x)
    if rows.sum() < 2:
        return 0.0
    x, w, count = x[:, rows], w[:, rows], count[rows]
    pooled = lambda v: (v * w).sum((0, 1)) / w.sum((0, 1))
    grand = pooled(x)
    var, m4 = pooled((x - grand) ** 2), pooled((x - grand) ** 4)
    sd = np.sqrt(np.where(var > 1e-24, var, np.inf))
    row_mean = (x * w).sum(0) / count
    row_var = ((x - grand) ** 2 * w).sum(0) / count
    z_mean = np.abs(row_mean - grand) / (sd / np.sqrt(count))
    z_var = np.abs(row_var - var) / np.sqrt(np.maximum(m4 - var**2, 1e-24) / count)
    material_mean = row_mean.std(0) > 0.2 * sd
    material_var = np.sqrt(row_var).std(0) > 0.2 * sd
    z = np.concatenate([np.where(material_mean, z_mean, 0.0), np.where(material_var, z_var, 0.0)])
    return float(np.max(z, initial=0.0))


def warn_unpaired_rows(pilot, num_features, plate, stacklevel):
    """Warn when the rows of ``plate`` are far from exchangeable in the pilot simulations."""
    z = row_differences(pilot, num_features)
    if z > 8.0:
        warnings.warn(
            f"The observations of plate '{plate}' are not exchangeable under the model: in "
            f"prior simulations the mean or spread of some rows differs from the others' by "
            f"{z:.0f} standard errors. The summary network pools the rows as a set, so it "
            "cannot tell which row an observation belongs to and the posterior would ignore "
            "what makes rows differ. Pass per-row covariates as model arguments (def model(X, "
            "y=None): array arguments with one row per observation are read next to the "
            "observations); for ordered data use time_series=True.",
            UserWarning, stacklevel=stacklevel + 1)


def warn_other_design(design, data, batch_ndim, stacklevel):
    """Warn for each covariate in ``data`` whose values differ from the trained ``design``
    (the first rows of it, for smaller datasets)."""
    for name, trained in design.items():
        if name not in data or isinstance(data[name], jax.core.Tracer):
            continue
        given = np.asarray(data[name], np.float64)
        n = given.shape[batch_ndim]
        if not np.allclose(given, trained[:n], rtol=1e-5, atol=1e-6 * np.abs(trained).max()):
            warnings.warn(
                f"Covariate '{name}' differs from the values the guide was trained with (the "
                f"model's arguments at set-up): every training simulation used those, so the "
                f"posterior for other values of '{name}' is an extrapolation and may be wrong. "
                "Train a guide with these values to rely on it.",
                UserWarning, stacklevel=stacklevel + 1)


def draw_designs(design, rng_key, num, given) -> dict:
    """``num`` designs from a declared ``design``, by argument name, each with a leading axis
    of size ``num``; checked against the covariates ``given`` at set-up (same names, shapes).

    :param design: a function ``design(rng_key) -> {argument name: value}``, drawn once per
        simulation, or a dict of arrays with a leading axis of designs (one is chosen uniformly
        for each simulation).
    """
    if callable(design):
        values = jax.vmap(design)(jax.random.split(rng_key, num))
    elif isinstance(design, dict) and design:
        counts = {np.shape(v)[0] if np.ndim(v) else 0 for v in design.values()}
        if len(counts) != 1 or 0 in counts:
            raise ValueError("design: a dict of designs needs arrays with one leading axis of "
                             f"the same size (one entry per design); got shapes "
                             f"{ {k: np.shape(v) for k, v in design.items()} }.")
        idx = jax.random.randint(rng_key, (num,), 0, counts.pop())
        values = {k: jnp.asarray(v)[idx] for k, v in design.items()}
    else:
        raise TypeError("design must be a function rng_key -> {argument: value}, or a dict of "
                        f"arrays stacked over designs; got {type(design).__name__}.")
    if not isinstance(values, dict):
        raise TypeError("design(rng_key) must return a dict from the model's argument names to "
                        f"their values; got {type(values).__name__}.")
    for name, v in values.items():
        if name not in given:
            raise ValueError(f"design gives '{name}', which is not a covariate of the model "
                             f"(plate-aligned array arguments: {sorted(given)}).")
        if tuple(v.shape[1:]) != tuple(np.shape(given[name])):
            raise ValueError(f"design gives '{name}' of shape {tuple(v.shape[1:])}; the model "
                             f"was set up with shape {tuple(np.shape(given[name]))}.")
    return values


def with_arguments(model, args, kwargs, values):
    """``args``, ``kwargs`` with the arguments named in ``values`` replaced (names as
    :func:`covariate_values` gives them)."""
    bound = inspect.signature(model).bind(*args, **kwargs)
    for name, v in values.items():
        if name in bound.arguments:
            bound.arguments[name] = v
        elif name in bound.kwargs:
            bound.arguments[next(iter(k for k, p in inspect.signature(model).parameters.items()
                                      if p.kind is p.VAR_KEYWORD))][name] = v
        else:
            raise ValueError(f"design: '{name}' is not an argument of the model by that name "
                             "(pass covariates by keyword to declare a design over them).")
    return bound.args, bound.kwargs
