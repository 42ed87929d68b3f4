"""Calibration, recovery and misspecification diagnostics, against known answers.

The calibration checks run on a conjugate model whose exact posterior sampler plays the guide;
deliberately broken versions of it (overconfident: sd halved; biased: one latent's mean moved
by one posterior sd) must fail, each on the right latent. The misspecification check runs on a
guide trained on a Gaussian model.
"""

import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from sklearn.model_selection import cross_val_score

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.compare import guide_inference_data
from numpyro_amortized.diagnostics import (
    c2st,
    coverage,
    diagnose,
    misspecification_test,
    plot_coverage,
    plot_rank_histogram,
    plot_recovery,
    plot_sbc_ecdf,
    plot_tarp,
    plot_z_score_contraction,
    ppc_p_values,
    recovery,
    sbc_ranks,
    sbc_test,
    tarp,
)

matplotlib.use("Agg")
M, L, N_OBS, D = 1000, 1000, 5, 3


def conjugate_draws(mean_shift=0.0, sd_scale=1.0, d=D, seed=0):
    """theta ~ N(0, I_d), y_1..5 ~ N(theta, I): truths and (possibly broken) exact draws."""
    rng = np.random.default_rng(seed)
    truths = rng.normal(size=(M, d))
    y = truths[:, None, :] + rng.normal(size=(M, N_OBS, d))
    post_sd = np.sqrt(1.0 / (N_OBS + 1))
    post_mean = y.sum(1) / (N_OBS + 1) + np.asarray(mean_shift) * post_sd
    draws = post_mean[:, None, :] + sd_scale * post_sd * rng.normal(size=(M, L, d))
    return draws, truths


def run_all(draws, truths):
    sbc = sbc_test(sbc_ranks(draws, truths), L)
    return sbc, coverage(draws, truths), tarp(draws, truths), recovery(draws, truths)


