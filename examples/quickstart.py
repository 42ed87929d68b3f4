"""Quick start: train an amortized guide once, then get posteriors for new datasets instantly.

The model is the linear regression of the BayesFlow tutorial, with 5 to 15 observations:
beta ~ N([2, 0], [3, 1]), sigma ~ Gamma(1, 1), x ~ N(0, 1), y ~ N(beta0 + beta1 x, sigma).
One guide is trained on datasets simulated from the model; then, for a new dataset, its
posterior is printed next to NUTS's, with the time each took, and `posterior()` says which
draws to use for it and why.

    python examples/quickstart.py            # full run (a few minutes on 2 CPU cores)
    QUICK=1 python examples/quickstart.py    # a short smoke run
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized import AutoAmortizedFlow, compare_with_nuts, fit, posterior
from numpyro_amortized.examples import linear_regression

QUICK = os.environ.get("QUICK", "") not in ("", "0")


def main():
    num_steps = 300 if QUICK else 15_000
    # 1. Train once, on simulations from the model. The arguments fix the largest dataset.
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    result = fit(guide, jax.random.PRNGKey(0), x=jnp.zeros(15), y=jnp.zeros(15),
                 num_steps=num_steps, progress_bar=not QUICK)
    print(f"trained on {result.num_simulations:,} simulated datasets in "
          f"{result.train_time:.1f} s (+ {result.compile_time:.1f} s compilation)")

    # 2. A new dataset, of a size the guide has never been told about.
    rng = np.random.default_rng(42)
    n = 12
    x = rng.normal(size=n)
    y = 1.5 - 0.7 * x + 0.8 * rng.normal(size=n)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    # 3. Its amortized posterior: one forward pass.
    guide.sample_posterior(jax.random.PRNGKey(1), result.params, x=x, y=y, sample_shape=(4000,))
    t0 = time.perf_counter()
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, x=x, y=y,
                                   sample_shape=(4000,))
    jax.block_until_ready(draws)
    t_amortized = time.perf_counter() - t0

    # 4. The same model and data through NUTS, side by side: per-latent differences in NUTS
    #    posterior sds, C2ST, Pareto k-hat and which draws to use, times.
    report = compare_with_nuts(guide, result.params, jax.random.PRNGKey(2), {"x": x, "y": y},
                               train_time=result.train_time,
                               c2st_kwargs={"early_stopping": True}, progress_bar=False)
    nuts = report.nuts[0].samples
    rows = [("beta[0]", lambda d: d["beta"][:, 0]), ("beta[1]", lambda d: d["beta"][:, 1]),
            ("sigma", lambda d: d["sigma"])]
    print(f"\nposterior for a new dataset of {n} observations")
    print(f"{'':8} {'amortized mean':>15} {'sd':>6} {'5%':>7} {'95%':>7} | "
          f"{'NUTS mean':>10} {'sd':>6} {'5%':>7} {'95%':>7}")
    for name, get in rows:
        a, b = np.asarray(get(draws)), np.asarray(get(nuts))
        print(f"{name:8} {a.mean():15.3f} {a.std():6.3f} {np.quantile(a, .05):7.3f} "
              f"{np.quantile(a, .95):7.3f} | {b.mean():10.3f} {b.std():6.3f} "
              f"{np.quantile(b, .05):7.3f} {np.quantile(b, .95):7.3f}")
    row = report.datasets.iloc[0]
    print(f"\nC2ST amortized vs NUTS: {row.c2st_amortized:.3f} (0.5 = indistinguishable); "
          f"checked draws ({row.use}): {row.c2st_corrected:.3f}")

    # 5. Without NUTS: posterior() checks the amortized draws against the model's exact density
    #    and corrects or escalates them only as far as needed.
    res = posterior(guide, result.params, jax.random.PRNGKey(3), x=x, y=y, num_samples=4000)
    why = {"amortized": "importance weights close to uniform: the guide's own draws",
           "psis": "PSIS-corrected draws (k-hat <= 0.7, enough importance ESS)",
           "refined+psis": "the guide refined on this dataset, then PSIS-corrected",
           "nuts": "the checks failed: NUTS, started from the guide"}[res.method]
    print(f"posterior(): use the {res.method} draws, {why}; Pareto k-hat {res.pareto_k:.2f}, "
          f"importance ESS {res.ess:.0f}, {1e3 * res.seconds:.0f} ms"
          + ("" if res.reliable else " (NOT reliable: see the warning)"))
    t_nuts = report.nuts[0].run_time + report.nuts[0].compile_time
    print(f"time per dataset: amortized {1e3 * t_amortized:.1f} ms, NUTS {t_nuts:.2f} s "
          f"({t_nuts / t_amortized:,.0f}x faster; NUTS {report.nuts[0].run_time:.2f} s once "
          "compiled for this data shape)")

if __name__ == "__main__":
    main()
