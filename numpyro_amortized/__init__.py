"""numpyro_amortized: amortized Bayesian inference for NumPyro models.

What a user calls is here. The NUTS comparison and the diagnostics load ArviZ, pandas,
matplotlib and scikit-learn, so they are imported when first used, not with the package.
"""

import importlib

from numpyro_amortized._version import __version__
from numpyro_amortized.checkpoint import CheckpointError, load, save
from numpyro_amortized.data import Simulations
from numpyro_amortized.guide import AutoAmortizedFlow
from numpyro_amortized.losses import NPE, AmortizedELBO
from numpyro_amortized.networks import default_flow
from numpyro_amortized.simulation import inspect_model, simulate
from numpyro_amortized.train import FitResult, fit

_LAZY = {  # name -> module that defines it, imported on first access
    "compare_with_nuts": "numpyro_amortized.compare",
    "guide_inference_data": "numpyro_amortized.compare",
    "importance_resample": "numpyro_amortized.compare",
    "posterior": "numpyro_amortized.compare",
    "run_nuts": "numpyro_amortized.compare",
    "warm_start_nuts": "numpyro_amortized.compare",
    "c2st": "numpyro_amortized.diagnostics",
    "diagnose": "numpyro_amortized.diagnostics",
    "mmd": "numpyro_amortized.diagnostics",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'numpyro_amortized' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "NPE",
    "AmortizedELBO",
    "AutoAmortizedFlow",
    "CheckpointError",
    "FitResult",
    "Simulations",
    "__version__",
    "c2st",
    "compare_with_nuts",
    "default_flow",
    "diagnose",
    "fit",
    "guide_inference_data",
    "importance_resample",
    "inspect_model",
    "load",
    "mmd",
    "posterior",
    "run_nuts",
    "save",
    "simulate",
    "warm_start_nuts",
]
