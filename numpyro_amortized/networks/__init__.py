"""Summary networks and conditional normalizing flows (Flax NNX)."""

from numpyro_amortized.networks.factories import (
    REGISTRY,
    current_description,
    default_flow,
    describe_factory,
    factory_from_description,
    local_flow_factory,
)
from numpyro_amortized.networks.flows import (
    ConditionalFlow,
    FlowEnsemble,
    FlowMatching,
    affine_flow,
    coupling_flow,
    ensemble_flow,
    flow_matching,
    spline_flow,
)
from numpyro_amortized.networks.hierarchical import GroupEncoder, HierarchicalPosterior
from numpyro_amortized.networks.structured import SetTransformer, TimeSeriesNet
from numpyro_amortized.networks.summary import (
    DeepSet,
    Identity,
    LinearSummary,
    MLPSummary,
    default_summary_net,
)

__all__ = [
    "REGISTRY",
    "ConditionalFlow",
    "DeepSet",
    "FlowEnsemble",
    "FlowMatching",
    "GroupEncoder",
    "HierarchicalPosterior",
    "Identity",
    "LinearSummary",
    "MLPSummary",
    "SetTransformer",
    "TimeSeriesNet",
    "affine_flow",
    "coupling_flow",
    "current_description",
    "default_flow",
    "default_summary_net",
    "describe_factory",
    "ensemble_flow",
    "factory_from_description",
    "flow_matching",
    "local_flow_factory",
    "spline_flow",
]
