"""Hierarchical guides at scale: cost against the number of groups, with NUTS alongside.

For J = 10, 100 and 1000 groups of the hierarchical regression
(:func:`numpyro_amortized.examples.hierarchical.varying_slopes`, 10 rows per group, so
2J + 5 latents and 10J rows): a guide set up for J groups is trained for a few hundred steps
(batch 256, 1,024 held-out simulations validated every 50 steps) to time a training step,
compilation apart; then ``sample_posterior`` draws 1000
posterior draws of one dataset (all J groups' locals in one call; median over repeats, the
first call apart), and NUTS (non-centered, 1 chain, 500 warm-up and 500 draws) runs on the same
dataset. Writes benchmarks/results/hierarchical_scale.json and the table in docs/scaling.md
(between the HIERARCHICAL markers).

    python benchmarks/hierarchical_scale.py            # J = 10, 100, 1000 (~11 minutes, 2 cores)
    python benchmarks/hierarchical_scale.py --quick    # J = 10, 30: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import reparam
from numpyro.infer import MCMC, NUTS, Predictive
from numpyro.infer.reparam import LocScaleReparam
from run import machine, median_time, write_markdown

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.examples.hierarchical import varying_slopes

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_GROUP = 10


def bench(num_groups, num_steps, repeats):
    print(f"\n== J = {num_groups} ==", flush=True)
    rng = np.random.default_rng(num_groups)
    group = jnp.asarray(np.repeat(np.arange(num_groups), ROWS_PER_GROUP), jnp.int32)
    x = jnp.asarray(rng.normal(size=group.shape[0]), jnp.float32)
    y = Predictive(varying_slopes, num_samples=1)(jax.random.PRNGKey(1), group, x,
                                                  num_groups)["y"][0]
    guide = AutoAmortizedFlow(varying_slopes)
    t0 = time.perf_counter()
    # validation every 50 steps, as in a long fit (a short fit's default is every tenth of it)
    result = fit(guide, jax.random.PRNGKey(0), group, x, num_groups, y=y, num_steps=num_steps,
                 num_chunks=max(1, num_steps // 50), progress_bar=False, check=False)
    total = time.perf_counter() - t0
    step = result.train_time / len(result.losses)
    print(f"  fit: {total:.1f} s, step {1e3 * step:.1f} ms, compile {result.compile_time:.1f} s",
          flush=True)
    sample = lambda: guide.sample_posterior(jax.random.PRNGKey(2), result.params, group, x,
                                            num_groups, y=y, sample_shape=(1000,))
    t0 = time.perf_counter()
    draws = sample()
    jax.block_until_ready(draws)
    first = time.perf_counter() - t0
    latency = median_time(sample, repeats)
    assert draws["a"].shape == (1000, num_groups)
    noncentered = reparam(varying_slopes, config={"a": LocScaleReparam(0),
                                                  "b": LocScaleReparam(0)})
    mcmc = MCMC(NUTS(noncentered), num_warmup=500, num_samples=500, progress_bar=False)
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(3), group, x, num_groups, y=y)
    jax.block_until_ready(mcmc.get_samples())
    nuts = time.perf_counter() - t0
    out = {"num_groups": num_groups, "latents": 2 * num_groups + 5,
           "rows": int(group.shape[0]), "num_steps": len(result.losses),
           "step_s": step, "compile_s": result.compile_time,
           "fit_setup_s": total - result.train_time - result.compile_time,
           "sample_first_s": first, "sample_1x1000_s": latency, "nuts_s": nuts,
           "speedup": nuts / latency}
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def markdown(results, info):
    cols = [f"J = {r['num_groups']}" for r in results]
    rows = [
        ("latents / rows", lambda r: f"{r['latents']} / {r['rows']}"),
        ("training step (batch 256), ms", lambda r: f"{1e3 * r['step_s']:.0f}"),
        ("compilation of the training chunk, s", lambda r: f"{r['compile_s']:.1f}"),
        ("set-up (pilot simulations, networks), s", lambda r: f"{r['fit_setup_s']:.1f}"),
        ("`sample_posterior`, 1 dataset x 1000 draws, first call, s",
         lambda r: f"{r['sample_first_s']:.2f}"),
        ("`sample_posterior`, 1 dataset x 1000 draws, ms",
         lambda r: f"{1e3 * r['sample_1x1000_s']:.1f}"),
        ("NUTS (non-centered, 1 chain, 500 + 500, compilation included), s",
         lambda r: f"{r['nuts_s']:.1f}"),
        ("speed-up per dataset (NUTS / `sample_posterior`)", lambda r: f"{r['speedup']:,.0f}x"),
    ]
    lines = [(f"Measured on {info['processor']}, {info['cpu_count']} cores, devices "
              f"{', '.join(info['devices'])}, JAX {info['jax']} "
              "(`python benchmarks/hierarchical_scale.py`)."), "",
             "| | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    lines += [f"| {label} | " + " | ".join(f(r) for r in results) + " |" for label, f in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    plan = [(10, 60, 3), (30, 60, 3)] if opts.quick else [(10, 400, 20), (100, 200, 10),
                                                            (1000, 40, 5)]
    results = [bench(j, steps, repeats) for j, steps, repeats in plan]
    info = machine()
    if opts.quick:
        print(markdown(results, info))
        return
    out = ROOT / "benchmarks" / "results" / "hierarchical_scale.json"
    out.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    write_markdown("HIERARCHICAL", markdown(results, info), doc="scaling.md")


if __name__ == "__main__":
    main()
