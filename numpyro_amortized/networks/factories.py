"""Network factories by name: the defaults a guide chooses, and the registry a checkpoint
names its networks from (only these are rebuilt from a stored description)."""

from __future__ import annotations

import functools
import json

from numpyro_amortized.networks.flows import (
    affine_flow,
    coupling_flow,
    ensemble_flow,
    spline_flow,
)
from numpyro_amortized.networks.flows.ensemble import DEFAULT_WEIGHT_DECAY
from numpyro_amortized.networks.structured import SetTransformer, TimeSeriesNet
from numpyro_amortized.networks.summary import DeepSet, Identity, LinearSummary, MLPSummary

__all__ = ["REGISTRY", "default_flow", "describe_factory", "factory_from_description",
           "fixed_budget_flow"]

REGISTRY = {
    f.__name__: f
    for f in (affine_flow, coupling_flow, ensemble_flow, spline_flow, DeepSet, Identity,
              LinearSummary, MLPSummary, SetTransformer, TimeSeriesNet)
}


def fixed_budget_flow(num_train):
    """The default flow for a fixed budget of ``num_train`` training simulations:
    :func:`~numpyro_amortized.networks.ensemble_flow`, a spline and an affine flow, each plain
    and weight-decayed. The decay is 2 up to 10,000 training simulations and falls as
    ``1 / num_train`` beyond (0.202 for a bank of 10^5): a larger bank is memorized less, and
    the decay that suits 10^4 over-regularizes it.

    **Example**::

        guide = AutoAmortizedFlow(model, flow=fixed_budget_flow(50_000))
    """
    factor = min(1.0, 10_000 / max(int(num_train), 1))
    decays = tuple(round(w * factor, 3) for w in DEFAULT_WEIGHT_DECAY)
    return functools.partial(ensemble_flow, weight_decay=decays)


def default_flow(num_train_simulations=None):
    """The flow a guide built without ``flow=`` gets: a
    :func:`~numpyro_amortized.networks.spline_flow` for online training (``None``), and
    :func:`fixed_budget_flow` for a fixed bank of ``num_train_simulations``."""
    if num_train_simulations is None:
        return spline_flow
    return fixed_budget_flow(num_train_simulations)


def describe_factory(factory):
    """A plain description of a network factory of the package's own (possibly in a
    ``functools.partial`` with plain keyword arguments), or ``None`` for any other."""
    kwargs = {}
    if isinstance(factory, functools.partial):
        if factory.args:
            return None
        kwargs = dict(factory.keywords)
        factory = factory.func
    module = getattr(factory, "__module__", "") or ""
    if not module.startswith("numpyro_amortized.") or module.startswith("numpyro_amortized.examples"):
        return None
    try:
        json.dumps(kwargs)
    except TypeError:
        return None
    return {"name": factory.__name__, "kwargs": kwargs}


def factory_from_description(desc):
    """The factory that :func:`describe_factory` described, looked up only in
    :data:`REGISTRY`; a ``ValueError`` for any other name or malformed description."""
    name = desc.get("name") if isinstance(desc, dict) else None
    kwargs = desc.get("kwargs") if isinstance(desc, dict) else None
    if not isinstance(name, str) or name not in REGISTRY or not isinstance(kwargs, dict | None):
        raise ValueError(
            f"The network {name!r} is not one of the package's own; build the guide with the "
            "network it was trained with."
        )
    kwargs = _tuples(kwargs or {})
    obj = REGISTRY[name]
    return functools.partial(obj, **kwargs) if kwargs else obj


def _tuples(obj):
    """msgpack turns tuples into lists; network options are tuples (hidden sizes)."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj
