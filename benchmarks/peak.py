"""The peak-plus-background model: NUTS vs amortized vs PSIS-corrected, time and C2ST, one run.

Trains the guide of examples/peak_vs_nuts.py once, then on 20 prior-predictive datasets runs
NUTS (4 vectorized chains, 1000 warm-up + 1000 draws, compiled once for all datasets), the
amortized posterior and its PSIS correction, with C2ST against NUTS (exact sbibm recipe, 1,000
draws per side, unless --fast-c2st). Times are per dataset with compilation reported apart;
speed-ups are ratios from this run. Then warm-started against cold NUTS at several warm-up
lengths: the shortest warm-up reaching R-hat < 1.01 and bulk ESS > 400 for each.
Writes benchmarks/results/peak.json and the PEAK section of docs/peak.md.

    python benchmarks/peak.py              # full run (about 25 minutes on 2 CPU cores)
    python benchmarks/peak.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import machine, write_markdown  # benchmarks/run.py, next to this script

from numpyro_amortized import AutoAmortizedFlow, compare_with_nuts, fit, run_nuts, warm_start_nuts
from numpyro_amortized.examples import peak_datasets, peak_model

ROOT = Path(__file__).resolve().parents[1]
WARMUPS = (25, 50, 100, 200, 400, 1000)  # 100 must be one of them (the table uses it)


def shortest_warmup(runs):
    ok = [w for w, r in sorted(runs.items())
          if r["rhat_max"] < 1.01 and r["ess_bulk_min"] > 400]
    return ok[0] if ok else None


def bench_warm_start(guide, params, datasets, warmups):
    out = []
    for i, data in enumerate(datasets):
        rows = {"cold": {}, "warm": {}}
        for w in warmups:
            key = jax.random.PRNGKey(100 + i)
            runs = {"cold": run_nuts(peak_model, key, num_warmup=w, **data),
                    "warm": warm_start_nuts(guide, params, key, num_warmup=w, **data)}
            for name, r in runs.items():
                d = r.diagnostics
                rows[name][w] = {
                    "rhat_max": d["rhat_max"], "ess_bulk_min": d["ess_bulk_min"],
                    "divergences": d["divergences"], "run_time": r.run_time,
                    "gradient_evaluations": float(r.inference_data.sample_stats.n_steps.sum()),
                }
        out.append({"dataset": i, "cold": rows["cold"], "warm": rows["warm"],
                    "shortest_cold": shortest_warmup(rows["cold"]),
                    "shortest_warm": shortest_warmup(rows["warm"])})
        print(f"warm start, dataset {i}: shortest warm-up cold {out[-1]['shortest_cold']}, "
              f"warm {out[-1]['shortest_warm']}")
    return out


def _get(runs, warmup):
    """A run by warm-up length (JSON turns the integer keys into strings)."""
    return runs[warmup] if warmup in runs else runs[str(warmup)]


def _per_ess(run):
    return run["gradient_evaluations"] / max(run["ess_bulk_min"], 1)


def markdown(res, info):
    ds = res["datasets"]
    t = res["totals"]
    c2st_label = "exact sbibm recipe" if res["exact_c2st"] else "early-stopping classifier"
    trusted = [d for d in ds if d["pareto_k"] < 0.7]
    good = [d for d in trusted if d["c2st_corrected"] <= 0.6]
    checked = [d for d in trusted if d["nuts_reliable"]]
    checked_good = [d for d in checked if d["c2st_corrected"] <= 0.6]
    def med(k):
        return float(np.median([d[k] for d in ds]))

    lines = [
        (f"Measured on {info['processor']}, {info['cpu_count']} cores, JAX {info['jax']} "
        f"(`python benchmarks/peak.py`). Guide: package defaults, {res['num_steps']:,} steps "
        f"of {res['batch_size']} ({res['train_time']:.0f} s training + "
        f"{res['compile_time']:.0f} s compilation). {len(ds)} prior-predictive datasets; C2ST "
        f"against NUTS with the {c2st_label}, 1,000 draws per side."),
        "",
        "| | NUTS (4 chains, 1000 + 1000, target acceptance 0.95) | amortized | PSIS-corrected |",
        "| --- | --- | --- | --- |",
        (f"| time per dataset, median, s | {med('time_nuts'):.3f} | {med('time_amortized'):.4f} "
        f"| {med('time_corrected'):.3f} |"),
        (f"| compilation (once), s | {t['time_nuts_compile']:.1f} | "
        f"{t['time_amortized_compile']:.1f} | - |"),
        (f"| speed-up per dataset vs NUTS (ratio of medians) | 1 | "
        f"{med('time_nuts') / med('time_amortized'):,.0f}x | "
        f"{med('time_nuts') / med('time_corrected'):,.1f}x |"),
        (f"| C2ST vs NUTS, median / max | - | {med('c2st_amortized'):.3f} / "
        f"{max(d['c2st_amortized'] for d in ds):.3f} | {med('c2st_corrected'):.3f} / "
        f"{max(d['c2st_corrected'] for d in ds):.3f} |"),
        "",
        (f"Pareto k-hat < 0.7 on **{len(trusted)} of {len(ds)}** datasets (median k-hat "
        f"{med('pareto_k'):.2f}); on those the corrected posterior has C2ST <= 0.6 on "
        f"**{len(good)} of {len(trusted)}**, and on the {len(checked)} of those where NUTS "
        f"passes its own checks (R-hat <= 1.01, ESS >= 400, no divergence) on "
        f"**{len(checked_good)} of {len(checked)}**. Over the batch of {len(ds)}: NUTS "
        f"{t['time_nuts']:.1f} s (+ {t['time_nuts_compile']:.0f} s compilation), amortized "
        f"{t['time_amortized']:.1f} s with training counted once: "
        f"{t['speedup']:.2f}x over the batch."),
        "",
        ("| dataset | C2ST amortized | C2ST corrected | k-hat | IS ESS | NUTS R-hat | NUTS "
        "divergences | NUTS s | amortized ms |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in ds:
        lines.append(f"| {d['dataset']} | {d['c2st_amortized']:.3f} | {d['c2st_corrected']:.3f} "
                     f"| {d['pareto_k']:.2f} | {d['is_ess']:.0f} | {d['rhat_max']:.3f} | "
                     f"{d['divergences']} | {d['time_nuts']:.2f} | "
                     f"{1e3 * d['time_amortized']:.1f} |")
    ws = res["warm_start"]
    if ws:
        lines += ["", (f"Warm-started NUTS (`warm_start_nuts`: chains start at PSIS-corrected guide "
                  "draws, their covariance is the dense inverse mass matrix, the warm-up tunes "
                  "the step size) against a cold start, 4 chains x 1000 draws, on the first "
                  f"{len(ws)} datasets; medians over datasets of the worst R-hat, the smallest "
                  "bulk ESS, divergences and gradient evaluations per effective draw:"), "",
                  ("| warm-up | R-hat cold | R-hat warm | ESS cold | ESS warm | divergences "
                  "cold | warm | gradient evals / ESS cold | warm |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for w in res["warmups"]:
            def cell(kind, key, w=w):
                return float(np.median([_get(x[kind], w)[key] for x in ws]))

            def per(kind, w=w):
                return float(np.median([_per_ess(_get(x[kind], w)) for x in ws]))

            lines.append(
                f"| {w} | {cell('cold', 'rhat_max'):.3f} | {cell('warm', 'rhat_max'):.3f} | "
                f"{cell('cold', 'ess_bulk_min'):.0f} | {cell('warm', 'ess_bulk_min'):.0f} | "
                f"{cell('cold', 'divergences'):.0f} | {cell('warm', 'divergences'):.0f} | "
                f"{per('cold'):.0f} | {per('warm'):.0f} |")
        short = [(x["dataset"], x["shortest_cold"], x["shortest_warm"]) for x in ws]
        lines += ["", "Shortest warm-up reaching R-hat < 1.01 and bulk ESS > 400 (dataset: "
                  "cold, warm; None = not reached with any): "
                  + "; ".join(f"{d}: {c}, {h}" for d, c, h in short) + "."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fast-c2st", action="store_true", help="early-stopping classifier")
    parser.add_argument("--num-steps", type=int, default=20_000)
    parser.add_argument("--num-datasets", type=int, default=20)
    parser.add_argument("--warm-datasets", type=int, default=5)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the docs table from benchmarks/results/peak.json")
    args = parser.parse_args()
    if args.markdown_only:
        saved = json.loads((ROOT / "benchmarks" / "results" / "peak.json").read_text())
        write_markdown("PEAK", markdown(saved["results"], saved["machine"]), "peak.md")
        return
    quick = args.quick
    num_steps = 300 if quick else args.num_steps
    batch_size = 512
    n_data = 3 if quick else args.num_datasets
    info = machine()
    info["jax"] = jax.__version__

    z = jnp.zeros(40)
    guide = AutoAmortizedFlow(peak_model)
    result = fit(guide, jax.random.PRNGKey(0), x=z, y_err=z + 0.1, y=z, num_steps=num_steps,
                 batch_size=batch_size)
    datasets, _ = peak_datasets(jax.random.PRNGKey(2026), n_data)
    exact = not (args.fast_c2st or quick)
    t0 = time.perf_counter()
    report = compare_with_nuts(guide, result.params, jax.random.PRNGKey(1), datasets,
                               train_time=result.train_time,
                               c2st_kwargs=None if exact else {"early_stopping": True},
                               nuts_kwargs={"target_accept_prob": 0.95,
                                            **({"num_warmup": 200, "num_samples": 200}
                                               if quick else {})})
    print(report)
    print(f"comparison took {time.perf_counter() - t0:.0f} s")
    warmups = (25, 100) if quick else WARMUPS
    ws = bench_warm_start(guide, result.params, datasets[: 1 if quick else args.warm_datasets],
                          warmups)
    res = {
        "num_steps": num_steps, "batch_size": batch_size, "train_time": result.train_time,
        "compile_time": result.compile_time, "exact_c2st": exact,
        "datasets": report.datasets.to_dict(orient="records"), "totals": report.totals,
        "warm_start": ws, "warmups": list(warmups),
    }
    text = markdown(res, info)
    print(text)
    out = ROOT / "benchmarks" / "results" / f"peak{'_quick' if quick else ''}.json"
    out.write_text(json.dumps({"machine": info, "results": res}, indent=1, default=float))
    if not quick:
        write_markdown("PEAK", text, "peak.md")


if __name__ == "__main__":
    main()
