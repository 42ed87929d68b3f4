"""The fixed-budget default's weight decay against decay 2, by held-out likelihood.

For each task and seed, trains two guides on the same bank (``fit``'s key fixes the bank, the
initialization and the batches): one with the default flow for the budget
(:func:`~numpyro_amortized.train.fixed_budget_weight_decay`: the decay follows the bank) and one with decay 2
on the decayed members. Both are scored by their mixture's ``-log q(theta | x)`` over the same
fresh prior-predictive simulations: the difference of the two means is the difference of their
expected KL(p || q), with no reference posterior needed. Prints one line per arm and the paired
difference (``decay2 - default``; negative: decay 2 better) with its standard error over the
simulations (run-to-run spread shows between seeds, not in that error).

Usage::

    python benchmarks/decay_heldout.py --tasks two_moons slcp --seeds 0 1 --budget 100000
"""

import argparse
import time

import jax
import numpy as np

from numpyro_amortized import NPE, AutoAmortizedFlow, fit
from numpyro_amortized.examples.sbibm import TASKS
from numpyro_amortized.networks import ensemble_flow
from numpyro_amortized.train import ENSEMBLE_WEIGHT_DECAY

# the default arm: fit's default decay for its bank; the other: decay 2 on the decayed members
ARMS = {"default": None, "decay2": ENSEMBLE_WEIGHT_DECAY}


def heldout_nll(name, decay, budget, seed, num_fresh):
    """Train on ``budget`` simulations with weight ``decay`` (``None``: fit's default); the
    per-simulation held-out loss (NaN where a fresh simulation is invalid) and the mixture
    weights."""
    task = TASKS[name]
    guide = AutoAmortizedFlow(task.model, flow=ensemble_flow, **(task.guide_kwargs or {}))
    t0 = time.perf_counter()
    result = fit(guide, jax.random.PRNGKey(seed), num_simulations=budget, progress_bar=False,
                 weight_decay=decay, **task.data)
    wall = time.perf_counter() - t0
    fresh = jax.jit(lambda k: guide.simulate(k, num_fresh, **task.data))(
        jax.random.PRNGKey(12345))
    params = result.params[guide.param_name]
    nll = jax.jit(lambda p, s: NPE().validation_losses(guide, p, None, s, **task.data))(
        params, fresh)
    nll = np.where(np.asarray(fresh.valid), np.asarray(nll), np.nan)
    weights = np.round(np.exp(np.asarray(params["flow"]["log_weights"])), 3).tolist()
    return nll, weights, wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--budget", type=int, default=100_000)
    parser.add_argument("--num-fresh", type=int, default=20_000)
    args = parser.parse_args(argv)
    for name in args.tasks:
        for seed in args.seeds:
            nll = {}
            for arm, flow in ARMS.items():
                nll[arm], weights, wall = heldout_nll(name, flow, args.budget, seed,
                                                      args.num_fresh)
                print(f"{name} seed {seed} {arm}: held-out {np.nanmean(nll[arm]):.4f}, "
                      f"weights {weights}, training {wall:.0f} s", flush=True)
            d = nll["decay2"] - nll["default"]
            d = d[np.isfinite(d)]
            print(f"{name} {args.budget} seed {seed}: decay2 - default = {d.mean():+.4f} "
                  f"+- {d.std() / np.sqrt(d.size):.4f} (n={d.size})", flush=True)


if __name__ == "__main__":
    main()
