"""Posteriors cut by a bounded prior: the guide where the truth sits near the prior's edge.

sbibm's gaussian_linear_uniform (``theta ~ U(-1, 1)^10``, ``x ~ N(theta, 0.1 I)``) has an exact
posterior, ``N(x, 0.1 I)`` truncated to the box, so the cut can be measured on its own:
observations from parameters in the interior (``|theta| <= 0.5``) and with three coordinates at
0.8, 0.95 and 1.0 from the centre (signs at random; the posterior sd is 0.32, so the box cuts
the posterior of those coordinates more and more). For each kind, 3 observations: C2ST
(sbibm's classifier with early stopping, 1,000 draws a side) of the raw guide and of
``posterior``'s checked draws against the exact posterior, and, on the three cut coordinates,
the guide's largest mean error in exact posterior sds and its sd ratio. Guides: the defaults on
10^4 simulations and the flow-matching density (up to 40,000 steps, as in the sbibm
flow-matching rows).

Usage::

    python benchmarks/bounded.py                 # train, score, write docs/benchmarks.md
    python benchmarks/bounded.py --markdown-only # rewrite the docs table from the results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from run import machine, write_markdown
from sbibm import train

from numpyro_amortized import c2st, posterior
from numpyro_amortized.examples.sbibm import TASKS
from numpyro_amortized.networks import flow_matching

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bounded.json"
KINDS = {"interior": None, "0.8": 0.8, "0.95": 0.95, "1.0": 1.0}
CUT = 3  # coordinates placed at the distance from the centre
NOISE_SD = np.sqrt(0.1)


def observations(per_kind=3, seed=0):
    """``(kind, theta, x)`` for each kind of observation."""
    rng = np.random.default_rng(seed)
    out = []
    for kind, edge in KINDS.items():
        for _ in range(per_kind):
            theta = rng.uniform(-0.5, 0.5, 10)
            if edge is not None:
                theta[:CUT] = edge * rng.choice([-1.0, 1.0], CUT)
            out.append((kind, theta, theta + NOISE_SD * rng.normal(size=10)))
    return out


def score(draws, ref):
    """C2ST against the exact draws, and the cut coordinates' largest mean error (exact sds)
    and their sd ratios (smallest, largest)."""
    draws, ref = np.asarray(draws, np.float64), np.asarray(ref, np.float64)
    sd = ref[:, :CUT].std(0)
    err = np.abs(draws[:, :CUT].mean(0) - ref[:, :CUT].mean(0)) / sd
    ratio = draws[:, :CUT].std(0) / sd
    score = c2st(ref[:1000], draws[:1000], classifier_kwargs={"early_stopping": True})
    return {"c2st": float(score), "mean_err": float(err.max()),
            "sd_ratio_min": float(ratio.min()), "sd_ratio_max": float(ratio.max())}


def run_flow(name, flow, num_steps, obs):
    task = TASKS["gaussian_linear_uniform"]
    guide, result, wall = train("gaussian_linear_uniform", 10_000, quick=False, flow=flow,
                                num_steps=num_steps)
    print(name, f"trained in {wall:.0f} s ({len(result.losses)} steps)", flush=True)
    rows = []
    for i, (kind, theta, x) in enumerate(obs):
        ref = task.reference(x, 4000, np.random.default_rng(100 + i))
        raw = guide.sample_posterior(jax.random.PRNGKey(i), result.params,
                                     x=jnp.asarray(x, jnp.float32), sample_shape=(4000,))
        t = time.perf_counter()
        checked = posterior(guide, result.params, jax.random.PRNGKey(50 + i),
                            x=jnp.asarray(x, jnp.float32), num_samples=1000)
        seconds = time.perf_counter() - t
        row = {"kind": kind, "theta": theta.tolist(), "raw": score(raw["theta"], ref),
               "posterior": score(checked.draws["theta"], ref), "method": checked.method,
               "pareto_k": float(checked.pareto_k), "posterior_s": seconds}
        print(name, i, kind, row["raw"], row["method"], f"{row['pareto_k']:.2f}",
              row["posterior"]["c2st"], flush=True)
        rows.append(row)
    return {"train_s": wall, "num_steps": len(result.losses), "rows": rows}


def markdown(res, info):
    lines = [("gaussian_linear_uniform on 10^4 simulations, 3 observations per kind (three "
              "coordinates of the true parameter at the given distance from the centre of the "
              "box +-1; posterior sd 0.32), against the exact truncated posterior "
              f"({info['cpu_count']} cores; `python benchmarks/bounded.py`). C2ST: sbibm's "
              "classifier with early stopping, mean over the 3; errors on the 3 cut "
              "coordinates, the largest over "
              "observations: mean error in exact sds, and the range of sd ratios."), "",
             ("| guide | train s | kind | raw C2ST | raw mean error | raw sd ratio | "
              "`posterior` C2ST | `posterior` paths |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        for kind in KINDS:
            rows = [x for x in r["rows"] if x["kind"] == kind]
            raw = [x["raw"] for x in rows]
            paths = ", ".join(sorted({x["method"] for x in rows}))
            lines.append(
                f"| {name} | {r['train_s']:.0f} | {kind} | "
                f"{np.mean([x['c2st'] for x in raw]):.3f} | "
                f"{max(x['mean_err'] for x in raw):.2f} | "
                f"{min(x['sd_ratio_min'] for x in raw):.2f}-"
                f"{max(x['sd_ratio_max'] for x in raw):.2f} | "
                f"{np.mean([x['posterior']['c2st'] for x in rows]):.3f} | {paths} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--flows", nargs="+", default=["defaults", "flow_matching"],
                        choices=["defaults", "flow_matching"])
    opts = parser.parse_args()
    if opts.markdown_only:
        saved = json.loads(OUT.read_text())
        write_markdown("BOUNDED", markdown(saved["results"], saved["machine"]))
        return
    obs = observations()
    flows = {"defaults": (None, None), "flow_matching": (flow_matching, 40_000)}
    res = json.loads(OUT.read_text())["results"] if OUT.exists() else {}  # keep the others
    res.update({name: run_flow(name, *flows[name], obs) for name in opts.flows})
    res = {name: res[name] for name in flows if name in res}
    info = machine()
    OUT.write_text(json.dumps({"machine": info, "results": res}, indent=1))
    write_markdown("BOUNDED", markdown(res, info))


if __name__ == "__main__":
    main()