def test_c2st_reads_the_bayes_accuracy_and_parallel_folds_change_nothing(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    fast = {"early_stopping": True}
    assert abs(c2st(a, b, classifier_kwargs=fast) - 0.5) < 0.03
    # N(0, I) against N((1, 1), I): the best classifier's accuracy is Phi(sqrt(2) / 2) = 0.760
    shifted = c2st(a, b + 1.0, classifier_kwargs=fast)
    assert abs(shifted - 0.760) < 0.02, shifted
    c2st_module = sys.modules[c2st.__module__]  # the package's name c2st is the function
    calls = []
    spy = lambda *args, **kw: calls.append(kw["n_jobs"]) or cross_val_score(*args, **kw)
    monkeypatch.setattr(c2st_module, "cross_val_score", spy)
    assert c2st(a, b + 1.0, classifier_kwargs=fast, n_jobs=2) == shifted
    assert calls == [2]  # the folds were handed to two processes
    with pytest.raises(ValueError, match="reference has 2 dimensions but samples have 3"):
        c2st(a, np.ones((10, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        c2st(a, np.where(b > 2.5, np.nan, b))


def test_exact_posterior_passes():
    sbc, cov, tp, rec = run_all(*conjugate_draws())
    assert (sbc.p_values > 0.01).all(), sbc.p_values  # p-values checked uniform over seeds
    assert cov.calibration_error.max() < 0.02, cov.calibration_error
    # the 50% and 90% intervals cover about half and 90% of truths
    i50, i90 = np.argmin(abs(cov.levels - 0.5)), np.argmin(abs(cov.levels - 0.9))
    assert np.abs(cov.coverage[i50] - 0.5).max() < 0.05
    assert np.abs(cov.coverage[i90] - 0.9).max() < 0.03
    assert abs(tp.atc) < 0.03 and tp.ks_p_value > 0.01
    assert np.abs(rec.z_score_sd - 1).max() < 0.08
    assert (rec.r2 > 0.8).all()  # posterior sd 0.41 vs prior sd 1: R^2 about 0.83
    np.testing.assert_allclose(rec.contraction.mean(0), 1 - np.sqrt(1 / 6), atol=0.02)


def test_overconfident_posterior_fails_everywhere():
    sbc, cov, tp, rec = run_all(*conjugate_draws(sd_scale=0.5))
    assert (sbc.p_values < 0.01).all(), sbc.p_values
    assert not sbc.in_bands.any()
    i90 = np.argmin(abs(cov.levels - 0.9))
    assert (cov.coverage[i90] < 0.7).all()  # 90% intervals cover about 59%
    assert (cov.calibration_error > 0.1).all()
    assert tp.atc < -0.01 and tp.ks_p_value < 0.001
    assert (rec.z_score_sd > 1.8).all()


def test_biased_posterior_fails_on_the_biased_latent_only():
    draws, truths = conjugate_draws(mean_shift=np.array([0.0, 1.0, 0.0]))
    sbc, cov, tp, rec = run_all(draws, truths)
    assert sbc.p_values[1] < 0.01
    assert sbc.p_values[0] > 0.01 and sbc.p_values[2] > 0.01, sbc.p_values
    assert not sbc.in_bands[1]
    assert cov.calibration_error[1] > 0.1
    assert cov.calibration_error[0] < 0.02 and cov.calibration_error[2] < 0.02
    assert tp.ks_p_value < 0.01  # the joint test sees it too
    assert abs(rec.z_score[:, 1].mean() - 1.0) < 0.1


@pytest.mark.parametrize("d", [1, 2, 10])
def test_plots_for_any_number_of_latents(d):
    draws, truths = conjugate_draws(d=d)
    draws = draws[:200, :200]
    truths = truths[:200]
    names = [f"theta[{j}]" for j in range(d)]
    sbc = sbc_test(sbc_ranks(draws, truths), 200, names)
    cov, rec = coverage(draws, truths), recovery(draws, truths)

    def panels(fig):
        return [ax for ax in fig.get_axes() if ax.axison]

    fig = plot_sbc_ecdf(sbc)
    assert len(panels(fig)) == d
    for ax in panels(fig):
        assert len(ax.collections) == 1 and len(ax.lines) >= 2  # band, ECDF and zero line
    fig = plot_rank_histogram(sbc)
    assert len(panels(fig)) == d and all(len(ax.patches) >= 20 for ax in panels(fig))
    fig = plot_coverage(cov, names)
    assert len(panels(fig)) == d and all(len(ax.lines) == 2 for ax in panels(fig))
    assert len(plot_tarp(tarp(draws, truths)).get_axes()[0].lines) == 2
    fig = plot_recovery(rec, truths, names)
    assert len(panels(fig)) == d and all("R^2" in ax.get_title() for ax in panels(fig))
    fig = plot_z_score_contraction(rec, names)
    assert len(panels(fig)) == d and all(len(ax.collections) == 1 for ax in panels(fig))
    matplotlib.pyplot.close("all")


# ---------------------------------------------------------------- a trained guide
N_POINTS = 50


def gaussian_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", N_POINTS):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(scope="module")
def gaussian_guide():
    guide = AutoAmortizedFlow(gaussian_model)
    result = fit(guide, jax.random.PRNGKey(0), y=jnp.zeros(N_POINTS), num_steps=1500,
                 progress_bar=False)
    return guide, result.params


def observations(kind, seed, n_datasets=5):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n_datasets, 1))
    noise = {"gaussian": rng.normal, "student_t": lambda size: rng.standard_t(2, size=size)}
    y = mu + noise["student_t" if kind == "student_t" else "gaussian"](size=(n_datasets,
                                                                             N_POINTS))
    if kind == "shifted":
        y = y + 4.0  # a mean the prior (sd 1) makes very unlikely
    return {"y": jnp.asarray(y, jnp.float32)}


@pytest.mark.slow
def test_misspecification_is_flagged(gaussian_guide):
    guide, params = gaussian_guide
    z = jnp.zeros(N_POINTS)
    p = {}
    for kind in ("student_t", "shifted"):
        res = misspecification_test(guide, params, jax.random.PRNGKey(1), observations(kind, 0),
                                    y=z, num_reference=500, num_null=300)
        p[kind] = res.p_value
    assert p["student_t"] < 0.05 and p["shifted"] < 0.05, p
    flagged = [
        misspecification_test(guide, params, jax.random.PRNGKey(10 + s),
                              observations("gaussian", 100 + s), y=z, num_reference=500,
                              num_null=300).p_value < 0.05
        for s in range(10)
    ]
    assert sum(flagged) <= 2, flagged


@pytest.mark.slow  # shares the trained guide (60 s) with the slow misspecification test
def test_diagnose_a_trained_guide(gaussian_guide):
    guide, params = gaussian_guide
    report = diagnose(guide, params, jax.random.PRNGKey(2), y=jnp.zeros(N_POINTS),
                      num_simulations=500, num_samples=500,
                      test_quantities={"mu_squared": lambda z: z["mu"] ** 2},
                      observed=observations("gaussian", 7), progress_bar=False)
    s = report.summary
    assert list(s.index) == ["mu", "mu_squared"]
    assert (s.sbc_p_value > 0.01).all(), s
    assert s.calibration_error.max() < 0.05
    assert s.loc["mu", "r2"] > 0.95  # posterior sd 0.14 vs prior 1
    assert abs(s.loc["mu", "z_score_sd"] - 1) < 0.15
    assert report.misspecification.p_value > 0.01
    assert set(report.figures) == {"sbc_ecdf", "rank_histogram", "coverage", "tarp",
                                   "recovery", "z_score_contraction", "misspecification"}
    assert "Misspecification" in str(report)
    matplotlib.pyplot.close("all")


@pytest.mark.slow  # the same trained guide
def test_posterior_predictive_check_flags_heavy_tails(gaussian_guide):
    guide, params = gaussian_guide
    good = {"y": observations("gaussian", 3)["y"][0]}
    heavy = {"y": observations("student_t", 3)["y"][0]}
    p = {}
    for name, data in (("good", good), ("heavy", heavy)):
        idata = guide_inference_data(guide, params, jax.random.PRNGKey(0), num_samples=1000,
                                     posterior_predictive=True, **data)
        p[name] = ppc_p_values(idata)["y"]
    assert 0.05 < p["good"]["sd"] < 0.95, p
    assert p["heavy"]["sd"] < 0.01 or p["heavy"]["max"] < 0.01 or p["heavy"]["min"] > 0.99, p
