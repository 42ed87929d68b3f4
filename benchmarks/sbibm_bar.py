"""Where the package defaults stand against the bar: two_moons and gaussian_linear.

Trains ``AutoAmortizedFlow`` with its defaults on a budget of 10^4 simulations (offline), and
online for wall-clock budgets (``fit(..., time_budget=s)``, 15 and 30 s: the whole call up to
the end of training; the end-of-training check comes on top and is counted in the wall time), then scores the posterior of each observation with the exact
sbibm C2ST recipe (10,000 draws per side, MLPClassifier max_iter=10000, 5-fold) against the
exact reference posterior. Observations are drawn from the prior predictive with a fixed seed
(sbibm's stored observations are not shipped with this package). Wall time counts everything a
user waits for: set-up, compilation, simulation and training.

    python benchmarks/sbibm_bar.py                       # 10 observations per task
    python benchmarks/sbibm_bar.py --num-observations 3  # shorter
    python benchmarks/sbibm_bar.py --peers flowjax sbi   # and the peers, side by side
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peers  # benchmarks/peers.py, next to this script
from run import write_markdown  # benchmarks/run.py, next to this script

from numpyro_amortized import AutoAmortizedFlow, c2st, fit
from numpyro_amortized.examples.sbibm import TASKS as SBIBM
from numpyro_amortized.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]
BAR = {  # published figures quoted in the developers' brief: (seconds, C2ST) at 10^4 sims
    "two_moons": {"sbi": (125, 0.572), "BayesFlow": (42, 0.715), "flowjax NPE": (27, 0.588),
                  "JAX online lax.scan": (15, 0.53)},
    "gaussian_linear": {"BayesFlow": (39, 0.522), "sbi": (44, 0.530), "flowjax NPE": (19, 0.573)},
}


def observations(model, template, num, seed):
    sims = simulate(model, jax.random.PRNGKey(seed), num, **template)
    return np.asarray(sims["x"])


def reference(task, x, num, rng):
    return SBIBM[task].reference(x, num, rng)


PEER_NAMES = {"flowjax": "flowjax NPE", "sbi": "sbi NPE (MAF, its default)",
              "sbi_nsf": "sbi NPE (NSF)"}
TASKS = {name: (SBIBM[name].model, SBIBM[name].data) for name in ("two_moons", "gaussian_linear")}


def run(task, mode, num_obs, num_draws, steps, batch_size, seconds=None):
    model, template = TASKS[task]
    guide = AutoAmortizedFlow(model)
    t0 = time.perf_counter()
    if mode == "offline":
        result = fit(guide, jax.random.PRNGKey(0), num_steps=steps, batch_size=batch_size,
                     num_simulations=10_000, progress_bar=False, **template)
    else:
        result = fit(guide, jax.random.PRNGKey(0), time_budget=seconds, batch_size=batch_size,
                     progress_bar=False, **template)
        steps = len(result.losses)
    jax.block_until_ready(result.params)
    wall = time.perf_counter() - t0
    xs = observations(model, template, num_obs, seed=2026)
    draws = guide.sample_posterior_batch(jax.random.PRNGKey(1), result.params,
                                         {"x": jnp.asarray(xs)}, sample_shape=(num_draws,))
    scores = score(task, mode, xs, np.asarray(draws["theta"]), num_draws)
    return {"task": task, "mode": mode, "wall_time_s": wall, "train_time_s": result.train_time,
            "compile_time_s": result.compile_time, "num_simulations": result.num_simulations,
            "steps": steps, "batch_size": batch_size,
            "simulations_per_s": steps * batch_size / result.train_time,
            "c2st_mean": float(np.mean(scores)), "c2st": scores}


def score(task, label, xs, draws, num_draws):
    """C2ST of ``draws[i]`` against the reference posterior of observation ``xs[i]``."""
    scores = []
    for i, x in enumerate(xs):
        ref = reference(task, x, num_draws, np.random.default_rng(i))
        t = time.perf_counter()
        scores.append(c2st(ref, draws[i]))
        print(f"  {task} {label} obs {i}: C2ST {scores[-1]:.3f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    return scores


def run_peer(task, peer, num_obs, num_draws):
    """A peer (benchmarks/peers.py) on 10^4 simulations of the task, scored like ours."""
    model, template = TASKS[task]
    sims = simulate(model, jax.random.PRNGKey(3), 10_000, **template)
    xs = observations(model, template, num_obs, seed=2026)
    draws, info = peers.run_peer(peer, task, np.asarray(sims["theta"]), np.asarray(sims["x"]),
                                 xs, num_draws)
    scores = score(task, peer, xs, draws, num_draws)
    return {"task": task, "mode": peer, "wall_time_s": info["train_s"],
            "sample_time_s": info["sample_s"], "epochs": info["epochs"],
            "num_simulations": 10_000, "c2st_mean": float(np.mean(scores)), "c2st": scores}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-observations", type=int, default=10)
    parser.add_argument("--num-draws", type=int, default=10_000)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--modes", nargs="*", default=["offline", "online"],
                        help="offline: 10^4 simulations, 5000 steps of 256; online: fresh "
                             "simulations for each --online-seconds, batches of 256")
    parser.add_argument("--online-seconds", nargs="*", type=float, default=[15.0, 30.0])
    parser.add_argument("--peers", nargs="*", default=[], choices=sorted(peers.SCRIPTS),
                        help="also run these peers on the same task, budget and observations")
    args = parser.parse_args()
    rows = []
    jobs = [(m, None) for m in args.modes if m == "offline"]
    jobs += [("online", s) for m in args.modes if m == "online" for s in args.online_seconds]
    for task in args.tasks:
        for mode, seconds in jobs:
            rows.append(run(task, mode, args.num_observations, args.num_draws,
                            5000 if mode == "offline" else None, 256, seconds))
            if seconds:
                rows[-1]["time_budget_s"] = seconds
        for peer in args.peers:
            rows.append(run_peer(task, peer, args.num_observations, args.num_draws))
        for r in rows[-len(jobs) - len(args.peers):]:
            print(f"{task} {r['mode']}: wall {r['wall_time_s']:.1f} s, "
                  f"C2ST {r['c2st_mean']:.3f}", flush=True)
    out = ROOT / "benchmarks" / "results" / "sbibm_bar.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(out.read_text())["rows"] if out.exists() else []
    key = lambda r: (r["task"], r["mode"], r.get("time_budget_s"))
    new_keys = {key(r) for r in rows}
    rows = [r for r in stored if key(r) not in new_keys] + rows
    order = ["offline", "online", *PEER_NAMES]
    rows.sort(key=lambda r: (r["task"] != "two_moons", order.index(r["mode"]),
                             r.get("time_budget_s") or 0))
    out.write_text(json.dumps({"devices": [str(d) for d in jax.devices()], "rows": rows},
                              indent=1))
    lines = [("| task | method | simulations | wall time, s | time / ours (10^4) | "
              "C2ST (mean over observations) |"), "| --- | --- | --- | --- | --- | --- |"]
    for task in dict.fromkeys(r["task"] for r in rows):
        ours = next((r["wall_time_s"] for r in rows if r["task"] == task
                     and r["mode"] == "offline"), None)
        ratio = lambda sec, ours=ours: f"{sec / ours:.2f}" if ours else "-"
        for r in (r for r in rows if r["task"] == task):
            if r["mode"] in PEER_NAMES:
                method, sims, c = f"{PEER_NAMES[r['mode']]} (run here)", "10^4", \
                    f"{r['c2st_mean']:.3f}"
            else:
                method, c = "**numpyro_amortized defaults**", f"**{r['c2st_mean']:.3f}**"
                sims = ("10^4 (offline)" if r["mode"] == "offline"
                        else f"{r['num_simulations']:,} (online, time_budget="
                             f"{r['time_budget_s']:g} s)" if r.get("time_budget_s")
                        else f"{r['num_simulations']:,} (online, {r['steps']} steps)")
            lines.append(f"| {task} | {method} | {sims} | {r['wall_time_s']:.0f} | "
                         f"{ratio(r['wall_time_s'])} | {c} ({len(r['c2st'])} obs.) |")
        for name, (sec, score) in BAR[task].items():  # another machine: no ratio
            lines.append(f"| {task} | {name} (quoted in the brief) | 10^4 | {sec} | - | "
                         f"{score:.3f} |")
    text = (f"{args.num_draws:,} draws per side, exact sbibm C2ST recipe (the number of "
            "observations is given per row).\n\n" + "\n".join(lines))
    write_markdown("BAR", text)
    print(text)


if __name__ == "__main__":
    main()
