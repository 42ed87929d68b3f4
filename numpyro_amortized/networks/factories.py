"""Network factories by name: the defaults a guide chooses, and the registry a checkpoint
names its networks from (only these are rebuilt from a stored description)."""

from __future__ import annotations

import functools
import json

from numpyro_amortized.networks.flows import (
    affine_flow,
    coupling_flow,
    ensemble_flow,
    flow_matching,
    spline_flow,
)
from numpyro_amortized.networks.structured import SetTransformer, TimeSeriesNet
from numpyro_amortized.networks.summary import DeepSet, Identity, LinearSummary, MLPSummary

__all__ = ["REGISTRY", "current_description", "default_flow", "describe_factory",
           "factory_from_description", "local_flow_factory"]

REGISTRY = {
    f.__name__: f
    for f in (affine_flow, coupling_flow, ensemble_flow, flow_matching, spline_flow, DeepSet, Identity,
              LinearSummary, MLPSummary, SetTransformer, TimeSeriesNet)
}


LOCAL_1D = {"num_layers": 1, "num_bins": 32}  # the default local flow of one-dimensional locals


def default_flow(num_train_simulations=None):
    """The flow a guide built without ``flow=`` gets: a
    :func:`~numpyro_amortized.networks.spline_flow` for online training (``None``), and an
    :func:`~numpyro_amortized.networks.ensemble_flow` for a fixed bank of
    ``num_train_simulations`` (which :func:`~numpyro_amortized.fit` trains with per-member
    weight decay, :func:`~numpyro_amortized.train.fixed_budget_weight_decay`). A hierarchical
    guide gets the same flow with ``learned_interval=True`` (set at set-up): splines whose
    output interval and tail slopes follow the data, so a posterior much narrower than the
    prior keeps thin tails (see :class:`~numpyro_amortized.networks.flows.SplineCoupling`)."""
    return spline_flow if num_train_simulations is None else ensemble_flow


def local_flow_factory(flow_factory, dim=None):
    """The factory of a hierarchical guide's local flow: for the defaults (a spline flow or a
    flow ensemble, with or without ``learned_interval``) one spline flow ending in a
    conditional affine layer: of one spline layer of 32 bins (:data:`LOCAL_1D`) for
    one-dimensional locals (``dim=1``: a spline is then a monotone map of the local given its
    condition), of the flow's own five layers of 8 bins for more dimensions or when ``dim`` is
    ``None``. Any other factory is used as it is."""
    func, kwargs = flow_factory, {}
    if isinstance(flow_factory, functools.partial) and not flow_factory.args:
        func, kwargs = flow_factory.func, dict(flow_factory.keywords)
    if func not in (ensemble_flow, spline_flow) or set(kwargs) - {"learned_interval"}:
        return flow_factory
    if dim == 1:
        kwargs.update(LOCAL_1D)
    return functools.partial(spline_flow, conditional_affine=True, **kwargs)


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
    kwargs = _tuples(current_description(desc)["kwargs"] or {})
    obj = REGISTRY[name]
    return functools.partial(obj, **kwargs) if kwargs else obj


def current_description(desc):
    """A stored factory description as this version writes it: older checkpoints named a
    flow's ``weight_decay`` among its options, which is now :func:`~numpyro_amortized.fit`'s
    setting (``desc`` is changed in place and returned)."""
    if isinstance(desc, dict) and isinstance(desc.get("kwargs"), dict):
        desc["kwargs"].pop("weight_decay", None)
    return desc


def _tuples(obj):
    """msgpack turns tuples into lists; network options are tuples (hidden sizes)."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj
