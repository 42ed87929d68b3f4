"""Side by side with NUTS: the report, PSIS correction and warm starts against exact answers.

The model is Bayesian linear regression with a Gaussian prior, whose posterior is Gaussian and
known exactly. "Guides" here are that exact posterior, or deliberately wrong versions of it
(shifted, too narrow, too wide), so every number the comparison reports has a known right
answer; a trained AutoAmortizedFlow is compared at the end. C2ST uses the sbibm classifier
with early stopping and 1,000 draws per side (the exact recipe runs in benchmarks/).
"""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.compare import (
    NUTSRunner,
    compare_with_nuts,
    guide_inference_data,
    importance_resample,
    response_sites,
    run_nuts,
    warm_start_nuts,
)
from numpyro_amortized.compare.arviz_data import ARVIZ_1
from numpyro_amortized.examples import linear_regression

matplotlib.use("Agg")
C2ST_KWARGS = {"early_stopping": True}
NOISE = 0.5


def linear_gaussian(A, y=None):
    """theta ~ N(0, I), y ~ N(A theta, NOISE^2 I)."""
    theta = numpyro.sample("theta", dist.Normal(jnp.zeros(A.shape[1]), 1.0).to_event(1))
    numpyro.sample("y", dist.Normal(A @ theta, NOISE).to_event(1), obs=y)


def exact_posterior(A, y):
    A, y = np.asarray(A, np.float64), np.asarray(y, np.float64)
    cov = np.linalg.inv(np.eye(A.shape[1]) + A.T @ A / NOISE**2)
    return cov @ A.T @ y / NOISE**2, cov


class GaussianGuide:
    """The exact posterior of ``linear_gaussian``, optionally broken: its mean moved by
    ``shift`` marginal sds and its spread multiplied by ``scale`` (params)."""

    model = staticmethod(linear_gaussian)

    def _dist(self, params, A, y):
        mean, cov = exact_posterior(A, y)
        sd = np.sqrt(np.diag(cov))
        mean = mean + params.get("shift", 0.0) * sd
        cov = cov * params.get("scale", 1.0) ** 2
        return dist.MultivariateNormal(jnp.asarray(mean, jnp.float32),
                                       jnp.asarray(cov, jnp.float32))

    def sample_posterior(self, key, params, *, A, y, sample_shape=()):
        return {"theta": self._dist(params, A, y).sample(key, sample_shape)}

    def log_prob(self, params, latents, *, A, y):
        return self._dist(params, A, y).log_prob(latents["theta"])


def dataset(seed, n=20, d=3, collinear=0.0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d))
    if collinear:
        A = A[:, :1] + collinear * A
    theta = rng.normal(size=d)
    y = A @ theta + NOISE * rng.normal(size=n)
    return {"A": jnp.asarray(A, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def exact_draws(data, n, seed=0):
    mean, cov = exact_posterior(data["A"], data["y"])
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


GOOD = {}
SHIFTED = {"shift": np.array([0.0, 1.0, 0.0])}  # theta[1] off by one posterior sd
NARROW = {"scale": 0.5}
MEDIOCRE = {"shift": 0.5, "scale": 1.4}
NUTS_FAST = {"num_warmup": 500, "num_samples": 1000}


@pytest.fixture(scope="module")
def datasets():
    return [dataset(s) for s in range(3)]


@pytest.fixture(scope="module")
def good_report(datasets):
    return compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), datasets,
                             nuts_kwargs=NUTS_FAST, c2st_kwargs=C2ST_KWARGS, train_time=1.0,
                             progress_bar=False)


def test_nuts_reference_matches_exact_posterior_and_compiles_once(datasets):
    runner = NUTSRunner(linear_gaussian)
    runs = [runner.run(jax.random.PRNGKey(i), **d) for i, d in enumerate(datasets)]
    assert runs[0].compile_time > 0
    assert all(r.compile_time == 0 for r in runs[1:])  # one compilation for all datasets
    for r, d in zip(runs, datasets):
        mean, cov = exact_posterior(d["A"], d["y"])
        sd = np.sqrt(np.diag(cov))
        theta = r.samples["theta"]
        assert theta.shape == (4000, 3)
        assert np.abs((theta.mean(0) - mean) / sd).max() < 0.1
        assert np.abs(theta.std(0) / sd - 1).max() < 0.1
        assert r.diagnostics["reliable"], r.diagnostics
        idata = r.inference_data
        groups = set(idata.children) if ARVIZ_1 else set(idata.groups())  # DataTree / 0.x
        assert {"posterior", "sample_stats", "observed_data"} <= groups
        assert idata.posterior["theta"].shape == (4, 1000, 3)
        for field in ("diverging", "tree_depth", "step_size", "n_steps", "energy"):
            assert idata.sample_stats[field].shape == (4, 1000)
        np.testing.assert_allclose(idata.observed_data["y"], d["y"])
        assert np.all(idata.sample_stats["tree_depth"] >= 1)


def test_nuts_runs_the_model_it_is_given(datasets):
    """nuts_model is what NUTS runs: a model of another posterior is flagged against the exact
    guide. (A reparametrization of the same one agrees: the slow multilevel binomial test.)"""
    def other_prior(A, y=None):
        theta = numpyro.sample("theta", dist.Normal(jnp.full(A.shape[1], 3.0), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(A @ theta, NOISE).to_event(1), obs=y)

    report = compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), datasets[0],
                               nuts_model=other_prior, nuts_kwargs=NUTS_FAST,
                               c2st_samples=None, correct=False, progress_bar=False)
    assert len(report.flagged()) >= 1


def test_nuts_diagnostics_flag_an_unconverged_run():
    d = dataset(0, d=5, collinear=0.05)
    with pytest.warns(UserWarning, match="unreliable"):
        report = compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), d,
                                   nuts_kwargs={"num_warmup": 10, "num_samples": 100},
                                   c2st_samples=None, correct=False, progress_bar=False)
    assert not report.datasets.nuts_reliable[0]
    assert report.nuts[0].diagnostics["problems"]


def test_report_of_a_good_guide(good_report):
    ds, lat = good_report.datasets, good_report.latents
    assert len(ds) == 3 and len(lat) == 3 * 2 * 3  # datasets x methods x latents
    assert ds.c2st_amortized.max() < 0.56, ds.c2st_amortized.tolist()
    assert ds.c2st_corrected.max() < 0.56, ds.c2st_corrected.tolist()
    assert ds.mmd_amortized.max() < 0.01
    diffs = lat[["d_mean", "d_sd", "d_q05", "d_q95"]].abs().to_numpy()
    assert diffs.max() < 0.15, diffs.max()
    assert not lat.flagged.any()
    assert ds.pareto_k.max() < 0.5 and ds.trust.all()
    assert (ds.is_ess > 0.9 * 10_000).all()  # exact guide: weights all equal
    assert ds.raw_error.max() < 0.05, ds.raw_error.tolist()
    assert ds.nuts_reliable.all()
    assert (ds.speedup > 0).all()
    t = good_report.totals
    assert t["time_amortized"] >= 1.0  # training time counted once
    assert t["speedup"] == pytest.approx(t["time_nuts"] / t["time_amortized"])
    text = str(good_report)
    assert (ds.use == "amortized").all()
    assert "No latent is off" in text and "amortized (importance weights close to uniform): " \
        "datasets 0, 1, 2" in text


def test_report_flags_a_shifted_guide(datasets):
    report = compare_with_nuts(GaussianGuide(), SHIFTED, jax.random.PRNGKey(0), datasets,
                               nuts_kwargs=NUTS_FAST, c2st_kwargs=C2ST_KWARGS,
                               progress_bar=False)
    flagged = report.flagged("amortized")
    assert sorted(set(flagged.latent)) == ["theta[1]"]
    assert sorted(flagged.dataset) == [0, 1, 2]
    assert (flagged.d_mean.abs() > 0.8).all()
    assert report.datasets.c2st_amortized.min() > 0.6
    # the raw draws' error, as the weights see it: the shift, less the noise guard
    assert report.datasets.raw_error.between(0.8, 1.05).all(), report.datasets.raw_error
    # the correction repairs a one-sd shift: the corrected draws are not flagged
    assert not report.flagged("corrected").any().any()
    assert report.datasets.c2st_corrected.max() < 0.58
    # the report says which draws to use, and never reads as reassurance about the raw ones
    assert (report.datasets.use == "psis").all()
    text = str(report)
    assert "theta[1]" in text and "psis (PSIS-corrected" in text and "raw_error" in text
    assert "raw amortized draws of the flagged datasets are off: do not use them" in text


def test_psis_gives_high_k_hat_for_a_too_narrow_guide(datasets):
    for i, d in enumerate(datasets):
        with pytest.warns(UserWarning, match="k-hat"):
            res = importance_resample(GaussianGuide(), NARROW, jax.random.PRNGKey(i), **d)
        assert res.pareto_k > 0.7
        good = importance_resample(GaussianGuide(), GOOD, jax.random.PRNGKey(i), **d)
        assert good.pareto_k < 0.5 and good.ess_fraction > 0.95


def test_raw_error_measures_how_far_the_raw_draws_are_off():
    """Draws of N(0, I) (200 coordinates) weighed toward N(shift, I) on coordinate 7: the raw
    error is the shift less the noise guard (4 / sqrt(ESS), roughly), and 0 for exact draws;
    draws twice too wide are one sd off, less the guard."""
    from numpyro_amortized.compare.importance import RAW_ERROR_Z, psis_weights, raw_error

    rng = np.random.default_rng(0)
    u = rng.normal(size=(20_000, 200))
    assert raw_error(u, np.full(len(u), -np.log(len(u)))) < 1e-9
    for shift in (0.1, 0.5, 1.0):
        smoothed, _, ess = psis_weights(shift * u[:, 7])  # log N(u; shift, 1) - log N(u; 0, 1)
        guard = RAW_ERROR_Z * np.sqrt(1 / ess - 1 / len(u))
        assert abs(raw_error(u, smoothed) - max(shift - guard, 0)) < 0.05 + shift / 10, shift
    smoothed, _, _ = psis_weights(-1.5 * np.sum(u[:, :2] ** 2, axis=1))  # N(0, 1) / N(0, 4) at 2u
    assert 0.85 < raw_error(2 * u[:, :2], smoothed) < 1.0  # sd 2 against 1, less the guard


def test_psis_correction_brings_a_mediocre_guide_closer(datasets):
    for i, d in enumerate(datasets):
        mean, cov = exact_posterior(d["A"], d["y"])
        sd = np.sqrt(np.diag(cov))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # k-hat stays below 0.7: no warning
            res = importance_resample(GaussianGuide(), MEDIOCRE, jax.random.PRNGKey(i), **d)
        raw = np.asarray(res.proposals["theta"])
        fixed = np.asarray(res.draws["theta"])
        raw_err = max(np.abs((raw.mean(0) - mean) / sd).max(), np.abs(raw.std(0) / sd - 1).max())
        err = max(np.abs((fixed.mean(0) - mean) / sd).max(), np.abs(fixed.std(0) / sd - 1).max())
        assert raw_err > 0.35
        assert err < 0.12 and err < raw_err / 3, (raw_err, err)
        assert 0.05 < res.ess_fraction < 0.9


