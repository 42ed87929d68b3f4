"""Why fixed simulation budgets miss: held-out loss of the trained guide, per training setting.

For a fixed budget, ``fit`` draws the simulations once and keeps the parameters with the lowest
validation loss. This script trains the guide on one bank of simulations per task and budget
with a few settings, and reports, on 20,000 fresh simulations from the model:

- the held-out NPE loss ``E[-log q(theta | x)]`` (lower is better; differences between settings
  are differences in the expected KL divergence from the true posterior);
- for gaussian_linear, the exact expected KL ``E[log p(theta | x) - log q(theta | x)]`` (the
  posterior is N(x / 2, 0.05 I));
- the training loss at the end of the run, whose distance below the held-out loss is how much
  of the bank the flow memorized, and the step the validation loss picked.

    python benchmarks/overfitting.py          # about 5 minutes on 2 cores
    python benchmarks/overfitting.py --quick  # smoke run

Writes the OVERFITTING section of docs/dev/notes.md.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from run import write_markdown  # benchmarks/run.py, next to this script

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.examples import gaussian_linear_posterior
from numpyro_amortized.examples.sbibm import TASKS
from numpyro_amortized.networks import affine_flow, ensemble_flow, spline_flow

SETTINGS = {  # label: (guide kwargs, fit kwargs)
    "spline, keep the best only (patience=0)": ({"flow": spline_flow}, {"patience": 0}),
    "spline, plateau (patience 10)": ({"flow": spline_flow}, {}),
    "spline, learning rate 5e-4": ({"flow": spline_flow}, {"learning_rate": 5e-4}),
    "affine flow": ({"flow": affine_flow}, {}),
    "affine flow, learning rate 5e-4": ({"flow": affine_flow}, {"learning_rate": 5e-4}),
    "two-member ensemble, spline and affine (the default before weight decay)": (
        {"flow": partial(ensemble_flow, transformers=("spline", "affine"))},
        {}),
    "defaults: spline and affine, each plain and with weight decay 2": ({}, {}),
}
MAIN = ["spline, keep the best only (patience=0)", "spline, plateau (patience 10)",
        "affine flow", "two-member ensemble, spline and affine (the default before weight decay)",
        "defaults: spline and affine, each plain and with weight decay 2"]
RUNS = [("gaussian_linear", 10_000, list(SETTINGS)), ("two_moons", 10_000, MAIN),
        ("bernoulli_glm_raw", 10_000, MAIN), ("gaussian_linear", 100_000, MAIN)]


def held_out(name, budget, label, *, quick):
    task = TASKS[name]
    guide_kwargs, fit_kwargs = SETTINGS[label]
    guide = AutoAmortizedFlow(task.model, **guide_kwargs, **(task.guide_kwargs or {}))
    steps = {"num_steps": 100 if quick else 5000}  # the same length at every budget
    result = fit(guide, jax.random.PRNGKey(0), num_simulations=budget, progress_bar=False,
                 **steps, **fit_kwargs, **task.data)
    num_test = 2_000 if quick else 20_000
    sims = jax.jit(lambda k: guide.simulate(k, num_test, **task.data))(jax.random.PRNGKey(123))
    log_q = np.asarray(guide.log_prob_simulations(result.params[guide.param_name], sims))
    row = {"task": name, "budget": budget, "setting": label, "held_out": float(-log_q.mean()),
           "train_end": float(np.mean(result.losses[-100:])), "best_step": result.best_step,
           "num_steps": len(result.losses), "kl": None, "weights": None}
    log_w = result.params[guide.param_name]["flow"].get("log_weights")
    if log_w is not None:  # a flow ensemble: its fitted weights, in the order of its members
        row["weights"] = [round(float(w), 2) for w in np.exp(np.asarray(log_w))]
    if name == "gaussian_linear":
        mean, sd = gaussian_linear_posterior(sims.observed["x"])
        theta = sims.latents["theta"]
        log_p = jnp.sum(-0.5 * ((theta - mean) / sd) ** 2 - jnp.log(sd)
                        - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
        row["kl"] = float(np.mean(np.asarray(log_p) - log_q))
    print(row, flush=True)
    return row


def table(rows):
    header = ("| task | budget | setting | held-out loss | expected KL | training loss at the end "
              "| step kept |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kl = "" if r["kl"] is None else f"{r['kl']:.3f}"
        setting = r["setting"] + (f" (weights {r['weights']})" if r.get("weights") else "")
        lines.append(f"| {r['task']} | {r['budget']:,} | {setting} | {r['held_out']:.3f} | "
                     f"{kl} | {r['train_end']:.3f} | {r['best_step']} of {r['num_steps']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny settings")
    args = parser.parse_args()
    rows = [held_out(name, budget, label, quick=args.quick)
            for name, budget, labels in RUNS for label in labels]
    print(table(rows))
    if not args.quick:
        write_markdown("OVERFITTING", "Held-out over 20,000 fresh simulations; one bank per task "
                       "and budget, `fit`'s defaults otherwise (up to 5,000 steps of 256, 100 "
                       "validation checks; \"step kept\" is the step whose parameters are "
                       "returned, of the steps run).\n\n" + table(rows), doc="dev/notes.md")


if __name__ == "__main__":
    main()
