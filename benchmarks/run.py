"""Speed of the amortized guide against NUTS, measured in one run on this machine.

For each example model: training throughput (simulations and steps per second) with compilation
reported separately; posterior sampling latency for 1 dataset x 1000 draws and for 1000 datasets
x 1000 draws; and NUTS (4 chains, 1000 warm-up, 1000 draws) on the same datasets, giving the
per-dataset speed-up and the number of datasets after which amortization (training included)
pays off. Medians over repeats. Writes benchmarks/results/speed.json and the table in
docs/benchmarks.md (between the SPEED markers).

    python benchmarks/run.py            # full run (~15 minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS

import numpyro_amortized
from numpyro_amortized import AutoAmortizedFlow, c2st, fit
from numpyro_amortized.examples import gaussian_linear, linear_regression

ROOT = Path(__file__).resolve().parents[1]


def machine():
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "numpyro_amortized": numpyro_amortized.__version__,
    }


def median_time(fn, repeats):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def regression_datasets(num, rng):
    out = []
    for i in range(num):
        n = [5, 8, 10, 12, 15][i % 5]
        beta = np.array([2.0, 0.0]) + np.array([3.0, 1.0]) * rng.normal(size=2)
        sigma = rng.gamma(1.0)
        x = rng.normal(size=n)
        y = beta[0] + beta[1] * x + sigma * rng.normal(size=n)
        out.append({"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)})
    return out


def gaussian_datasets(num, rng):
    theta = rng.normal(0, np.sqrt(0.1), (num, 10))
    x = theta + rng.normal(0, np.sqrt(0.1), (num, 10))
    return [{"x": jnp.asarray(xi, jnp.float32)} for xi in x]


TASKS = {
    "linear_regression": {
        "model": linear_regression, "guide_kwargs": {"set_sizes": (5, 15)},
        "template": {"x": jnp.zeros(15), "y": jnp.zeros(15)}, "datasets": regression_datasets,
        "flatten": lambda d: np.column_stack([d["beta"], d["sigma"]]),
    },
    "gaussian_linear": {
        "model": gaussian_linear, "guide_kwargs": {}, "template": {"x": jnp.zeros(10)},
        "datasets": gaussian_datasets, "flatten": lambda d: np.asarray(d["theta"]),
    },
}


COMPILES = []  # (program name, seconds) of every XLA compilation, from jax.monitoring
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: COMPILES.append((kw.get("fun_name", "?"), seconds))
    if event.endswith("backend_compile_duration") else None)


def compile_breakdown(compiles):
    """Seconds of XLA compilation in one fit: the training chunk, the simulation program, and
    everything else (eager operations while the networks are built, small programs)."""
    chunk = sum(s for name, s in compiles if name == "jit(run_chunk)")
    sim = sum(s for name, s in compiles if name == "jit(block)")
    return {"chunk": chunk, "simulation": sim, "other": sum(s for _, s in compiles) - chunk - sim}


def bench_task(name, task, *, num_steps, train_repeats, num_nuts, quick):
    model, template = task["model"], task["template"]
    print(f"\n== {name} ==", flush=True)
    # training: repeats of the same fit; compilation is reported apart from training
    fits = []
    for r in range(train_repeats):
        guide = AutoAmortizedFlow(model, **task["guide_kwargs"])
        jax.clear_caches()  # every repeat compiles, as a new process would
        COMPILES.clear()
        t0 = time.perf_counter()
        result = fit(guide, jax.random.PRNGKey(r), num_steps=num_steps, progress_bar=False,
                     **template)
        total = time.perf_counter() - t0
        programs = compile_breakdown(COMPILES)
        fits.append((result.train_time, result.compile_time, total - result.train_time
                     - result.compile_time, programs))
        print(f"  fit {r}: train {result.train_time:.1f} s, compile {result.compile_time:.1f} s",
              flush=True)
    train_time = float(np.median([f[0] for f in fits]))
    compile_time = float(np.median([f[1] for f in fits]))
    setup_time = float(np.median([f[2] for f in fits]))
    programs = {k: float(np.median([f[3][k] for f in fits])) for k in fits[0][3]}
    batch_size = 256
    params = result.params

    # sampling latency
    datasets = task["datasets"](num_nuts, np.random.default_rng(0))
    one = {k: v[None] for k, v in datasets[0].items()}
    latency_1 = median_time(
        lambda: guide.sample_posterior_batch(jax.random.PRNGKey(0), params, one,
                                             sample_shape=(1000,)), 20 if not quick else 3)
    latency_end_to_end = median_time(
        lambda: guide.sample_posterior(jax.random.PRNGKey(0), params, sample_shape=(1000,),
                                       **datasets[0]), 20 if not quick else 3)
    rng = np.random.default_rng(1)
    many = task["datasets"](1000, rng)
    sizes = {k: v.shape for k, v in many[0].items()}
    if name == "linear_regression":  # pad to 15 with a mask, as a user batch of datasets would
        num_obs = jnp.asarray([d["x"].shape[0] for d in many])
        many = [{k: jnp.pad(v, (0, 15 - v.shape[0])) for k, v in d.items()} for d in many]
    else:
        num_obs = None
    batch = {k: jnp.stack([d[k] for d in many]) for k in sizes}
    latency_1000 = median_time(
        lambda: guide.sample_posterior_batch(jax.random.PRNGKey(0), params, batch,
                                             sample_shape=(1000,), num_obs=num_obs),
        5 if not quick else 1)

    # NUTS on the same datasets: a fresh MCMC object per dataset pays its compilation, as a
    # loop over datasets of different shapes would; the same dataset run twice on one object
    # (jit_model_args) gives the time of NUTS once compiled.
    def run_nuts(data, key, mcmc=None):
        mcmc = mcmc or MCMC(NUTS(model), num_warmup=1000, num_samples=1000, num_chains=4,
                            chain_method="vectorized", progress_bar=False, jit_model_args=True)
        t0 = time.perf_counter()
        mcmc.run(key, **data)
        draws = mcmc.get_samples()
        jax.block_until_ready(draws)
        return draws, time.perf_counter() - t0, mcmc

    nuts_times, nuts_compiled, scores = [], [], []
    for i, data in enumerate(datasets):
        ref, seconds, mcmc = run_nuts(data, jax.random.PRNGKey(100 + i))
        nuts_times.append(seconds)
        if i < 2:
            nuts_compiled.append(run_nuts(data, jax.random.PRNGKey(200 + i), mcmc)[1])
        draws = guide.sample_posterior(jax.random.PRNGKey(i), params, sample_shape=(4000,), **data)
        scores.append(c2st(task["flatten"](ref), task["flatten"](draws),
                           classifier_kwargs={"early_stopping": True}))
    nuts_per_dataset = float(np.median(nuts_times))
    nuts_sampling = float(np.median(nuts_compiled))
    amortized_batch_per_dataset = latency_1000 / 1000
    upfront = train_time + compile_time + setup_time
    out = {
        "num_steps": num_steps, "batch_size": batch_size,
        "train_time_s": train_time, "compile_time_s": compile_time, "setup_time_s": setup_time,
        "compile_chunk_s": programs["chunk"], "compile_simulation_s": programs["simulation"],
        "compile_other_s": programs["other"], "fixed_cost_s": compile_time + setup_time,
        "simulations_per_s": num_steps * batch_size / train_time,
        "steps_per_s": num_steps / train_time,
        "latency_1x1000_s": latency_1, "latency_1x1000_end_to_end_s": latency_end_to_end,
        "latency_1000x1000_s": latency_1000,
        "nuts_per_dataset_s": nuts_per_dataset, "nuts_compiled_per_dataset_s": nuts_sampling,
        "nuts_datasets": len(datasets),
        "speedup_per_dataset": nuts_sampling / latency_end_to_end,
        "speedup_per_dataset_in_batch": nuts_sampling / amortized_batch_per_dataset,
        "break_even_datasets": upfront / max(nuts_sampling - amortized_batch_per_dataset, 1e-9),
        "c2st_vs_nuts_median": float(np.median(scores)), "c2st_vs_nuts_max": float(np.max(scores)),
    }
    for k, v in out.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    return out


def markdown(results, info):
    lines = [
        (f"Measured on {info['processor']}, {info['cpu_count']} cores, devices "
        f"{', '.join(info['devices'])}, JAX {info['jax']} (`python benchmarks/run.py`)."),
        "",
        "| | " + " | ".join(results) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    rows = [
        ("training steps (batch 256)", "num_steps", "{:.0f}"),
        ("training time, s (median)", "train_time_s", "{:.1f}"),
        ("compilation of the training chunk (tracing included), s", "compile_time_s", "{:.1f}"),
        ("XLA compilation: training chunk / simulation program / the rest, s", "compile",
         None),
        ("set-up and end-of-training check (pilot simulations, networks, held-out check), s",
         "setup_time_s", "{:.1f}"),
        ("`fit`'s fixed costs (all but the training steps), s", "fixed_cost_s", "{:.1f}"),
        ("simulations / s", "simulations_per_s", "{:,.0f}"),
        ("steps / s", "steps_per_s", "{:.0f}"),
        ("latency, 1 dataset x 1000 draws (jitted core), ms", "latency_1x1000_s", "{:.2f}",
         1e3),
        ("latency, 1 dataset x 1000 draws (`sample_posterior`, checks included), ms",
         "latency_1x1000_end_to_end_s", "{:.1f}", 1e3),
        ("latency, 1000 datasets x 1000 draws, s", "latency_1000x1000_s", "{:.2f}"),
        ("NUTS per dataset (4 chains, 1000+1000), compiled for it, s", "nuts_per_dataset_s",
         "{:.2f}"),
        ("NUTS per dataset, compiled once (same data shapes), s",
         "nuts_compiled_per_dataset_s", "{:.2f}"),
        ("speed-up per dataset, both compiled (NUTS / `sample_posterior`)",
         "speedup_per_dataset", "{:,.0f}x"),
        ("speed-up per dataset in a batch of 1000 (NUTS compiled once)",
         "speedup_per_dataset_in_batch", "{:,.0f}x"),
        ("datasets until amortization pays off (training included; NUTS compiled once)",
         "break_even_datasets", "{:.1f}"),
        ("C2ST vs NUTS, median / max over the NUTS datasets (early-stopping classifier)",
         None, None),
    ]
    for row in rows:
        label, key, fmt = row[:3]
        scale = row[3] if len(row) > 3 else 1.0
        if key is None:
            cells = [f"{r['c2st_vs_nuts_median']:.3f} / {r['c2st_vs_nuts_max']:.3f}"
                     for r in results.values()]
        elif key == "compile":
            cells = [f"{r['compile_chunk_s']:.1f} / {r['compile_simulation_s']:.1f} / "
                     f"{r['compile_other_s']:.1f}" for r in results.values()]
        else:
            cells = [fmt.format(r[key] * scale) for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(section, text, doc="benchmarks.md"):
    path = ROOT / "docs" / doc
    begin, end = f"<!-- {section} BEGIN -->", f"<!-- {section} END -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc += "\n" + block + "\n"
    path.write_text(doc)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny settings")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = parser.parse_args()
    quick = args.quick
    info = machine()
    print(json.dumps(info, indent=1))
    results = {}
    for name in args.tasks:
        steps = 200 if quick else (15_000 if name == "linear_regression" else 3000)
        results[name] = bench_task(name, TASKS[name], num_steps=steps,
                                   train_repeats=1 if quick else 3,
                                   num_nuts=2 if quick else 5, quick=quick)
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    (out_dir / f"speed{suffix}.json").write_text(
        json.dumps({"machine": info, "results": results}, indent=1))
    if not quick:
        write_markdown("SPEED", markdown(results, info))
    print(markdown(results, info))


if __name__ == "__main__":
    main()
