"""A flow ensemble's mixture against each of its members alone, by C2ST and held-out loss.

For each task and budget: train the guide with the package defaults (a fixed budget gives a
flow ensemble, mixed by held-out likelihood), then score the mixture and each member alone
(its weight set to 1) with C2ST (early-stopping classifier) on the first observations of
``benchmarks/sbibm.py``, and report the held-out NPE loss of each on 20,000 fresh simulations.

    python benchmarks/ensemble_members.py gaussian_linear:10000 gaussian_linear:100000 \
        gaussian_linear_uniform:10000 --num-observations 5

Rows are merged into ``benchmarks/results/ensemble_members.json`` and the MEMBERS section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from run import write_markdown  # benchmarks/run.py, next to this script
from sbibm import RESULTS, observations, train

from numpyro_amortized import c2st
from numpyro_amortized.examples.sbibm import TASKS, parameter_vector

LABELS = ("mixture", "spline", "affine")


def measure(name, budget, num_obs):
    task = TASKS[name]
    xs, refs, _ = observations(name, num_obs, num_draws=10_000)
    guide, result, _ = train(name, budget, quick=False)
    params = result.params[guide.param_name]
    sims = jax.jit(lambda k: guide.simulate(k, 20_000, **task.data))(jax.random.PRNGKey(123))
    member_lps = np.asarray(guide.member_log_prob_simulations(params, sims))  # (K, N)
    log_w = np.asarray(params["flow"]["log_weights"])
    mixture_lp = np.logaddexp.reduce(log_w[:, None] + member_lps, axis=0)
    held_out = [float(-mixture_lp.mean())] + [float(-m.mean()) for m in member_lps]
    row = {"task": name, "budget": budget, "weights": np.exp(log_w).round(3).tolist(),
           "held_out": held_out, "c2st": {}}
    for label, lw in zip(LABELS, [log_w, [0.0, -30.0], [-30.0, 0.0]], strict=True):
        flow = dict(params["flow"], log_weights=jnp.asarray(lw, jnp.float32))
        draws = guide.sample_posterior_batch(jax.random.PRNGKey(1),
                                             {guide.param_name: {**params, "flow": flow}},
                                             {"x": jnp.asarray(xs)}, sample_shape=(10_000,))
        theta = parameter_vector(draws, task)
        row["c2st"][label] = [c2st(refs[i], theta[i], classifier_kwargs={"early_stopping": True})
                              for i in range(len(xs))]
        print(f"{name} {budget} {label}: C2ST {np.mean(row['c2st'][label]):.4f}", flush=True)
    return row


def table(rows):
    lines = [("| task, budget | observations | mixture | spline alone | affine alone | "
              "held-out loss: mixture / spline / affine | weights (spline, affine) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        means = [np.mean(r["c2st"][label]) for label in LABELS]
        cells = [f"**{m:.3f}**" if m == min(means) else f"{m:.3f}" for m in means]
        lines.append(f"| {r['task']}, {r['budget']:,} | {len(r['c2st']['mixture'])} | "
                     + " | ".join(cells) + " | "
                     + " / ".join(f"{h:.3f}" for h in r["held_out"])
                     + f" | {', '.join(f'{w:.2f}' for w in r['weights'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="task:budget, e.g. gaussian_linear:10000")
    parser.add_argument("--num-observations", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [measure(run.split(":")[0], int(run.split(":")[1]), args.num_observations)
            for run in args.runs]
    out = RESULTS / "ensemble_members.json"
    stored = json.loads(out.read_text()) if out.exists() else []
    keys = {(r["task"], r["budget"]) for r in rows}
    rows = [r for r in stored if (r["task"], r["budget"]) not in keys] + rows
    out.write_text(json.dumps(rows, indent=1))
    write_markdown("MEMBERS", "C2ST (early-stopping classifier) averaged over the first "
                   "observations of the sbibm suite; held-out NPE loss over 20,000 fresh "
                   "simulations (lower is better).\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
