"""The two calls the package makes into ArviZ, for ArviZ 1.x and for ArviZ 0.x alike.

ArviZ 1.x (``arviz-base``, ``arviz-stats``, ``arviz-plots``; results as ``xarray.DataTree``)
needs Python 3.12 or newer, so on Python 3.11 the package installs ArviZ 0.x
(``InferenceData``). Everything else the package does with the results (``.posterior``,
``.sample_stats``, ``arviz.rhat``, ``arviz.ess``, ``arviz.summary``) reads the same on both.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
from scipy.special import logsumexp

__all__ = ["ARVIZ_1", "from_dict", "psislw"]

ARVIZ_1 = int(importlib.metadata.version("arviz").split(".")[0]) >= 1


def from_dict(*, posterior, sample_stats=None, posterior_predictive=None,
              observed_data=None, attrs=None):
    """``DataTree`` (ArviZ 1.x) or ``InferenceData`` (0.x) from dicts of arrays by group; the
    sampled groups' arrays are shaped ``(chain, draw, ...)``."""
    import arviz as az

    groups = {"posterior": posterior, "sample_stats": sample_stats,
              "posterior_predictive": posterior_predictive, "observed_data": observed_data}
    groups = {k: v for k, v in groups.items() if v is not None}
    if ARVIZ_1:
        tree = az.from_dict(groups)
        tree.attrs.update(attrs or {})
        return tree
    return az.from_dict(**groups, attrs=attrs)


def psislw(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights of a 1-D array of finite log weights, and the shape
    estimate k-hat (Vehtari et al. 2024).

    Weights equal to within 0.1% (an exact proposal, up to rounding) have no tail to fit:
    they are returned as they are, with k-hat ``-inf``. A tail the Pareto fit cannot describe
    otherwise gets k-hat ``inf``: not to be trusted."""
    log_w = np.asarray(log_w, np.float64)
    if np.ptp(log_w) < 1e-3:
        return log_w - logsumexp(log_w), -np.inf
    try:
        if ARVIZ_1:  # arviz-stats smooths the weights 1 / p of log-likelihood values log p
            from arviz_stats.base import array_stats

            smoothed, k = array_stats.psislw(-log_w)
        else:
            import arviz as az

            smoothed, k = az.psislw(log_w.copy())
    except ValueError:  # a tail of ties
        return log_w - logsumexp(log_w), np.inf
    k = float(k)
    return np.asarray(smoothed), (np.inf if np.isnan(k) else k)
