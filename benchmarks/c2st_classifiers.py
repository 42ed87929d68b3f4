"""The two C2ST classifiers on the same draws: sbibm's exact recipe against early stopping.

Trains the package defaults on one sbibm task and budget (as ``benchmarks/sbibm.py`` does, same
seeds, observations and references), draws 10,000 posterior samples for the first
``num_observations`` observations, and scores each with both classifiers of
``numpyro_amortized.c2st``: the exact sbibm recipe, and the early-stopping one that the suite
uses where the exact one is slow (``--fast-c2st``).

    python benchmarks/c2st_classifiers.py bernoulli_glm 100000 3
"""

from __future__ import annotations

import sys
import time

from sbibm import TASKS, observations, posterior_draws, train  # benchmarks/sbibm.py

from numpyro_amortized import c2st


def main(name, budget, num_observations):
    xs, refs, _ = observations(name, 10, num_draws=10_000)
    guide, result, _ = train(name, budget, quick=False)
    theta, _ = posterior_draws(guide, result, TASKS[name], xs, 10_000)
    for i in range(num_observations):
        t = time.perf_counter()
        fast = c2st(refs[i], theta[i], classifier_kwargs={"early_stopping": True})
        t_fast, t = time.perf_counter() - t, time.perf_counter()
        exact = c2st(refs[i], theta[i])
        print(f"{name} {budget} obs {i}: early stopping {fast:.4f} ({t_fast:.0f} s), "
              f"exact recipe {exact:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
