"""README's main job keeps working: the quick start runs end to end (short mode)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: the second test command

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs():
    env = dict(os.environ, QUICK="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         check=False, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "C2ST amortized vs NUTS" in out.stdout
    assert "sigma" in out.stdout and "faster" in out.stdout
    assert "posterior(): use the " in out.stdout and "Pareto k-hat" in out.stdout


def test_peak_example_runs(tmp_path):
    env = dict(os.environ, QUICK="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "peak_vs_nuts.py")],
                         check=False, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for text in ("Pareto k-hat", "corrected C2ST", "warm start (guide)", "speed-up over the batch"):
        assert text in out.stdout, text
    assert (tmp_path / "peak_pair.png").stat().st_size > 10_000


def test_diagnostics_example_runs(tmp_path):
    env = dict(os.environ, QUICK="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "diagnostics.py")],
                         check=False, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for text in ("Diagnostics per latent", "mean_at_x1", "TARP", "Misspecification",
                 "Student-t(2) noise"):
        assert text in out.stdout, text
    for name in ("sbc_ecdf", "coverage", "recovery", "z_score_contraction", "misspecification"):
        assert (tmp_path / f"diagnostics_{name}.png").stat().st_size > 5_000


def _nuts(model, num_chains, **data):
    import jax
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=num_chains,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), **data)
    return mcmc.get_samples()


def test_reference_posteriors_agree_with_nuts():
    """The exact samplers the benchmarks score against agree with NUTS on the same models."""
    import jax.numpy as jnp
    import numpy as np

    from numpyro_amortized import c2st
    from numpyro_amortized.examples import (
        linear_regression,
        linear_regression_posterior,
        two_moons,
        two_moons_reference_posterior,
    )

    rng = np.random.default_rng(0)
    x = rng.normal(size=7)
    y = 1.0 + 0.5 * x + 0.3 * rng.normal(size=7)
    exact = linear_regression_posterior(x, y, 4000, rng)
    s = _nuts(linear_regression, 4, x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.float32))
    nuts = np.column_stack([s["beta"], s["sigma"]])
    np.testing.assert_array_less(np.abs(nuts.mean(0) - exact.mean(0)), 0.1 * exact.std(0))
    np.testing.assert_array_less(np.abs(nuts.std(0) / exact.std(0) - 1), 0.1)
    assert c2st(exact, nuts, classifier_kwargs={"early_stopping": True}) < 0.55

    obs = np.array([-0.6397, 0.1623])
    exact = two_moons_reference_posterior(obs, 4000, rng)
    nuts = np.asarray(_nuts(two_moons, 8, x=jnp.asarray(obs, jnp.float32))["theta"])
    assert c2st(exact, nuts[rng.permutation(len(nuts))[:4000]],
                classifier_kwargs={"early_stopping": True}) < 0.55


def test_sir_ode_matches_scipy_and_fails_loudly():
    """The diffrax SIR solve equals a tight scipy solve; a failed solve gives NaN, not garbage."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from scipy.integrate import solve_ivp

    from numpyro_amortized.examples import sir, sir_log_infected
    from numpyro_amortized.examples.epidemics import DAYS
    from numpyro_amortized.simulation import simulate

    days = np.asarray(DAYS, np.float64)
    for beta, gamma in ((0.4, 0.125), (0.9, 0.1), (0.15, 0.2)):  # typical, fast, dies out
        def f(t, y, beta=beta, gamma=gamma):
            return [-beta * y[0] * y[1], beta * y[0] * y[1] - gamma * y[1]]
        ref = solve_ivp(f, (0, days[-1]), [1 - 1e-6, 1e-6], t_eval=days, rtol=1e-10, atol=1e-16).y[1]
        got = np.exp(np.asarray(sir_log_infected(beta, gamma, jnp.asarray(days))))
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-12)
    assert np.isnan(np.asarray(sir_log_infected(50.0, 0.1, jnp.asarray(days), max_steps=16))).all()
    sims = simulate(sir, jax.random.PRNGKey(0), 64, x=jnp.zeros(10))
    assert sims["x"].shape == (64, 10) and 0 <= int(sims["x"].min()) <= int(sims["x"].max()) <= 1000
