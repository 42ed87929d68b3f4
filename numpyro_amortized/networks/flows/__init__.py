"""Conditional normalizing flows: one bijection per file, and factories that stack them."""

from numpyro_amortized.networks.flows.actnorm import ActNorm
from numpyro_amortized.networks.flows.affine_coupling import AffineCoupling
from numpyro_amortized.networks.flows.conditional_affine import ConditionalAffine
from numpyro_amortized.networks.flows.ensemble import (
    FlowEnsemble,
    StackedFlows,
    ensemble_flow,
    mixture_log_weights,
)
from numpyro_amortized.networks.flows.flow import (
    ConditionalFlow,
    affine_flow,
    coupling_flow,
    spline_flow,
)
from numpyro_amortized.networks.flows.flow_matching import FlowMatching, flow_matching
from numpyro_amortized.networks.flows.permutation import Permutation
from numpyro_amortized.networks.flows.repeated import Chain, Repeated
from numpyro_amortized.networks.flows.spline_coupling import SplineCoupling
from numpyro_amortized.networks.flows.standardize import Standardize

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Chain",
    "ConditionalAffine",
    "ConditionalFlow",
    "FlowEnsemble",
    "FlowMatching",
    "Permutation",
    "Repeated",
    "SplineCoupling",
    "StackedFlows",
    "Standardize",
    "affine_flow",
    "coupling_flow",
    "ensemble_flow",
    "flow_matching",
    "mixture_log_weights",
    "spline_flow",
]
