"""Summary networks and conditional normalizing flows (Flax NNX)."""

from numpyro_amortized.networks.flows import (
    ConditionalFlow,
    affine_flow,
    coupling_flow,
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

__all__ = [
    "ConditionalFlow",
    "DeepSet",
    "Identity",
    "LinearSummary",
    "MLPSummary",
    "SetTransformer",
    "TimeSeriesNet",
    "affine_flow",
    "coupling_flow",
    "default_summary_net",
    "spline_flow",
]
