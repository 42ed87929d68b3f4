"""Built-in example models, shared by the quick start, the tests and the benchmarks."""

from numpyro_amortized.examples.models import (
    gaussian_linear,
    gaussian_linear_posterior,
    linear_regression,
)

__all__ = ["gaussian_linear", "gaussian_linear_posterior", "linear_regression"]
