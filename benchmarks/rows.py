"""Training speed against the number of rows: a regression with plain-argument covariates.

The model is a linear regression with two covariates passed as a plain argument
(``def model(X, y=None)``), trained online with `fit`'s defaults (a DeepSet reads each row
``(x_1, x_2, y)``) at batch 256, for datasets of 15, 50, 200 and 1,000 rows. For each size:
steps per second of `fit`'s training (validation included, compilation excluded; median of
the repeats; validation every 50 steps, as in a fit of 5,000 steps), and the time 5,000
steps would take; once with the default DeepSet (width 64)
and once with width 32 (the inner network runs on every row and dominates a step on large
datasets).

    python benchmarks/rows.py                  # writes the ROWS section of docs/benchmarks.md
    python benchmarks/rows.py --quick          # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

sys.path.insert(0, str(Path(__file__).parent))
from run import ROOT, machine, write_markdown  # benchmarks/run.py, next to this script

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.networks import DeepSet

SIZES = (15, 50, 200, 1000)


def regression(X, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("rows", X.shape[0]):
        numpyro.sample("y", dist.Normal(a + X @ b, sigma), obs=y)


def steps_per_second(n, num_steps, width, repeats):
    X = jnp.asarray(np.random.default_rng(0).normal(size=(n, 2)), jnp.float32)
    kwargs = {} if width is None else {"summary_net": functools.partial(DeepSet, hidden=width)}
    rates, walls = [], []
    for r in range(repeats):
        guide = AutoAmortizedFlow(regression, **kwargs)
        t0 = time.perf_counter()
        # validation every 50 steps, as in a fit of 5,000 steps (fit's default for a short run,
        # every tenth of it, would validate 1,024 simulations every 10-20 steps here)
        result = fit(guide, jax.random.PRNGKey(r), X, y=jnp.zeros(n), num_steps=num_steps,
                     num_chunks=max(1, num_steps // 50), progress_bar=False, check=False)
        jax.block_until_ready(result.params)
        walls.append(time.perf_counter() - t0)
        rates.append(num_steps / result.train_time)
    return float(np.median(rates)), float(np.median(walls))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    steps = {15: 400, 50: 400, 200: 200, 1000: 100}
    rows = []
    for width in (None, 32):
        for n in SIZES:
            num = 20 if args.quick else steps[n]
            rate, wall = steps_per_second(n, num, width, 1 if args.quick else args.repeats)
            rows.append({"rows": n, "summary_width": width or 64, "steps": num,
                         "steps_per_s": rate, "wall_s": wall})
            print(f"rows {n} width {width or 64}: {rate:.1f} steps/s", flush=True)
    if args.quick:
        return
    out = ROOT / "benchmarks" / "results" / "rows.json"
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    lines = [(f"Measured on {machine()['cpu_count']} CPU core(s) (`python benchmarks/rows.py`): "
             "steps per second of `fit`'s training at batch 256 (median of "
             f"{args.repeats} runs, compilation excluded, 1,024 held-out simulations validated "
             "every 50 steps) and the time 5,000 steps take."), "",
             ("| rows per dataset | steps/s (DeepSet width 64, the default) | 5,000 steps | "
             "steps/s (width 32) | 5,000 steps |"), "| --- | --- | --- | --- | --- |"]
    for n in SIZES:
        a, b = (next(r for r in rows if r["rows"] == n and r["summary_width"] == w)
                for w in (64, 32))
        lines.append(f"| {n:,} | {a['steps_per_s']:.1f} | {5000 / a['steps_per_s'] / 60:.1f} min "
                     f"| {b['steps_per_s']:.1f} | {5000 / b['steps_per_s'] / 60:.1f} min |")
    write_markdown("ROWS", "\n".join(lines))


if __name__ == "__main__":
    main()
