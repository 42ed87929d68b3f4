"""Diagnostics of an amortized guide: SBC, coverage, recovery, z-score/contraction and a
misspecification check, on the variable-size linear regression (5 to 15 observations).

An amortized posterior is cheap on thousands of simulated datasets, so the guide checks its own
calibration in seconds: 1,000 prior-predictive datasets x 1,000 posterior draws each in one
vectorized call. Then observed datasets that the model describes, and some it does not
(Student-t noise), go through the misspecification check. Figures are saved as PNG files.

    python examples/diagnostics.py            # full run (a few minutes on 2 CPU cores)
    QUICK=1 python examples/diagnostics.py    # a short smoke run
"""

import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.diagnostics import diagnose, misspecification_test
from numpyro_amortized.examples import linear_regression

matplotlib.use("Agg")
QUICK = os.environ.get("QUICK", "") not in ("", "0")


def datasets(rng, n_datasets, n=12, noise="normal"):
    """Datasets with parameters drawn like the prior's, and Normal or Student-t(2) noise."""
    b0 = rng.normal(2.0, 3.0, size=(n_datasets, 1))
    b1 = rng.normal(0.0, 1.0, size=(n_datasets, 1))
    sigma = rng.gamma(1.0, 1.0, size=(n_datasets, 1))
    x = rng.normal(size=(n_datasets, n))
    eps = rng.standard_t(2, size=x.shape) if noise == "student_t" else rng.normal(size=x.shape)
    y = b0 + b1 * x + sigma * eps
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def pad(data, size=15):
    """Pad datasets to the trained maximum size; the mask comes from ``num_obs``."""
    n = data["x"].shape[1]
    return {k: jnp.pad(v, ((0, 0), (0, size - n))) for k, v in data.items()}, jnp.full(
        (data["x"].shape[0],), n)


def main(out_dir="."):
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    z = jnp.zeros(15)
    result = fit(guide, jax.random.PRNGKey(0), x=z, y=z, num_steps=300 if QUICK else 15_000,
                 progress_bar=not QUICK)
    print(f"trained in {result.train_time:.1f} s")

    rng = np.random.default_rng(0)
    observed, num_obs = pad(datasets(rng, 10))
    m = 200 if QUICK else 1000
    t0 = time.perf_counter()
    report = diagnose(guide, result.params, jax.random.PRNGKey(1), x=z, y=z,
                      num_simulations=m, num_samples=m,
                      test_quantities={"mean_at_x1": lambda t: t["beta"][..., 0]
                                       + t["beta"][..., 1]},
                      observed=observed, observed_num_obs=num_obs, progress_bar=not QUICK)
    elapsed = time.perf_counter() - t0
    print(report)
    print(f"diagnostics of {m} simulated datasets x {m} posterior draws, with figures: "
          f"{elapsed:.1f} s")
    for name, fig in report.figures.items():
        path = os.path.join(out_dir, f"diagnostics_{name}.png")
        fig.savefig(path, dpi=80)
    print(f"figures: {', '.join(sorted(report.figures))} (diagnostics_*.png in {out_dir})")

    heavy, heavy_n = pad(datasets(rng, 10, noise="student_t"))
    res = misspecification_test(guide, result.params, jax.random.PRNGKey(2), heavy, x=z, y=z,
                                num_obs=heavy_n)
    print(f"10 datasets with Student-t(2) noise: misspecification p = {res.p_value:.3f}"
          + (" (flagged)" if res.p_value < 0.05 else ""))
    return report


if __name__ == "__main__":
    main()
