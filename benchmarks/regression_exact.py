"""The variable-size linear regression against its exact posterior, on datasets from the prior.

Trains the quick start's guide (package defaults, 15k steps) and scores the posterior of 20
prior-predictive datasets (N from 5 to 15) by C2ST against exact draws
(``linear_regression_posterior``), with 4,000 draws per side and the early-stopping classifier.
Reports each dataset's C2ST with its size and true sigma, so atypical datasets are visible.

    python benchmarks/regression_exact.py
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import write_markdown  # benchmarks/run.py, next to this script

from numpyro_amortized import AutoAmortizedFlow, c2st, fit
from numpyro_amortized.examples import linear_regression, linear_regression_posterior

ROOT = Path(__file__).resolve().parents[1]


def main(num_datasets=20, num_steps=15_000, num_draws=4000):
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    result = fit(guide, jax.random.PRNGKey(0), x=jnp.zeros(15), y=jnp.zeros(15),
                 num_steps=num_steps)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(num_datasets):
        n = [5, 7, 10, 12, 15][i % 5]
        beta = np.array([2.0, 0.0]) + np.array([3.0, 1.0]) * rng.normal(size=2)
        sigma = rng.gamma(1.0)
        x = rng.normal(size=n)
        y = beta[0] + beta[1] * x + sigma * rng.normal(size=n)
        exact = linear_regression_posterior(x, y, num_draws, np.random.default_rng(i))
        d = guide.sample_posterior(jax.random.PRNGKey(i), result.params,
                                   x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.float32),
                                   sample_shape=(num_draws,))
        draws = np.column_stack([d["beta"], d["sigma"]])
        score = c2st(exact, draws, classifier_kwargs={"early_stopping": True})
        rows.append({"n": n, "beta": beta.tolist(), "sigma": float(sigma), "c2st": score})
        print(f"dataset {i}: N={n} beta={beta.round(2)} sigma={sigma:.3f} C2ST {score:.3f}",
              flush=True)
    scores = np.array([r["c2st"] for r in rows])
    out = ROOT / "benchmarks" / "results" / "regression_exact.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"num_steps": num_steps, "train_time_s": result.train_time,
                               "rows": rows}, indent=1))
    worst = rows[int(scores.argmax())]
    text = (
        f"{num_datasets} datasets from the prior predictive, {num_draws:,} draws per side, "
        f"guide trained {num_steps:,} steps: C2ST against the exact "
        f"posterior median **{np.median(scores):.3f}**, mean {scores.mean():.3f}, "
        f"{int((scores <= 0.6).sum())} of {num_datasets} at or below 0.6; worst {scores.max():.3f} "
        f"(N={worst['n']}, beta={np.round(worst['beta'], 2).tolist()}, "
        f"sigma={worst['sigma']:.3f})."
    )
    write_markdown("REGRESSION", text)
    print(text)


if __name__ == "__main__":
    main()
