"""A checkpoint's record of the guide's options, and the checks that a guide being restored
is built as the saved one was (its networks, their sizes and its declared design)."""

from __future__ import annotations

import json

import numpy as np

from numpyro_amortized.checkpoint.format import CheckpointError
from numpyro_amortized.networks import describe_factory, factory_from_description
from numpyro_amortized.networks.factories import current_description

# integer network options that are not sizes of stored arrays (a solver's step count)
NOT_SIZES = ("num_steps",)

__all__ = ["NOT_SIZES", "check_config", "check_sizes", "design_arrays", "design_kind",
           "guide_config", "resolve_factory", "stored_design"]


def guide_config(guide) -> dict:
    """The guide's constructor options as plain data (the networks by description)."""
    return {
        "summary_net": describe_factory(guide.summary_net) if guide.summary_net else
        {"name": None, "kwargs": {}},
        "flow": describe_factory(guide.flow) if guide.flow else {"name": None, "kwargs": {}},
        "observed": list(guide.observed),
        "data_plate": guide.data_plate,
        "set_sizes": None if guide.set_sizes is None else list(guide.set_sizes),
        "time_series": guide.time_series,
        "num_pilot_simulations": guide.num_pilot_simulations,
        "prefix": guide.prefix,
        "design": design_kind(guide.design),
        "hierarchical": guide.hierarchical,
        "num_groups": None if guide.num_groups is None else list(guide.num_groups),
    }


def design_kind(design):
    """How a guide's declared design is stored: ``None`` (none declared), ``"arrays"`` (a dict
    of stacked designs, stored in the checkpoint) or ``"function"`` (code: not stored)."""
    if design is None:
        return None
    return "function" if callable(design) else "arrays"


def design_arrays(guide) -> dict:
    """The declared design's arrays by covariate name (empty unless it is a dict of arrays)."""
    if design_kind(guide.design) != "arrays":
        return {}
    return {name: np.asarray(v) for name, v in guide.design.items()}


def stored_design(body, path):
    """The design for rebuilding a guide from a checkpoint: its arrays, or ``None``; a
    :class:`CheckpointError` when it was a function (code is never stored)."""
    kind = json.loads(body["guide"]).get("design")
    if kind == "function":
        raise CheckpointError(
            f"{path}: the guide was trained with a design function (design=fn), which a "
            "checkpoint does not store; build the guide as for training and pass it: "
            "load(path, model, guide=AutoAmortizedFlow(model, design=fn, ...)).")
    if kind == "arrays":
        return {name: np.asarray(v) for name, v in body["design"].items()}
    return None


def resolve_factory(desc, role, path):
    """The factory a description names, looked up only in the package's registry."""
    if desc["name"] is None:
        return None
    try:
        return factory_from_description(desc)
    except (ValueError, TypeError, KeyError):
        raise CheckpointError(
            f"{path}: the {role} {desc.get('name')!r} is not one of numpyro_amortized.networks. "
            "Build the guide yourself and pass it as guide=."
        ) from None


def check_sizes(body, path):
    """Refuse, before anything is built, network descriptions bigger than the stored weights:
    every width of a network is a dimension of some stored parameter array, and every count
    (layers, bins, members) is at most the number of arrays. A forged description (a hidden
    size of 20,000 with a valid checksum) would otherwise allocate for minutes."""
    try:
        shapes = [np.shape(v) for v in body["params"].values()]
        descs = [json.loads(body[k]) for k in ("flow", "local_flow") if k in body] + [
            json.loads(body["guide"])[role] for role in ("summary_net", "flow")]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: the checkpoint's networks are malformed.") from None
    bound = max([len(shapes), *(d for shape in shapes for d in shape)], default=0)
    for desc in descs:
        kwargs = desc.get("kwargs") if isinstance(desc, dict) else None
        for key, size in _sizes(kwargs or {}):
            if key in NOT_SIZES:
                continue
            if size > bound:
                raise CheckpointError(
                    f"{path}: the network option {key}={size} is larger than anything the "
                    f"stored weights hold (largest dimension or count: {bound}); the file does "
                    "not describe its own weights. Use a checkpoint written by the package.")


def _sizes(obj, key=""):
    """``(option, number)`` of the integers and sequence lengths in a network description."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _sizes(v, str(k))
    elif isinstance(obj, list | tuple):
        yield key, len(obj)
        for v in obj:
            yield from _sizes(v, key)
    elif isinstance(obj, int | np.integer) and not isinstance(obj, bool):
        yield key, int(obj)


def check_config(guide, body, path):
    """The networks' options (a spline's bound, say) change training without changing any
    shape: compare them where both guides describe them (a lambda is not described)."""
    saved, here = json.loads(body["guide"]), json.loads(json.dumps(guide_config(guide)))
    current_description(saved.get("flow"))
    diff = {k: (saved[k], v) for k, v in here.items()
            if k != "num_pilot_simulations"  # the standardization is restored, not re-estimated
            and saved.get(k) is not None and v is not None and saved[k] != v}
    for k in ("hierarchical", "num_groups"):  # None is a choice here: compare when saved
        if k in saved and saved[k] != here[k]:
            diff[k] = (saved[k], here[k])
    if saved.get("design") != here["design"]:  # covariates drawn anew or not: other training
        diff["design"] = (saved.get("design"), here["design"])
    elif here["design"] == "arrays":
        mine, stored = design_arrays(guide), stored_design(body, path)
        if sorted(mine) != sorted(stored) or not all(np.array_equal(mine[k], stored[k])
                                                     for k in mine):
            diff["design"] = ("the stored design arrays", "other arrays")
    if diff:
        raise CheckpointError(
            f"{path}: the checkpoint is of another guide (another architecture or options: "
            f"{diff}, saved and now); build the guide as for that run."
        )
