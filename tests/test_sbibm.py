"""The sbibm tasks: exact references agree with NUTS on the same models, and the runner runs."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy.stats import kstest, norm, truncnorm

from numpyro_amortized.examples.sbibm import TASKS, parameter_vector
from numpyro_amortized.simulation import simulate


def _reference_log_density(name, x, theta):
    """The analytic posterior log density (up to a constant) the exact samplers draw from."""
    if name == "gaussian_linear_uniform":
        return norm.logpdf(theta, x, np.sqrt(0.1)).sum(-1)
    comps = [norm.logpdf(theta, x, s).sum(-1) for s in (1.0, 0.1)]
    return np.logaddexp(*comps)


def _reference_marginal_cdf(name, x, j):
    if name == "gaussian_linear_uniform":
        sd = np.sqrt(0.1)
        return truncnorm((-1 - x[j]) / sd, (1 - x[j]) / sd, loc=x[j], scale=sd).cdf
    return lambda t: 0.5 * norm.cdf(t, x[j], 1.0) + 0.5 * norm.cdf(t, x[j], 0.1)


@pytest.mark.parametrize("name", ["gaussian_linear_uniform", "gaussian_mixture"])
def test_exact_reference_is_the_models_posterior(name):
    """log p(theta, x) from the NumPyro model minus the reference's log density is constant
    over the prior box, and the reference draws follow that density (KS per coordinate); a
    sampler 20% too wide fails."""
    task = TASKS[name]
    x = np.array(simulate(task.model, jax.random.PRNGKey(3), 1, **task.data)["x"][0], np.float64)
    if name == "gaussian_linear_uniform":
        x[0] = 1.05  # one coordinate outside the prior box: the truncation matters
    else:
        x = np.clip(x, -5, 5)  # the box then truncates the mixture by < 1e-6
    box = 1.0 if name == "gaussian_linear_uniform" else 10.0
    rng = np.random.default_rng(0)
    theta = rng.uniform(-box, box, size=(300, len(x))) * 0.999
    theta[:150] = x + 0.3 * rng.normal(size=(150, len(x)))  # near the mode too
    theta = np.clip(theta, -0.999 * box, 0.999 * box)
    joint = jax.vmap(lambda t: log_density(task.model, (), {"x": jnp.asarray(x)},
                                           {"theta": t})[0])(jnp.asarray(theta))
    diff = np.asarray(joint, np.float64) - _reference_log_density(name, x, theta)
    assert np.ptp(diff) < 1e-2, np.ptp(diff)

    draws = task.reference(x, 10_000, rng)
    assert np.all(np.abs(draws) <= box)
    for j in range(len(x)):
        assert kstest(draws[:, j], _reference_marginal_cdf(name, x, j)).pvalue > 1e-3, j
    wide = x + 1.2 * (draws - x)  # a broken sampler: 20% too wide
    assert min(kstest(wide[:, j], _reference_marginal_cdf(name, x, j)).pvalue
               for j in range(len(x))) < 1e-3


@pytest.mark.slow
def test_every_task_simulates_finite_data_of_the_declared_shape():
    for name, task in TASKS.items():
        sims = simulate(task.model, jax.random.PRNGKey(0), 64, **task.data)
        assert sims["x"].shape == (64,) + task.data["x"].shape, name
        assert np.isfinite(np.asarray(sims["x"], np.float64)).all(), name
        theta = parameter_vector(sims, task)
        assert theta.shape[0] == 64 and np.isfinite(theta).all(), name


def test_bernoulli_glm_statistics_have_the_spike_trains_posterior():
    """sbibm's bernoulli_glm observes the sufficient statistics X^T y of the spike train: with
    the same key they are the statistics of bernoulli_glm_raw's spikes, and the two models'
    log joint densities agree at every latent (so their posteriors are the same). A statistic
    off by one spike changes the density differently at different latents."""
    from numpyro_amortized.examples.sbibm import GLM_DESIGN

    stats = simulate(TASKS["bernoulli_glm"].model, jax.random.PRNGKey(5), 8, x=jnp.zeros(10))
    raw = simulate(TASKS["bernoulli_glm_raw"].model, jax.random.PRNGKey(5), 8, x=jnp.zeros(100))
    design = np.concatenate([np.ones((100, 1)), GLM_DESIGN], axis=1)
    np.testing.assert_allclose(stats["x"], np.asarray(raw["x"]) @ design, atol=1e-4)
    np.testing.assert_allclose(stats["filter"], raw["filter"])

    def joint(name, x, i):
        params = {"bias": stats["bias"][i], "filter": stats["filter"][i]}
        return float(log_density(TASKS[name].model, (), {"x": x}, params)[0])

    y, t = raw["x"][0], stats["x"][0]
    diff = [joint("bernoulli_glm", t, i) - joint("bernoulli_glm_raw", y, i) for i in range(8)]
    assert np.ptp(diff) < 1e-3 and abs(diff[0]) < 1e-3, diff
    flipped = t + jnp.asarray(design[np.argmax(np.asarray(y) == 0)], jnp.float32)
    wrong = [joint("bernoulli_glm", flipped, i) - joint("bernoulli_glm_raw", y, i)
             for i in range(8)]
    assert np.ptp(wrong) > 0.1, wrong


def test_slcp_symmetrized_draws_fill_the_four_modes():
    task = TASKS["slcp"]
    draws = np.tile(np.array([[0.5, -0.5, 1.0, 2.0, 0.3]]), (4000, 1))
    out = task.nuts_symmetries(draws, np.random.default_rng(0))
    signs = {tuple(np.sign(r[2:4])) for r in out}
    assert signs == {(1, 1), (1, -1), (-1, 1), (-1, -1)}
    np.testing.assert_array_equal(np.abs(out), np.abs(draws))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::numpyro_amortized.train.GuideCheckWarning")  # --quick
def test_runner_smoke(monkeypatch):
    sbibm = _benchmark_module(monkeypatch)

    # bernoulli_glm: a NUTS reference; the online wall-clock budget (the fixed-budget path is
    # one fit(num_simulations=...) call, tested in test_scale and test_training)
    rows = sbibm.main(["--quick", "--tasks", "bernoulli_glm", "--budgets", "online"])
    assert [(r["task"], r["budget"]) for r in rows] == [("bernoulli_glm", "online")]
    for r in rows:
        assert len(r["c2st"]) == 2 and all(0.4 < s <= 1.0 for s in r["c2st"])
        assert r["sampling_time_s"] > 0 and r["wall_time_s"] > 0


def test_summary_marks_rows_measured_with_earlier_defaults(monkeypatch):
    sbibm = _benchmark_module(monkeypatch)
    old, new = ("ensemble (spline, affine, spline wd 2, affine wd 2)",
                "ensemble (spline, affine, spline wd 0.202, affine wd 0.202)")
    row = {"task": "two_moons", "num_observations": 10, "observations": "sbibm"}
    rows = [{**row, "budget": "10000", "c2st_mean": 0.57, "flow": old},
            {**row, "budget": "100000", "c2st_mean": 0.529, "flow": new}]
    line = next(x for x in sbibm.summary(rows).splitlines() if x.startswith("| two_moons"))
    # 10^4 still gets weight decay 2 (no mark); at 10^5 0.529 beats the NPE .542 and best .530
    assert "| 0.570 (0.606) |" in line and "0.529 (0.542 / 0.530) beats both" in line
    rows[1].update(flow=old, c2st_mean=0.545)
    line = next(x for x in sbibm.summary(rows).splitlines() if x.startswith("| two_moons"))
    assert "0.545§ (0.542 / 0.530) miss" in line
    rows[1].update(flow=new, c2st_mean=0.52995)  # below the best, but not at three decimals
    line = next(x for x in sbibm.summary(rows).splitlines() if x.startswith("| two_moons"))
    assert "0.530 (0.542 / 0.530) level with the best" in line
    # the legend explains the marks some row carries, and only those
    assert sbibm.legend(rows) == ""
    rows[0].update(budget="100000", flow=old)
    assert sbibm.legend(rows).startswith("; §: measured with weight decay 2")
    assert "†" not in sbibm.legend(rows + [{**row, "budget": "online", "flow": "spline"}])
    # a redefined task's rows from before sbibm's definitions carry a mark, new ones do not
    sir = {"task": "sir", "num_observations": 10, "flow": new}
    rows = [{**sir, "budget": "10000", "c2st_mean": 0.574},
            {**sir, "budget": "100000", "c2st_mean": 0.538, "observations": "sbibm"}]
    line = next(x for x in sbibm.summary(rows).splitlines() if x.startswith("| sir"))
    assert "| 0.574¶° (0.680) |" in line and "| 0.538 (0.585 / 0.547)" in line, line
    assert "¶: measured with this package's earlier definition" in sbibm.legend(rows)


def _benchmark_module(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("sbibm", None)
    import sbibm

    return sbibm


@pytest.mark.slow
def test_rejection_reference_draws_the_exact_posterior_and_flags_light_tails(monkeypatch):
    """lotka_volterra's reference sampler, on posteriors we know: gaussian_linear's exact
    Gaussian (C2ST and moments against the analytic posterior), and gaussian_mixture's narrow
    and wide components, which a Student-t around the mode cannot cover: that must be refused."""
    from numpyro_amortized import c2st
    from numpyro_amortized.examples.sbibm import gaussian_linear_posterior

    sbibm = _benchmark_module(monkeypatch)
    task = TASKS["gaussian_linear"]
    x = simulate(task.model, jax.random.PRNGKey(1), 1, **task.data)["x"][0]
    draws, info = sbibm.rejection_reference(task.model, {"x": x}, 4000,
                                            np.random.default_rng(0), num_starts=2)
    assert not info["problems"] and info["khat"] < 0.5 and info["acceptance"] > 0.05, info
    theta = parameter_vector(draws, task)
    mean, sd = map(np.asarray, gaussian_linear_posterior(x))
    assert np.max(np.abs(theta.mean(0) - mean) / sd) < 5 / np.sqrt(4000) * 1.5
    assert np.max(np.abs(theta.std(0) / sd - 1)) < 0.06
    exact = mean + sd * np.random.default_rng(1).normal(size=(4000, len(mean)))
    assert c2st(exact, theta, classifier_kwargs={"early_stopping": True}) < 0.55
    assert c2st(exact, 1.2 * (theta - mean) + mean,  # the same draws 20% too wide
                classifier_kwargs={"early_stopping": True}) > 0.55

    task = TASKS["gaussian_mixture"]
    x = simulate(task.model, jax.random.PRNGKey(1), 1, **task.data)["x"][0]
    draws, info = sbibm.rejection_reference(task.model, {"x": x}, 4000,
                                            np.random.default_rng(0), num_starts=2,
                                            max_proposals=200_000)
    assert draws is None and info["problems"], info


def test_a_refused_reference_is_remembered(monkeypatch, tmp_path):
    """A NUTS reference that fails its checks is cached as refused: the rerun skips the
    observation without running NUTS again (and a reliable run is not refused)."""
    from types import SimpleNamespace

    sbibm = _benchmark_module(monkeypatch)
    monkeypatch.setattr(sbibm, "RESULTS", tmp_path)
    calls = []

    def fake_nuts(model, key, *, reliable, **kwargs):
        calls.append(1)
        samples = {"beta": np.full(40, 0.5), "gamma": np.full(40, 0.1)}
        problems = [] if reliable else ["R-hat 1.3 > 1.01: the chains disagree"]
        return SimpleNamespace(samples=samples,
                               diagnostics={"reliable": reliable, "problems": problems})

    def reference(index, reliable):
        monkeypatch.setattr(sbibm, "run_nuts", lambda *a, **k: fake_nuts(*a, reliable=reliable, **k))
        return sbibm.nuts_reference("sir", index, np.zeros(10), 20, np.random.default_rng(0),
                                    seed=0, quick=False)

    assert reference(3, reliable=False) is None and len(calls) == 1
    assert "R-hat 1.3" in (tmp_path / "references" / "sir_seed0_obs3_20.failed.json").read_text()
    assert reference(3, reliable=True) is None and len(calls) == 1  # not rerun
    assert reference(4, reliable=True).shape == (20, 2) and len(calls) == 2
    assert reference(4, reliable=False).shape == (20, 2) and len(calls) == 2  # cached draws


def test_sbibm_observations_are_read_in_the_models_shapes(monkeypatch, tmp_path):
    """sbibm's stored files (laid out as in its wheel) become data of each model's shape and
    dtype, with the reference draws cut to the number asked; too many draws is an error."""
    sbibm = _benchmark_module(monkeypatch)
    files = tmp_path / "sbibm" / "tasks"

    def write(task, k, name, values, header):
        folder = files / task / "files" / f"num_observation_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / name, np.atleast_2d(values), delimiter=",", header=header,
                   comments="")

    rng = np.random.default_rng(0)
    for k in (1, 2):
        write("slcp", k, "observation.csv", np.arange(8.0) + k, "d1,d2,d3,d4,d5,d6,d7,d8")
        write("slcp", k, "reference_posterior_samples.csv.bz2", rng.normal(size=(6, 5)), "t")
        write("sir", k, "observation.csv", [0.0, 1.0, 352.0, 40.0] + [0.0] * 6, "x")
        write("sir", k, "reference_posterior_samples.csv.bz2", rng.normal(size=(6, 2)), "t")
        write("bernoulli_glm", k, "observation_raw.csv", np.ones(100) * k, "y")
        write("bernoulli_glm", k, "reference_posterior_samples.csv.bz2",
              rng.normal(size=(6, 10)), "t")
    xs, refs, replaced = sbibm.sbibm_observations("slcp", 2, num_draws=4, root=tmp_path)
    assert xs.shape == (2, 4, 2) and xs.dtype == np.float32 and replaced == 0
    np.testing.assert_array_equal(xs[1], (np.arange(8.0) + 2).reshape(4, 2))
    assert [r.shape for r in refs] == [(4, 5), (4, 5)]
    xs, refs, _ = sbibm.sbibm_observations("sir", 2, num_draws=6, root=tmp_path)
    assert xs.dtype == np.int32 and xs[0, 2] == 352 and refs[0].shape == (6, 2)
    xs, _, _ = sbibm.sbibm_observations("bernoulli_glm_raw", 2, num_draws=6, root=tmp_path)
    assert xs.shape == (2, 100) and xs[1, 0] == 2
    with pytest.raises(ValueError, match="7"):
        sbibm.sbibm_observations("sir", 1, num_draws=7, root=tmp_path)