def test_warm_start_needs_far_less_work_for_the_same_convergence():
    # a 5-d posterior with condition number ~600-1000 (columns of A nearly collinear)
    short = {"num_warmup": 50, "num_samples": 1000, "num_chains": 4}
    ess = {"cold": 0.0, "warm": 0.0}
    for seed in range(3):
        d = dataset(seed, n=50, d=5, collinear=0.01)
        cold = run_nuts(linear_gaussian, jax.random.PRNGKey(seed), **short, **d)
        warm = warm_start_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(seed), **short, **d)
        mean, cov = exact_posterior(d["A"], d["y"])
        sd = np.sqrt(np.diag(cov))
        assert np.abs((warm.samples["theta"].mean(0) - mean) / sd).max() < 0.15
        assert warm.diagnostics["rhat_max"] < 1.01, warm.diagnostics
        ess["cold"] += cold.diagnostics["ess_bulk_min"]
        ess["warm"] += warm.diagnostics["ess_bulk_min"]
        # gradient evaluations per effective draw: the cold start's long trajectories cost more
        # (measured over 16 seeds and start keys: 27-88 times more)
        cost = {name: float(r.inference_data.sample_stats.n_steps.sum())
                / r.diagnostics["ess_bulk_min"] for name, r in (("cold", cold), ("warm", warm))}
        assert cost["cold"] > 10 * cost["warm"], cost
    # chains diverge chaotically with float details, so the ESS ratio of one run varies (1.4-3.2
    # over 16 seeds and start keys, 0.73 once): the three runs are pooled
    assert ess["warm"] > 1.5 * ess["cold"], ess


def test_warm_starts_spread_over_the_modes_the_draws_hold():
    """Chains start at draws far apart: each mode of a 90/10 mixture of two bumps gets a chain
    (drawn at random, all four starts fall in the larger mode 66% of the time), none at the
    outermost 1% of draws, all distinct."""
    from numpyro_amortized.compare.nuts import _spread_starts

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 2000
        minor = rng.random(n) < 0.1
        flat = rng.normal(size=(n, 3)) * 0.3 + np.where(minor, 4.0, 0.0)[:, None]
        cov = np.cov(flat, rowvar=False)
        starts = _spread_starts(flat, cov, 4)
        assert len(set(starts)) == 4 and minor[starts].any() and not minor[starts].all()
        white = np.linalg.solve(np.linalg.cholesky(cov), (flat - flat.mean(0)).T).T
        radius = np.sum(white**2, axis=1)
        assert radius[starts].max() <= np.quantile(radius, 0.99) + 1e-9
    # fewer distinct draws than chains: they are reused
    assert sorted(_spread_starts(np.repeat(np.eye(2), 5, axis=0), np.eye(2), 4)) == [0, 0, 5, 5]


def test_inference_data_of_the_guide_works_with_arviz():
    d = dataset(1)
    idata = guide_inference_data(GaussianGuide(), GOOD, jax.random.PRNGKey(0), num_samples=500,
                                 posterior_predictive=True, **d)
    assert idata.posterior["theta"].shape == (4, 500, 3)  # independent draws as 4 chains
    assert idata.posterior_predictive["y"].shape == (4, 500, 20)
    np.testing.assert_allclose(idata.observed_data["y"], d["y"])
    summary = az.summary(idata)  # no warning (warnings are errors here), chain diagnostics
    assert (summary["r_hat"] < 1.02).all() and (summary["ess_bulk"] > 1000).all(), summary
    mean, cov = exact_posterior(d["A"], d["y"])
    np.testing.assert_allclose(summary["mean"].to_numpy(), mean, atol=4 * np.sqrt(cov.max() / 2000) + 0.01)
    ref = run_nuts(linear_gaussian, jax.random.PRNGKey(1), posterior_predictive=True, **d)
    assert ref.inference_data.posterior_predictive["y"].shape == (4, 1000, 20)
    # the replicated data scatter around the observed ones with the noise sd and posterior spread
    resid = np.asarray(idata.posterior_predictive["y"][0]) - np.asarray(d["A"]) @ mean
    assert abs(resid.std() - NOISE) < 0.1
    az.plot_pair(idata, var_names=["theta"])
    if ARVIZ_1:  # arviz-plots
        az.plot_ppc_dist(idata, num_samples=20)
        az.plot_forest({"amortized": idata, "NUTS": ref.inference_data})
    else:
        az.plot_ppc(idata, num_pp_samples=20)
        az.plot_forest([idata, ref.inference_data], model_names=["amortized", "NUTS"])
    matplotlib.pyplot.close("all")


