"""Built-in example models, shared by the quick start, the tests and the benchmarks."""

from numpyro_amortized.examples.epidemics import sir, sir_log_infected
from numpyro_amortized.examples.models import (
    gaussian_linear,
    gaussian_linear_posterior,
    linear_regression,
    linear_regression_posterior,
    peak_datasets,
    peak_model,
    two_moons,
    two_moons_reference_posterior,
)

__all__ = [
    "gaussian_linear",
    "gaussian_linear_posterior",
    "linear_regression",
    "linear_regression_posterior",
    "peak_datasets",
    "peak_model",
    "sir",
    "sir_log_infected",
    "two_moons",
    "two_moons_reference_posterior",
]
