"""numpyro_amortized: amortized Bayesian inference for NumPyro models."""

from numpyro_amortized.checkpoint import CheckpointError, load, save
from numpyro_amortized.compare import (
    compare_with_nuts,
    guide_inference_data,
    importance_resample,
    run_nuts,
    warm_start_nuts,
)
from numpyro_amortized.diagnostics import c2st, mmd
from numpyro_amortized.guide import AutoAmortizedFlow, Simulations
from numpyro_amortized.losses import NPE, AmortizedELBO
from numpyro_amortized.simulation import inspect_model, simulate
from numpyro_amortized.training import (
    FitResult,
    StepInfo,
    Trainer,
    TrainState,
    default_optimizer,
    fit,
    fixed_budget_flow,
    trainer,
)

__version__ = "0.1.0"

__all__ = [
    "NPE",
    "AmortizedELBO",
    "AutoAmortizedFlow",
    "CheckpointError",
    "FitResult",
    "Simulations",
    "StepInfo",
    "TrainState",
    "Trainer",
    "c2st",
    "compare_with_nuts",
    "default_optimizer",
    "fit",
    "fixed_budget_flow",
    "guide_inference_data",
    "importance_resample",
    "inspect_model",
    "load",
    "mmd",
    "run_nuts",
    "save",
    "simulate",
    "trainer",
    "warm_start_nuts",
]