def test_response_sites_hold_covariates_fixed():
    x = jnp.linspace(-1, 1, 8)
    assert response_sites(linear_regression, x=x, y=x) == ("y",)
    assert response_sites(linear_gaussian, **dataset(0)) == ("y",)


def test_comparison_plot(good_report):
    fig = good_report.plot(1)
    axes = fig.get_axes()
    assert len(axes) == 9
    assert len(axes[0].patches) > 0  # histograms on the diagonal
    assert len(axes[3].collections) == 3  # NUTS, amortized, corrected scatters
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["NUTS", "amortized", "checked (PSIS / refined)"]
    matplotlib.pyplot.close(fig)


def test_bad_datasets_argument():
    with pytest.raises(ValueError, match="dict of the model's keyword"):
        compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), [np.zeros(3)])
    with pytest.raises(ValueError, match="No datasets"):
        compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), [])


# ------------------------------------------------------------------ a trained guide
class _ShiftedData:
    """A guide that conditions on the wrong data (y + 1): the amortization gap made large."""

    def __init__(self, guide):
        self.guide, self.model = guide, guide.model

    def sample_posterior(self, key, params, *, x, y, sample_shape=()):
        return self.guide.sample_posterior(key, params, x=x, y=y + 1.0, sample_shape=sample_shape)

    def log_prob(self, params, latents, *, x, y):
        return self.guide.log_prob(params, latents, x=x, y=y + 1.0)


@pytest.fixture(scope="module")
def trained_regression():
    guide = AutoAmortizedFlow(linear_regression)
    z = jnp.zeros(10)
    result = fit(guide, jax.random.PRNGKey(0), x=z, y=z, num_steps=2000, progress_bar=False)
    rng = np.random.default_rng(3)
    data = []
    for _ in range(2):
        x = rng.normal(size=10)
        y = 2.0 + 0.5 * x + 0.8 * rng.normal(size=10)
        data.append({"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)})
    return guide, result, data


@pytest.mark.slow
def test_trained_guide_against_nuts(trained_regression):
    guide, result, data = trained_regression
    report = compare_with_nuts(guide, result.params, jax.random.PRNGKey(1), data,
                               nuts_kwargs=NUTS_FAST, c2st_kwargs=C2ST_KWARGS,
                               train_time=result.train_time, progress_bar=False)
    ds = report.datasets
    assert (ds.pareto_k < 0.7).all(), ds.pareto_k.tolist()
    assert ds.c2st_corrected.max() < 0.6, ds.c2st_corrected.tolist()
    assert ds.c2st_amortized.max() < 0.7, ds.c2st_amortized.tolist()
    assert (ds.raw_error >= 0).all(), ds.raw_error.tolist()  # posterior()'s first check
    corrected = report.latents[report.latents.method == "corrected"]
    assert corrected[["d_mean", "d_sd"]].abs().to_numpy().max() < 0.2
    # the same guide answering for the wrong data is caught by k-hat
    broken = importance_resample(_ShiftedData(guide), result.params, jax.random.PRNGKey(2),
                                 warn=False, **data[0])
    good = importance_resample(guide, result.params, jax.random.PRNGKey(2), **data[0])
    assert broken.pareto_k > 0.7 and good.pareto_k < 0.7, (broken.pareto_k, good.pareto_k)


def test_every_dataset_is_checked_before_any_nuts_run(datasets, monkeypatch):
    ran = []
    monkeypatch.setattr(NUTSRunner, "run", lambda self, *a, **k: ran.append(1) / 0)
    bad = dict(datasets[1], y=datasets[1]["y"].at[4].set(jnp.nan))
    with pytest.raises(ValueError, match="dataset 1: observed site.*'y'.*NaN"):
        compare_with_nuts(GaussianGuide(), GOOD, jax.random.PRNGKey(0), [datasets[0], bad],
                          nuts_kwargs=NUTS_FAST, progress_bar=False)
    assert ran == []  # refused before the first (expensive) NUTS run
