"""Summary networks and conditional normalizing flows (Flax NNX)."""

from numpyro_amortized.networks.flows import (
    ConditionalFlow,
    FlowEnsemble,
    affine_flow,
    coupling_flow,
    ensemble_flow,
    spline_flow,
)
from numpyro_amortized.networks.structured import SetTransformer, TimeSeriesNet
from numpyro_amortized.networks.summary import (
    DeepSet,
    Identity,
    LinearSummary,
    MLPSummary,
    default_summary_net,
)

# the factories a checkpoint may name: only these are rebuilt from a stored description
REGISTRY = {
    f.__name__: f
    for f in (affine_flow, coupling_flow, ensemble_flow, spline_flow, DeepSet, Identity,
              LinearSummary, MLPSummary, SetTransformer, TimeSeriesNet)
}

__all__ = [
    "REGISTRY",
    "ConditionalFlow",
    "DeepSet",
    "FlowEnsemble",
    "Identity",
    "LinearSummary",
    "MLPSummary",
    "SetTransformer",
    "TimeSeriesNet",
    "affine_flow",
    "coupling_flow",
    "default_summary_net",
    "ensemble_flow",
    "spline_flow",
]
