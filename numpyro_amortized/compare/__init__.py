"""Side by side with NUTS: the reference run, ArviZ data, importance correction, the report.

- :func:`run_nuts`: NumPyro's NUTS on the same model and data, compiled once for all datasets
  of the same shapes, as ArviZ data with convergence diagnostics (``xarray.DataTree`` with
  ArviZ 1.x, ``InferenceData`` with 0.x).
- :func:`guide_inference_data`: the guide's answer as ArviZ data (with the
  posterior predictive through ``numpyro.infer.Predictive`` when asked).
- :func:`importance_resample`: the guide's draws reweighted by ``p(theta, x) / q(theta | x)``
  with PSIS, with Pareto k-hat saying when not to trust the amortized answer.
- :func:`warm_start_nuts`: NUTS started from the guide, with its covariance as mass matrix.
- :func:`compare_with_nuts`: all of it for one dataset or many, as tables and plots.
- :func:`posterior`: one dataset's posterior, checked against the model's density and
  escalated (PSIS, refinement on the dataset, NUTS) only as far as needed.
"""

from numpyro_amortized.compare.draws import (
    flatten_draws,
    guide_inference_data,
    log_joint,
    observed_values,
    posterior_predictive,
    response_sites,
)
from numpyro_amortized.compare.importance import ImportanceResult, importance_resample
from numpyro_amortized.compare.nuts import (
    NUTSResult,
    NUTSRunner,
    nuts_diagnostics,
    run_nuts,
    warm_start_nuts,
)
from numpyro_amortized.compare.plots import plot_comparison
from numpyro_amortized.compare.posterior import (
    PosteriorResult,
    posterior,
    posterior_batch,
    refine_guide,
)
from numpyro_amortized.compare.report import (
    Comparison,
    compare_with_nuts,
    standardized_differences,
)

__all__ = [
    "Comparison",
    "ImportanceResult",
    "NUTSResult",
    "NUTSRunner",
    "PosteriorResult",
    "compare_with_nuts",
    "flatten_draws",
    "guide_inference_data",
    "importance_resample",
    "log_joint",
    "nuts_diagnostics",
    "observed_values",
    "plot_comparison",
    "posterior",
    "posterior_batch",
    "posterior_predictive",
    "refine_guide",
    "response_sites",
    "run_nuts",
    "standardized_differences",
    "warm_start_nuts",
]
