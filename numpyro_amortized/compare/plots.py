"""Plots of a comparison: overlaid marginals and a pair plot, NUTS against the guide."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_comparison"]

_STYLE = {
    "nuts": {"color": "0.35", "label": "NUTS"},
    "amortized": {"color": "tab:blue", "label": "amortized"},
    "corrected": {"color": "tab:orange", "label": "checked (PSIS / refined)"},
}


def plot_comparison(report, dataset=0, *, max_points=500, methods=None, figsize=None):
    """Pair plot of one dataset's posterior: marginals overlaid on the diagonal (NUTS filled,
    the guide and its correction as lines), draws of each below it.

    :param report: a :class:`~numpyro_amortized.compare.Comparison`.
    :param dataset: which dataset.
    :param max_points: draws per method in each scatter panel.
    :param methods: which answers to draw (default all present).
    :return: a matplotlib ``Figure``.
    """
    d = report.draws[dataset]
    names = d["names"]
    methods = [m for m in (methods or ("nuts", "amortized", "corrected")) if d.get(m) is not None]
    k = len(names)
    size = figsize or (2.2 * k + 1, 2.2 * k + 0.5)
    fig, axes = plt.subplots(k, k, figsize=size, squeeze=False)
    rng = np.random.default_rng(0)
    for r in range(k):
        for c in range(k):
            ax = axes[r, c]
            if c > r:
                ax.set_axis_off()
                continue
            if r == c:
                lo, hi = np.quantile(d["nuts"][:, c], [0.001, 0.999])
                pad = 0.25 * (hi - lo) + 1e-12
                bins = np.linspace(lo - pad, hi + pad, 40)
                for m in methods:
                    ax.hist(d[m][:, c], bins=bins, density=True,
                            histtype="stepfilled" if m == "nuts" else "step",
                            alpha=0.35 if m == "nuts" else 1.0, lw=1.5, **_STYLE[m])
                ax.set_yticks([])
            else:
                for m in methods:
                    x = d[m]
                    idx = rng.choice(len(x), min(max_points, len(x)), replace=False)
                    ax.scatter(x[idx, c], x[idx, r], s=3, alpha=0.3,
                               color=_STYLE[m]["color"], rasterized=True)
            if r == k - 1:
                ax.set_xlabel(names[c])
            if c == 0 and r > 0:
                ax.set_ylabel(names[r])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    row = report.datasets.iloc[dataset]
    title = f"dataset {dataset}"
    if "c2st_amortized" in row:
        title += f": C2ST amortized {row['c2st_amortized']:.3f}"
    if "c2st_corrected" in row and np.isfinite(row.get("c2st_corrected", np.nan)):
        title += f", corrected {row['c2st_corrected']:.3f}"
    if np.isfinite(row.get("pareto_k", np.nan)):
        title += f"; Pareto k-hat {row['pareto_k']:.2f}"
    fig.suptitle(title)
    fig.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    return fig
