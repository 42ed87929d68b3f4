"""The guide factorized over the groups of a hierarchical model: structure, equivariance,
densities, checkpoints, and (slow) the exact eight-schools posterior."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import jit_call, jitter
from flax import nnx
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam
from scipy.special import log_expit

from numpyro_amortized import (
    AmortizedELBO,
    AutoAmortizedFlow,
    fit,
    importance_resample,
    load,
    posterior,
    save,
)
from numpyro_amortized.checkpoint import CheckpointError, read_file, write_file
from numpyro_amortized.compare import compare_with_nuts, importance, posterior_batch
from numpyro_amortized.diagnostics import c2st, calibration_draws, sbc_ranks, sbc_test
from numpyro_amortized.examples.hierarchical import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    eight_schools,
    eight_schools_noncentered,
    eight_schools_posterior,
    multilevel_binomial,
    varying_intercepts,
    varying_slopes,
    varying_slopes_collapsed,
    varying_slopes_locals,
)
from numpyro_amortized.networks import HierarchicalPosterior, spline_flow
from numpyro_amortized.networks.flows import SplineCoupling
from numpyro_amortized.networks.hierarchical import POOL_RATIOS, GroupEncoder, pool_groups
from numpyro_amortized.networks.posterior import AmortizedPosterior

KEY = jax.random.PRNGKey(0)
GROUP = jnp.asarray(np.random.default_rng(0).permutation(np.repeat(np.arange(6), 5)))


def _setup(model, *args, hierarchical="auto", **kwargs):
    guide = AutoAmortizedFlow(model, hierarchical=hierarchical, num_pilot_simulations=256)
    return guide, guide.setup(KEY, *args, **kwargs)


def _batch(guide, **data):
    return guide._encode({k: jnp.asarray(v)[None] for k, v in data.items()})


def test_eight_schools_is_factorized_over_schools():
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    post = guide.posterior(params)
    assert isinstance(post, HierarchicalPosterior)
    names = [s.name for s in guide.latent_layout.sites]
    assert names == ["mu", "tau", "theta"]
    assert post.global_idx == (0, 1) and post.local_idx == tuple((2 + j,) for j in range(8))
    # one row per school: y_j and sigma_j (the group-aligned argument)
    assert guide.groups[0].group_arguments == ["sigma"]
    flat, flat_params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                               hierarchical=False)
    assert type(flat.posterior(flat_params)) is AmortizedPosterior


def test_group_embeddings_are_equivariant():
    """A group's embedding reads that group's rows only: changing school 3's data (or one row of
    group 2 in an index-linked plate) changes that group's embedding and no other's."""
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    embed = jit_call(guide.posterior(params), "group_embed")
    e = lambda y: np.asarray(embed(_batch(guide, y=y, sigma=EIGHT_SCHOOLS_SIGMA)))[0]
    diff = np.abs(e(EIGHT_SCHOOLS_Y) - e(EIGHT_SCHOOLS_Y.at[3].add(10.0))).max(-1)
    assert diff[3] > 1e-3 and np.all(diff[np.arange(8) != 3] == 0)

    y = jnp.zeros(30)
    guide, params = _setup(varying_intercepts, GROUP, 6, y=y)
    post = guide.posterior(params)
    assert post.local_idx == tuple((2 + j,) for j in range(6)) and post.global_idx == (0, 1, 8)
    embed = jit_call(post, "group_embed")
    e = lambda y: np.asarray(embed(_batch(guide, y=y, group=GROUP)))[0]
    row = int(np.flatnonzero(np.asarray(GROUP) == 2)[0])
    diff = np.abs(e(y) - e(y.at[row].set(3.0))).max(-1)
    assert diff[2] > 1e-3 and np.all(diff[np.arange(6) != 2] == 0)


def test_the_summary_pools_group_statistics_as_random_effects_estimates_weigh_them():
    """The summary of all groups takes the groups' exact statistics pooled with the weights
    ``n_j / (1 + r n_j)`` of a random-effects estimate, for between- to within-group variance
    ratios from 0 (by rows) to infinity (equal weights): their weighted means and log sds, and
    the weighted mean of ``1 / n_j``, as numpy computes them; groups without rows count for
    nothing, and groups of 1 to 12 rows make the weightings differ."""
    group = jnp.asarray(np.repeat(np.arange(6), [1, 2, 3, 4, 8, 12]))
    y = jnp.asarray(np.random.default_rng(4).normal(size=30) * (1 + np.asarray(group)))
    guide, params = _setup(varying_intercepts, group, 6, y=y)
    post = guide.posterior(params)
    seen = []
    object.__setattr__(post, "global_head", lambda v: seen.append(v) or v)
    batch = _batch(guide, y=y, group=group)
    post.embed(batch)
    _, size, stats, _ = post._encode_groups(batch)
    pooled = np.asarray(pool_groups(stats, size))[0]
    width = post.group_pool.out.out_features
    np.testing.assert_allclose(np.asarray(seen[0])[0, width:width + pooled.size], pooled)
    size, stats = np.asarray(size)[0], np.asarray(stats)[0]
    assert size[:, 0].tolist() == [1, 2, 3, 4, 8, 12]
    # a seventh group without rows changes nothing
    padded = pool_groups(jnp.asarray(np.vstack([stats, np.full((1, stats.shape[1]), 7.0)]))[None],
                         jnp.asarray(np.vstack([size, [[0.0]]]))[None])
    np.testing.assert_allclose(np.asarray(padded)[0], pooled, rtol=1e-6)
    s, means = stats.shape[1], []
    for i, r in enumerate(POOL_RATIOS):
        w = np.ones(6) if np.isinf(r) else size[:, 0] / (1 + r * size[:, 0])
        mean = (w[:, None] * stats).sum(0) / w.sum()
        sd = np.sqrt((w[:, None] * (stats - mean) ** 2).sum(0) / w.sum() + 1e-4)
        block = pooled[i * (2 * s + 1):(i + 1) * (2 * s + 1)]
        np.testing.assert_allclose(block[:s], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block[s:2 * s], np.log(sd), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(block[-1], np.log((w / size[:, 0]).sum() / w.sum() + 1e-4),
                                   rtol=1e-5)
        means.append(mean)
    assert np.abs(means[0] - means[-1]).max() > 0.1


def test_the_encoder_fits_shared_coefficients_over_all_rows_and_within_groups():
    """Rows of a response and a covariate in groups with their own intercepts: the dataset's
    pooled least-squares fit and its within-groups fit (rows centred by their group's means,
    the fixed-effects estimate of the shared slope) are numpy's, with the ridge of 1e-3. The
    within-groups slope is near the true 0.5 where the pooled one is confounded by the group
    intercepts."""
    rng = np.random.default_rng(3)
    encoder = GroupEncoder(2, 5, responses=1, covariates=1, rngs=nnx.Rngs(0))
    group = rng.integers(0, 5, size=(2, 60))
    x = rng.normal(size=(2, 60)) + group  # the covariate rises with the group
    y = 0.5 * x - 2.0 * group + 0.1 * rng.normal(size=(2, 60))
    mask = rng.random((2, 60)) < 0.9
    rows = jnp.asarray(np.stack([y, x], -1), jnp.float32)
    *_, panel = jit_call(encoder)(rows, jnp.asarray(group, jnp.int32), jnp.asarray(mask))
    panel = np.asarray(panel)
    assert panel.shape == (2, encoder.panel_dim) == (2, 10)

    def fit(yy, xx):
        design = np.column_stack([np.ones(yy.size), xx])
        n = yy.size
        beta = np.linalg.solve(design.T @ design / n + 1e-3 * np.eye(2), design.T @ yy / n)
        resid = 0.5 * np.log(np.mean((yy - design @ beta) ** 2) + 1e-4)
        return beta, resid

    for b in range(2):
        keep = mask[b]
        yb, xb, gb = y[b, keep], x[b, keep], group[b, keep]
        centre = lambda v, g=gb: v - np.array([v[g == j].mean() for j in range(5)])[g]
        for part, (yy, xx) in enumerate([(yb, xb), (centre(yb), centre(xb))]):
            beta, resid = fit(yy, xx)
            np.testing.assert_allclose(panel[b, 5 * part:5 * part + 2], beta, atol=2e-3)
            np.testing.assert_allclose(panel[b, 5 * part + 2], resid, atol=2e-3)
        assert abs(panel[b, 6] - 0.5) < 0.05 and abs(panel[b, 1] - 0.5) > 0.3


def test_group_statistics_are_each_groups_least_squares_fit():
    """Rows of a response and two covariates: a group's exact statistics hold its least-squares
    coefficients (with the ridge of 1e-3), log residual sd and log standard errors, as numpy
    computes them; absent groups' are zero."""
    rng = np.random.default_rng(1)
    encoder = GroupEncoder(3, 4, responses=1, covariates=2, rngs=nnx.Rngs(0))
    group = rng.integers(0, 3, size=(2, 40))
    rows = rng.normal(size=(2, 40, 3))
    rows[..., 0] = 1.0 + rows[..., 1] - 2.0 * rows[..., 2] + 0.3 * rows[..., 0] * (group + 1)
    mask = rng.random((2, 40)) < 0.9
    _, count, stats, _ = jit_call(encoder)(jnp.asarray(rows, jnp.float32),
                                           jnp.asarray(group, jnp.int32), jnp.asarray(mask))
    stats = np.asarray(stats)
    start = 2 * 3 + 1 + 3  # means, log-sds, log(1 + n), products of the 3 features
    for b in range(2):
        for j in range(3):
            keep = mask[b] & (group[b] == j)
            x = np.column_stack([np.ones(keep.sum()), rows[b, keep, 1:]])
            y, n = rows[b, keep, 0], keep.sum()
            beta, rss = np.linalg.lstsq(x, y, rcond=None)[:2]
            ridge = np.linalg.solve(x.T @ x / n + 1e-3 * np.eye(3), x.T @ y / n)
            np.testing.assert_allclose(stats[b, j, start:start + 3], ridge, atol=1e-4)
            np.testing.assert_allclose(stats[b, j, start:start + 3], beta, atol=2e-2)
            np.testing.assert_allclose(stats[b, j, start + 3], 0.5 * np.log(rss[0] / keep.sum()),
                                       atol=1e-2)
            se = 0.5 * np.log(np.diag(np.linalg.inv(x.T @ x / n + 1e-3 * np.eye(3))) / n)
            np.testing.assert_allclose(stats[b, j, start + 4:start + 7], se, atol=1e-3)
            assert float(count[b, j, 0]) == keep.sum()
    assert np.all(stats[:, 3] == 0) and np.all(np.asarray(count)[:, 3] == 0)


def test_group_statistics_of_degenerate_groups_are_finite():
    """Real data have groups of one or two rows and groups whose binary covariate never varies
    (radon's counties): their statistics stay finite, and a covariate constant in a group gets a
    zero slope with a standard error far above an identified group's."""
    encoder = GroupEncoder(2, 4, responses=1, covariates=1, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    group = np.array([0] + [1] * 5 + [2] * 2 + [3] * 10)
    x = np.where(group == 1, 0.0, rng.integers(0, 2, group.size)).astype(float)
    x[group == 2] = [0.0, 1.0]
    rows = np.stack([1.0 + 0.5 * x + rng.normal(size=group.size), x], axis=-1)
    _, count, stats, _ = jit_call(encoder)(jnp.asarray(rows[None], jnp.float32),
                                           jnp.asarray(group[None], jnp.int32),
                                           jnp.ones((1, group.size), bool))
    stats = np.asarray(stats)[0]
    assert np.isfinite(stats).all() and np.asarray(count)[0, :, 0].tolist() == [1, 5, 2, 10]
    start = 2 * 2 + 1 + 1  # means, log-sds, log(1 + n), the product of the 2 features
    assert abs(stats[1, start + 1]) < 1e-3  # slope of a constant covariate
    log_se_slope = stats[:, start + 4]
    assert log_se_slope[1] > log_se_slope[3] + 2.0


def test_collapsed_varying_slopes_is_the_exact_marginal_and_conditional():
    """The NUTS reference of the hierarchical regression benchmark: the collapsed model's
    density is the Gaussian marginal of each group's rows (a group with no rows adds 0), and
    the locals drawn given the globals have the conditional Gaussian's mean and covariance."""
    from numpyro.infer.util import log_density

    rng = np.random.default_rng(3)
    group = np.array([0] * 4 + [1] * 7 + [3] * 2)  # group 2 has no rows
    x, y = rng.normal(size=group.size), rng.normal(size=group.size)
    glob = {"mu_a": 0.3, "mu_b": -0.8, "tau_a": 0.7, "tau_b": 1.3, "sigma": 0.4}
    lp = jax.jit(lambda g: log_density(varying_slopes_collapsed, (group, x, 4, y), {}, g)[0])(
        glob)
    prior = sum(float(d.log_prob(glob[k])) for k, d in (
        ("mu_a", dist.Normal(0, 2.0)), ("mu_b", dist.Normal(0, 2.0)),
        ("tau_a", dist.HalfNormal(1.0)), ("tau_b", dist.HalfNormal(1.0)),
        ("sigma", dist.HalfNormal(1.0))))
    d = np.diag([glob["tau_a"] ** 2, glob["tau_b"] ** 2])
    marginal, means, covs = 0.0, [], []
    for j in (0, 1, 3):
        u = np.column_stack([np.ones((group == j).sum()), x[group == j]])
        mean = u @ [glob["mu_a"], glob["mu_b"]]
        cov = glob["sigma"] ** 2 * np.eye(len(u)) + u @ d @ u.T
        marginal += float(dist.MultivariateNormal(mean, cov).log_prob(y[group == j]))
        post_cov = np.linalg.inv(np.linalg.inv(d) + u.T @ u / glob["sigma"] ** 2)
        covs.append(post_cov)
        means.append(post_cov @ (np.linalg.inv(d) @ [glob["mu_a"], glob["mu_b"]]
                                 + u.T @ y[group == j] / glob["sigma"] ** 2))
    np.testing.assert_allclose(float(lp), prior + marginal, rtol=1e-4)
    n = 100_000
    draws = varying_slopes_locals({k: np.full(n, v) for k, v in glob.items()}, group, x, 4, y,
                                  rng)
    for j, mean, cov in zip((0, 1, 3), means, covs, strict=True):
        ab = np.column_stack([draws["a"][:, j], draws["b"][:, j]])
        z = (ab.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
        assert np.all(np.abs(z) < 4), (j, z)
        scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
        assert np.all(np.abs(np.cov(ab.T) - cov) < 0.03 * scale), (j, np.cov(ab.T), cov)
    # the empty group's locals are drawn from the prior given the globals
    assert abs(draws["b"][:, 2].std() - glob["tau_b"]) < 0.02


def _partly_centred(group, z, y=None):
    """Group intercepts whose location depends on a group covariate ``z`` and whose scale is
    uniform: neither is a global latent, so the locals stay centred."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.Uniform(0.0, 3.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("groups", z.shape[0]):
        a = numpyro.sample("a", dist.Normal(mu + beta * z, tau))
        b = numpyro.sample("b", dist.StudentT(4.0, beta, sigma))
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(a[group] + b[group], 1.0), obs=y)


def test_locals_are_standardized_by_their_prior_given_the_globals():
    """Where a local's prior has a global location and scale (``theta_j ~ N(mu, tau)``), the
    local flow models the local standardized by its posterior given the globals, with the
    data's precision learned per group: as ``tau -> 0`` that is the non-centred form
    ``(theta_j - mu) / tau``, for large ``tau`` it no longer depends on ``tau``. The columns'
    location and scale are found among the globals (their positions in the global vector);
    a location or scale that is not a global latent is left as it is. The guide's density is
    the flow's density of the standardized locals with the change of variables."""
    guide, _ = _setup(varying_slopes, GROUP, jnp.zeros(30), 6, y=jnp.zeros(30))
    assert guide.groups.local_affine == ((0, 1), (2, 3))  # mu_a, mu_b; tau_a, tau_b
    guide, _ = _setup(eight_schools_noncentered, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    assert guide.groups.local_affine == ((-1,), (-1,))
    guide, params = _setup(_partly_centred, GROUP, jnp.linspace(-1, 1, 6), y=jnp.zeros(30))
    assert guide.groups.local_affine == ((-1, 1), (-1, 3))  # b ~ t(beta, sigma)
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    post = guide.posterior(params)
    # a trained-like precision network: each school's own precision and estimate
    out = post.precision_net.out
    out.bias[...] = jnp.asarray([0.3, 1.0])
    batch = _batch(guide, y=EIGHT_SCHOOLS_Y, sigma=EIGHT_SCHOOLS_SIGMA)
    u = nnx.jit(lambda p, k, b: p.sample(k, b, (6,)))(post, KEY, batch)[:, 0]  # (6, 2 + 8)
    u = u.at[:, 1].set(jnp.asarray([-9.0, -8.0, 0.0, 2.0, 8.0, 9.0]))  # log tau

    @nnx.jit  # one program, not each operation compiled on its own
    def parts(post, u, batch):
        ug, _, cg, cl = post._conditions(u[None], batch)
        loc, log_scale = post._affine(ug, cl)  # (1, 6, 8, 1)
        loc, log_scale = loc[0, ..., 0], log_scale[0, ..., 0]
        local = post.local_flow.log_prob(
            ((u[:, 2:] - loc) * jnp.exp(-log_scale))[None, ..., None], cl).sum(-1)
        want = (post.flow.log_prob(ug, cg) + local)[0] - log_scale.sum(-1)
        return loc, log_scale, post.log_prob(u[None], batch)[0], want

    loc, log_scale, lp, want = parts(post, u, batch)
    np.testing.assert_allclose(loc[:2], jnp.broadcast_to(u[:2, :1], (2, 8)), rtol=1e-4)
    np.testing.assert_allclose(log_scale[:2], jnp.broadcast_to(u[:2, 1:2], (2, 8)), atol=1e-4)
    m, s = post.local_loc[...], post.local_scale[...]  # the data's estimate and precision
    np.testing.assert_allclose(loc[4:], jnp.broadcast_to(m + 0.3 * s, (2, 8)), rtol=1e-3)
    np.testing.assert_allclose(log_scale[4:], jnp.broadcast_to(jnp.log(s) - 0.5, (2, 8)),
                               atol=1e-3)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_density_matches_its_draws():
    """``log_prob`` of the guide's own draws equals the log density they were drawn with, and the
    draws come back with the plate dimension."""
    guide, params = _setup(varying_intercepts, GROUP, 6, y=jnp.zeros(30))
    post = guide.posterior(params)
    batch = _batch(guide, y=jnp.linspace(-2, 2, 30), group=GROUP)

    @nnx.jit
    def draw_and_score(post, batch):
        u, lq = post.sample_and_log_prob(KEY, batch, (7,))
        return u, lq, post.log_prob(jnp.moveaxis(u, 0, 1), batch)

    u, lq, lp = draw_and_score(post, batch)
    assert u.shape == (7, 1, guide.latent_layout.dim)
    np.testing.assert_allclose(np.asarray(lp).T, np.asarray(lq), rtol=1e-4, atol=1e-3)
    draws = guide.sample_posterior(KEY, params, GROUP, 6, y=jnp.linspace(-2, 2, 30),
                                   sample_shape=(5,))
    assert draws["a"].shape == (5, 6) and draws["mu"].shape == (5,)


def test_checkpoint_round_trip(tmp_path):
    """A guide for 3 to 8 schools comes back from its checkpoint as one: 4 schools get 4 locals
    (not the 8 of the stored example arguments), and the same draws."""
    guide = AutoAmortizedFlow(eight_schools, num_groups=(3, 8), num_pilot_simulations=256)
    params = guide.setup(KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    save(tmp_path / "g.ckpt", guide, params)
    loaded, loaded_params = load(tmp_path / "g.ckpt", eight_schools)
    assert isinstance(loaded.posterior(loaded_params), HierarchicalPosterior)
    assert loaded.num_groups == (3, 8)
    a = guide.sample_posterior(KEY, params, EIGHT_SCHOOLS_SIGMA[:4], y=EIGHT_SCHOOLS_Y[:4],
                               sample_shape=(4,))
    b = loaded.sample_posterior(KEY, loaded_params, EIGHT_SCHOOLS_SIGMA[:4],
                                y=EIGHT_SCHOOLS_Y[:4], sample_shape=(4,))
    assert b["theta"].shape == (4, 4)
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(b["theta"]), rtol=1e-5)
    with pytest.raises(CheckpointError, match="num_groups"):
        load(tmp_path / "g.ckpt", eight_schools, guide=AutoAmortizedFlow(eight_schools))


def test_default_splines_learn_their_interval_and_older_checkpoints_keep_theirs(tmp_path):
    """A hierarchical guide's default flow has splines with a learned interval, named in its
    checkpoint; a checkpoint whose flow is the fixed-interval spline flow (what earlier versions
    chose by default, with the same description) loads as that flow, with the same draws."""
    guide = AutoAmortizedFlow(eight_schools, num_pilot_simulations=256)
    guide.setup(KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    assert guide.flow_factory.func is spline_flow
    assert guide.flow_factory.keywords == {"learned_interval": True}
    assert guide.state_dict()["flow"] == {"name": "spline_flow",
                                          "kwargs": {"learned_interval": True}}
    old = AutoAmortizedFlow(eight_schools, flow=spline_flow, num_pilot_simulations=256)
    params = jitter(old.setup(KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y), 0.05)
    assert old.state_dict()["flow"] == {"name": "spline_flow", "kwargs": {}}
    save(tmp_path / "old.ckpt", old, params)
    loaded, loaded_params = load(tmp_path / "old.ckpt", eight_schools)
    assert loaded.flow_factory is spline_flow
    a, b = (g.sample_posterior(KEY, p, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y, sample_shape=(5,))
            for g, p in ((old, params), (loaded, loaded_params)))
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(b["theta"]), rtol=1e-5)


def _splines(flow):
    return [b for b in flow.layers() if isinstance(b, SplineCoupling)]


def test_one_dimensional_locals_get_a_lighter_local_flow_and_older_checkpoints_keep_theirs(
        tmp_path):
    """The default local flow of one-dimensional locals has one spline layer of 32 bins (five
    of 8 for more dimensions), named in the state and the checkpoint; a checkpoint that names
    no local flow (written before it was named) loads with the five-layer one, with the same
    draws, and one that names the earlier default (two layers of 16 bins) loads with it."""
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    local = guide.posterior(params).local_flow
    assert [s.num_bins for s in _splines(local)] == [32]
    assert guide.state_dict()["local_flow"] == {"name": "spline_flow", "kwargs": {
        "conditional_affine": True, "learned_interval": True, "num_layers": 1, "num_bins": 32}}
    slopes, slopes_params = _setup(varying_slopes, GROUP, jnp.zeros(30), 6, y=jnp.zeros(30))
    assert [s.num_bins for s in _splines(slopes.posterior(slopes_params).local_flow)] == [8] * 5
    # a guide rebuilt from a state that names no local flow: the five-layer one
    old = AutoAmortizedFlow(eight_schools, num_pilot_simulations=256)
    params = jitter(old.initialize(KEY, (EIGHT_SCHOOLS_SIGMA,), {"y": EIGHT_SCHOOLS_Y},
                                   state={**guide.state_dict(), "local_flow": None,
                                          "buffers": None}), 0.05)
    assert [s.num_bins for s in _splines(old.posterior(params).local_flow)] == [8] * 5
    save(tmp_path / "old.ckpt", old, params)
    body = read_file(tmp_path / "old.ckpt")
    assert "num_layers" not in json.loads(body.pop("local_flow"))["kwargs"]
    write_file(tmp_path / "old.ckpt", body)
    loaded, loaded_params = load(tmp_path / "old.ckpt", eight_schools)
    assert len(_splines(loaded.posterior(loaded_params).local_flow)) == 5
    a, b = (g.sample_posterior(KEY, p, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y, sample_shape=(5,))
            for g, p in ((old, params), (loaded, loaded_params)))
    np.testing.assert_allclose(np.asarray(a["theta"]), np.asarray(b["theta"]), rtol=1e-5)
    # and one that names it loads as it was trained
    save(tmp_path / "new.ckpt", guide, jitter(guide.init_params, 0.05))
    loaded, loaded_params = load(tmp_path / "new.ckpt", eight_schools)
    assert [s.num_bins for s in _splines(loaded.posterior(loaded_params).local_flow)] == [32]
    # one trained with the earlier default, two layers of 16 bins, loads as it was trained
    two = {"conditional_affine": True, "learned_interval": True, "num_layers": 2, "num_bins": 16}
    earlier = AutoAmortizedFlow(eight_schools, num_pilot_simulations=256)
    params = jitter(earlier.initialize(KEY, (EIGHT_SCHOOLS_SIGMA,), {"y": EIGHT_SCHOOLS_Y},
                                       state={**guide.state_dict(), "buffers": None,
                                              "local_flow": {"name": "spline_flow",
                                                             "kwargs": two}}), 0.05)
    save(tmp_path / "two.ckpt", earlier, params)
    loaded, loaded_params = load(tmp_path / "two.ckpt", eight_schools)
    assert [s.num_bins for s in _splines(loaded.posterior(loaded_params).local_flow)] == [16, 16]


def test_batches_take_the_group_arguments():
    """Batch calls read each dataset's group arguments (eight schools' sigma) by name and
    refuse a batch without them; the calibration diagnostics pass the simulations' own."""
    guide, params = _setup(eight_schools, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    draws, truths, _, _ = calibration_draws(guide, params, KEY, EIGHT_SCHOOLS_SIGMA,
                                            y=EIGHT_SCHOOLS_Y, num_simulations=6, num_samples=5)
    assert draws.shape == (6, 5, 10) and truths.shape == (6, 10)
    params = jitter(params, 0.1)  # away from the initialization, which ignores data
    y = jnp.stack([EIGHT_SCHOOLS_Y] * 2)
    with pytest.raises(ValueError, match=r"No value for the covariates \['sigma'\]"):
        guide.sample_posterior_batch(KEY, params, {"y": y}, sample_shape=(3,))
    draw = lambda scale: guide.sample_posterior_batch(KEY, params, {"y": y, "sigma": jnp.stack(
        [EIGHT_SCHOOLS_SIGMA * scale] * 2)}, sample_shape=(3,))["theta"]
    one = guide.sample_posterior(KEY, params, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                                 sample_shape=(3,))["theta"]
    assert draw(1.0).shape == (2, 3, 8) and one.shape == (3, 8)
    assert not np.allclose(np.asarray(draw(1.0)), np.asarray(draw(3.0)))


@pytest.mark.slow  # compiles ~8 hierarchical programs (~100 s)
@pytest.mark.filterwarnings("ignore:Pareto k-hat")  # an untrained guide fails the checks
def test_one_guide_serves_fewer_groups():
    """With num_groups=(min, max), simulations have between min and max groups (the others'
    rows masked, absent), and the guide answers for any count in the range with that many
    groups' locals; more groups than the maximum is a clear error."""
    guide = AutoAmortizedFlow(varying_intercepts, num_groups=(2, 6), num_pilot_simulations=256)
    params = guide.setup(KEY, GROUP, 6, y=jnp.zeros(30))
    sims = guide.simulate(KEY, 200, GROUP, 6, y=jnp.zeros(30))
    mask = np.asarray(sims.data.group_mask)
    counts = np.array([np.asarray(GROUP)[m].max() + 1 for m in mask])
    assert counts.min() == 2 and counts.max() == 6
    absent = np.asarray(GROUP)[None] >= counts[:, None]
    assert not mask[absent].any() and mask[~absent].all()
    # the exact density leaves the rows of groups without data out
    one = jax.tree.map(lambda x: x[0], sims)
    full = guide.model_log_density(one.latents, one.observed, None, GROUP, 6)
    masked = guide.model_log_density(one.latents, one.observed, None, GROUP, 6,
                                     group_mask=one.data.group_mask)
    kept = guide.model_log_density(one.latents, {"y": one.observed["y"]}, None, GROUP, 6,
                                   group_mask=jnp.ones(30, bool))
    assert float(kept) == pytest.approx(float(full))
    y_lp = dist.Normal(one.latents["a"][GROUP], one.latents["sigma"]).log_prob(one.observed["y"])
    assert float(full - masked) == pytest.approx(float(y_lp[absent[0]].sum()), rel=1e-4)
    keep = np.asarray(GROUP) < 3
    draws = guide.sample_posterior(KEY, params, GROUP[keep], 3, y=jnp.ones(int(keep.sum())),
                                   sample_shape=(4,))
    assert draws["a"].shape == (4, 3) and draws["sigma"].shape == (4,)
    lq = guide.log_prob(params, jax.tree.map(lambda v: v[0], draws), GROUP[keep], 3,
                        y=jnp.ones(int(keep.sum())))
    assert np.isfinite(float(lq))

    intercepts, intercepts_params = guide, params
    guide = AutoAmortizedFlow(eight_schools, num_groups=(3, 8), num_pilot_simulations=256)
    params = guide.setup(KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    draws = guide.sample_posterior(KEY, params, EIGHT_SCHOOLS_SIGMA[:5], y=EIGHT_SCHOOLS_Y[:5],
                                   sample_shape=(4,))
    assert draws["theta"].shape == (4, 5)
    # the corrections of a dataset of fewer groups: PSIS (for index-linked rows too),
    # refinement on that dataset's ELBO, and the batch path
    five = {"sigma": EIGHT_SCHOOLS_SIGMA[:5], "y": EIGHT_SCHOOLS_Y[:5]}
    res = posterior(guide, params, KEY, num_samples=50, refine_steps=20, nuts=False, **five)
    assert res.draws["theta"].shape == (50, 5) and np.isfinite(res.pareto_k)
    assert [s["step"] for s in res.steps][:2] == ["amortized", "refine"]
    batch = posterior_batch(guide, params, KEY, [five, five], num_samples=50, nuts=False,
                            refine_steps=20)
    assert all(r.draws["theta"].shape == (50, 5) for r in batch)
    res = importance_resample(intercepts, intercepts_params, KEY, GROUP[keep], 3,
                              y=jnp.ones(int(keep.sum())), num_samples=20, warn=False)
    assert res.draws["a"].shape == (20, 3) and np.isfinite(res.pareto_k)
    nine = jnp.concatenate([EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_SIGMA[:1]])
    with pytest.raises(ValueError, match="9 groups in plate 'J' but the guide was built for"):
        guide.sample_posterior(KEY, params, nine, y=nine, sample_shape=(4,))
    with pytest.raises(ValueError, match="num_groups=.*max equal to the size of plate 'J'"):
        AutoAmortizedFlow(eight_schools, num_groups=(3, 9)).setup(KEY, EIGHT_SCHOOLS_SIGMA,
                                                                 y=EIGHT_SCHOOLS_Y)


def _group_scales(group, num_groups, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", num_groups):
        s = numpyro.sample("s", dist.LogNormal(mu, 0.5))
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(0.0, s[group]), obs=y)


def test_log_prob_of_fewer_groups_is_the_marginal():
    """For data of fewer groups than the maximum, log_prob is the density of the globals and the
    given groups' locals: the full density over one more group's (positive) local, divided by
    it, integrates to 1 over that local."""
    group = jnp.repeat(jnp.arange(4), 5)
    guide = AutoAmortizedFlow(_group_scales, num_groups=(2, 4), num_pilot_simulations=256)
    params = guide.setup(KEY, group, 4, y=jnp.ones(20))
    params = jitter(params, 0.05)  # away from the initialization, which ignores data
    data = (group[:15], 3)
    y = jnp.asarray(np.random.default_rng(1).normal(size=15) * np.repeat([1.0, 3.0, 0.3], 5))
    draws = guide.sample_posterior(KEY, params, *data, y=y, sample_shape=(3,))
    assert draws["s"].shape == (3, 3)
    lq = guide.log_prob(params, draws, *data, y=y)
    grid = jnp.linspace(-40.0, 40.0, 80001)  # log s of the fourth group (with the tails)
    for i in range(3):
        full = {"mu": jnp.full(grid.shape, draws["mu"][i]),
                "s": jnp.concatenate([jnp.broadcast_to(draws["s"][i], (grid.size, 3)),
                                      jnp.exp(grid)[:, None]], axis=1)}
        lq_full = guide.log_prob(params, full, *data, y=y)
        mass = np.trapezoid(np.exp(np.asarray(lq_full - lq[i], np.float64)) * np.exp(grid), grid)
        assert mass == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="same number of groups, at most the guide's 4"):
        guide.log_prob(params, {"mu": draws["mu"], "s": jnp.ones((3, 5))}, *data, y=y)


def test_proposals_carry_their_exact_densities(monkeypatch):
    """posterior()'s check draws proposals with their density in one pass, in blocks of one
    compiled size: for data of fewer groups than the maximum and a mixture of two parameter
    sets, the densities are those of log_prob (the mixture's, of the given groups) and the
    model's, for any number of proposals, from one program."""
    monkeypatch.setattr(importance, "PROPOSAL_BLOCK", 64)
    built, build = [], importance._proposal_program
    monkeypatch.setattr(importance, "_proposal_program",
                        lambda *a: built.append(build(*a)) or built[-1])
    group = jnp.repeat(jnp.arange(4), 5)
    guide = AutoAmortizedFlow(_group_scales, num_groups=(2, 4), num_pilot_simulations=256)
    params = guide.setup(KEY, group, 4, y=jnp.ones(20))
    other = jitter(params, 0.05)
    y = jnp.asarray(np.random.default_rng(1).normal(size=15))
    args = (group[:15], 3)
    for n in (200, 50):
        draws, log_q, log_p = importance._propose(guide, [params, other], KEY, args, {"y": y}, n)
        assert draws["s"].shape == (n, 3) and log_q.shape == log_p.shape == (n,)
        # the mixture's equal shares: the first half drawn under params, the second under other
        first, second = (guide.log_prob(p, draws, *args, y=y) for p in (params, other))
        assert np.mean((first > second)[: n // 2]) > np.mean((first > second)[n // 2:]) + 0.3
        expect = np.logaddexp(guide.log_prob(params, draws, *args, y=y),
                              guide.log_prob(other, draws, *args, y=y)) - np.log(2.0)
        np.testing.assert_allclose(log_q, expect, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(log_p, guide.log_joint(draws, *args, y=y), rtol=1e-5)
    # one program per block size (64, and 25 for 50 proposals), each traced once
    assert [program._cache_size() for program in built] == [1, 1]
    flat = AutoAmortizedFlow(_group_scales, hierarchical=False, num_pilot_simulations=256)
    flat_params = flat.setup(KEY, group, 4, y=jnp.ones(20))
    draws, log_q, _ = importance._propose(flat, [flat_params], KEY, (group, 4),
                                          {"y": jnp.ones(20)}, 100)
    np.testing.assert_allclose(log_q, flat.log_prob(flat_params, draws, group, 4, y=jnp.ones(20)),
                               rtol=1e-4, atol=1e-3)


def test_a_declared_design_varies_group_sizes():
    """Group indices drawn by a declared design: every simulation has its own group sizes, read
    by the group rows, and the guide answers for a dataset with other sizes."""
    def design(key):
        k1, k2 = jax.random.split(key)
        return {"group": jax.random.randint(k1, (30,), 0, 6), "x": jax.random.normal(k2, (30,))}

    guide = AutoAmortizedFlow(varying_slopes, design=design, num_pilot_simulations=256)
    params = guide.setup(KEY, GROUP, jnp.zeros(30), 6, y=jnp.zeros(30))
    sims = guide.simulate(KEY, 50, GROUP, jnp.zeros(30), 6, y=jnp.zeros(30))
    sizes = np.stack([np.bincount(g, minlength=6) for g in np.asarray(sims.data.group_index)])
    np.testing.assert_array_equal(sizes, np.stack([np.bincount(g, minlength=6) for g in
                                                   np.asarray(sims.design["group"])]))
    assert len({tuple(s) for s in sizes}) == 50
    group = jnp.asarray(np.repeat(np.arange(6), [1, 2, 3, 4, 8, 12]), jnp.int32)
    y = jnp.linspace(-1.0, 1.0, 30)
    draws = guide.sample_posterior(KEY, params, group, y, 6, y=y, sample_shape=(3,))
    assert draws["b"].shape == (3, 6)


@pytest.mark.slow  # the ELBO's programs compile in ~40 s
def test_elbo_and_svi_run_on_the_factorized_guide():
    """The ELBO (the model's exact density, rows of groups without data masked) and NumPyro's
    SVI run on a hierarchical guide with a range of group counts."""
    guide = AutoAmortizedFlow(varying_intercepts, num_groups=(2, 6), num_pilot_simulations=256)
    result = fit(guide, KEY, GROUP, 6, y=jnp.zeros(30), loss=AmortizedELBO(batch_size=32),
                 num_steps=20, progress_bar=False, check=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    svi = numpyro.infer.SVI(eight_schools, AutoAmortizedFlow(eight_schools),
                            numpyro.optim.Adam(1e-3), numpyro.infer.Trace_ELBO())
    state = svi.init(KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)
    assert np.isfinite(float(svi.evaluate(state, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y)))


def _sum_of_groups(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
    numpyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y)


def test_what_cannot_be_factorized_is_said():
    with pytest.warns(UserWarning, match="cannot factorize over its groups"):
        guide, params = _setup(_sum_of_groups, y=jnp.zeros(()))
    assert type(guide.posterior(params)) is AmortizedPosterior
    with pytest.raises(ValueError, match="groups"):
        _setup(_sum_of_groups, y=jnp.zeros(()), hierarchical=True)

    def flat(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", 5):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent site of the model is inside a plate"):
        _setup(flat, y=jnp.zeros(5), hierarchical=True)


def _errors(draws, exact):
    """Per-school |mean error| and sd ratio, in exact posterior sds."""
    a, b = np.asarray(draws["theta"]), exact["theta"]
    return np.abs(a.mean(0) - b.mean(0)) / b.std(0), a.std(0) / b.std(0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*outside the data the guide was trained on")
def test_eight_schools_matches_the_exact_posterior():
    """One guide trained once (online, 2,000 steps, 3 to 8 schools), against the exact posterior
    on the classic data, on a prior-predictive dataset with spread-out schools and on its first
    four schools: each theta_j's mean within 0.2 and sd within 20% of the exact one, C2ST <= 0.6
    on (mu, log tau) and on each theta_j; SBC on 300 prior-predictive datasets inside the 95%
    bands for mu, tau and the thetas pooled. A guide whose schools read each other's data
    (embeddings rolled by one school) fails."""
    guide = AutoAmortizedFlow(eight_schools, num_groups=(3, 8))
    # training keys 0 and 1: largest mean error .08 and .12 sds, |log sd ratio| .11 and .09,
    # C2ST .53 and .54 (passing at key 2 too)
    result = fit(guide, KEY, EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y, num_steps=2000,
                 progress_bar=False)
    rng = np.random.default_rng(0)
    spread = jnp.asarray([-25.0, 30.0, 2.0, 45.0, -8.0, 12.0, 60.0, -40.0])
    cases = [(EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y), (EIGHT_SCHOOLS_SIGMA, spread),
             (EIGHT_SCHOOLS_SIGMA[:4], spread[:4])]
    for i, (sigma, y) in enumerate(cases):
        exact = eight_schools_posterior(sigma, y, 4000, rng)
        draws = guide.sample_posterior(jax.random.PRNGKey(i), result.params, sigma, y=y,
                                       sample_shape=(4000,))
        assert draws["theta"].shape == (4000, len(y))
        mean_err, sd_ratio = _errors(draws, exact)
        assert mean_err.max() < 0.2, (i, mean_err)
        assert np.all(np.abs(np.log(sd_ratio)) < np.log(1.2)), (i, sd_ratio)
        glob = lambda d: np.column_stack([d["mu"], np.log(d["tau"])])[:2000]
        assert c2st(glob(exact), glob(draws)) < 0.6
        for j in (0, len(y) - 1):
            assert c2st(exact["theta"][:2000, j:j + 1],
                        np.asarray(draws["theta"])[:2000, j:j + 1]) < 0.6
    exact = eight_schools_posterior(EIGHT_SCHOOLS_SIGMA, spread, 4000, rng)
    draws, truths, _, _ = calibration_draws(guide, result.params, KEY, EIGHT_SCHOOLS_SIGMA,
                                                y=EIGHT_SCHOOLS_Y, num_simulations=300,
                                                num_samples=200)
    ranks = sbc_ranks(draws, truths)  # columns mu, tau, theta[0..7]
    pooled = np.column_stack([ranks[:, :2], ranks[np.arange(len(ranks)), 2 + np.arange(len(ranks)) % 8]])
    assert sbc_test(pooled, 200).in_bands.all(), sbc_test(pooled, 200).p_values
    post = guide.posterior(result.params)
    encoder = post.encoder

    def rolled(*a):
        e, count, stats, panel = encoder(*a)
        return jnp.roll(e, 1, axis=-2), count, jnp.roll(stats, 1, axis=-2), panel

    object.__setattr__(post, "encoder", rolled)
    batch = _batch(guide, y=spread, sigma=EIGHT_SCHOOLS_SIGMA)
    u = post.sample(KEY, batch, (4000,))[:, 0]
    broken, _ = guide.latent_layout.constrain(u)
    assert _errors(broken, exact)[0].max() > 1.0


def _nuts(model, key, *args, **kwargs):
    """Non-centered NUTS draws of ``model`` (its plate's locals reparameterized)."""
    from numpyro.infer import MCMC, NUTS

    noncentered = reparam(model, config={"a": LocScaleReparam(0)})
    mcmc = MCMC(NUTS(noncentered), num_warmup=1000, num_samples=2000, progress_bar=False)
    mcmc.run(key, *args, **kwargs)
    return {k: np.asarray(v) for k, v in mcmc.get_samples().items()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*outside the data the guide was trained on")
def test_multilevel_binomial_matches_nuts():
    """One guide for 5 to 20 groups of binomial counts (online, 3,000 steps), against NUTS on
    prior-predictive datasets of 5, 12 and 20 groups: C2ST <= 0.6 on (a_bar, log sigma); of the
    groups' log-odds (pooled), >= 90% with mean within 0.2 NUTS sds (all within 0.3) and >= 90%
    with sd within 0.3 NUTS sds (all within 0.5). A group with no successes or no failures has a
    one-sided likelihood, so its tail follows sigma's, and the guide's upper tail of sigma is
    heavier than the posterior's, as a Gaussian-tailed flow fitted to a mass-covering loss makes
    it: one draw in 4,000 at sigma = 239 set such a group's sd at 2.4 times NUTS's. So those
    groups' raw sds are not bounded; instead, for every group, the sd of the central 99% (draws
    beyond winsorized) is held within 0.3 NUTS sds and at most 2% of the draws lie beyond NUTS's
    0.1% and 99.9% quantiles (0.2% expected; 1% measured at most). The groups given the
    globals against their exact conditional, for sigma from .001 to 3. SBC inside the 95% bands
    for the globals and the groups pooled. compare_with_nuts on 12 groups: one row per group,
    all within 0.3 NUTS sds, k-hat <= 0.7 and C2ST <= 0.6 on all latents. A guide whose groups
    read their neighbours' data fails on groups with different rates."""
    trials = jnp.asarray(np.tile([10, 25, 35], 7)[:20], jnp.int32)
    guide = AutoAmortizedFlow(multilevel_binomial, num_groups=(5, 20))
    result = fit(guide, KEY, trials, successes=jnp.zeros(20, jnp.int32), num_steps=3000,
                 progress_bar=False)
    glob = lambda d: np.column_stack([d["a_bar"], np.log(d["sigma"])])[:2000]
    mean_err, sd_err, central_err, beyond, scores, datasets, one_sided = ([] for _ in range(7))
    for i, j in enumerate([5, 12, 20]):
        data = numpyro.infer.Predictive(multilevel_binomial, num_samples=1)(
            jax.random.PRNGKey(10 + i), trials[:j])["successes"][0]
        datasets.append(((trials[:j],), {"successes": data}))
        ref = _nuts(multilevel_binomial, jax.random.PRNGKey(2), trials[:j], successes=data)
        draws = guide.sample_posterior(jax.random.PRNGKey(i), result.params, trials[:j],
                                       successes=data, sample_shape=(4000,))
        a = np.asarray(draws["a"])
        assert a.shape == (4000, j)
        scores.append(c2st(glob(ref), glob(draws)))
        mean_err.append(np.abs(a.mean(0) - ref["a"].mean(0)) / ref["a"].std(0))
        sd_err.append(np.abs(a.std(0) - ref["a"].std(0)) / ref["a"].std(0))
        central = [np.clip(x, *np.quantile(x, [0.005, 0.995], axis=0)).std(0) for x in (a, ref["a"])]
        central_err.append(np.abs(central[0] - central[1]) / ref["a"].std(0))
        low, high = np.quantile(ref["a"], [0.001, 0.999], axis=0)
        beyond.append(np.mean((a < low) | (a > high), axis=0))
        one_sided.append((data == 0) | (data == trials[:j]))
    mean_err, sd_err, central_err, beyond, one_sided = map(
        np.concatenate, (mean_err, sd_err, central_err, beyond, one_sided))
    assert one_sided.any()  # the datasets hold such a group
    assert max(scores) < 0.6, scores
    assert np.mean(mean_err <= 0.2) >= 0.9 and np.mean(sd_err <= 0.3) >= 0.9, (mean_err, sd_err)
    assert mean_err.max() < 0.3 and sd_err.max(initial=0, where=~one_sided) < 0.5, (
        mean_err, sd_err)
    assert central_err.max() < 0.3 and beyond.max() <= 0.02, (central_err, beyond)
    draws, truths, _, _ = calibration_draws(guide, result.params, KEY, trials,
                                            successes=jnp.zeros(20, jnp.int32),
                                            num_simulations=300, num_samples=200)
    ranks = sbc_ranks(draws, truths)  # columns a_bar, sigma, a[0..19]
    pooled = np.column_stack([ranks[:, :2], ranks[np.arange(300), 2 + np.arange(300) % 20]])
    assert sbc_test(pooled, 200).in_bands.all(), sbc_test(pooled, 200).p_values
    # the groups given the globals against their exact conditional (a grid), for sigma from
    # .001 to 3: right however small sigma is (a local flow of the centred log-odds was off by
    # up to 40 conditional sds at sigma = .001 and 2 at .01)
    sample_locals = jit_call(guide.posterior(result.params), "sample_locals")
    for (args, kw), sigma in itertools.product([datasets[0], datasets[2]],
                                               [0.001, 0.01, 0.1, 1.0, 3.0]):
        n, y = np.asarray(args[0])[:, None], np.asarray(kw["successes"])[:, None]
        batch = _batch(guide, successes=kw["successes"], trials=args[0])
        for a_bar in (-1.0, 0.0):
            ug = jnp.broadcast_to(jnp.asarray([a_bar, np.log(sigma)]), (2000, 1, 2))
            a = np.asarray(sample_locals(KEY, batch, ug))[:, 0, :len(n), 0]
            grid = np.linspace(a_bar - 8 * sigma, a_bar + 8 * sigma, 20001)
            lp = (-0.5 * ((grid - a_bar) / sigma) ** 2 + y * log_expit(grid)
                  + (n - y) * log_expit(-grid))
            w = np.exp(lp - lp.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            m = (w * grid).sum(1)
            sd = np.sqrt((w * (grid - m[:, None]) ** 2).sum(1))
            err, ratio = np.abs(a.mean(0) - m) / sd, a.std(0) / sd
            # every sd within 20%; where sigma is small, every mean within 0.3 conditional sds
            # (four training seeds: worst .25 and .89 at sigma = .001), elsewhere the median
            worst = err.max() if sigma <= 0.01 else np.median(err)
            assert worst < 0.3 and np.all(np.abs(np.log(ratio)) < np.log(1.2)), (
                sigma, err, ratio)
    # compare_with_nuts: a row per group's log-odds, the PSIS check on fewer groups than trained
    report = compare_with_nuts(guide, result.params, KEY, [datasets[1]], num_samples=2000,
                               nuts_model=reparam(multilevel_binomial,
                                                  config={"a": LocScaleReparam(0)}),
                               nuts_kwargs={"num_samples": 1000, "target_accept_prob": 0.95},
                               c2st_kwargs={"early_stopping": True}, progress_bar=False)
    rows = report.latents[report.latents.method == "amortized"]
    assert list(rows.latent) == [f"a[{j}]" for j in range(12)] + ["a_bar", "sigma"]
    assert rows.d_mean.abs().max() < 0.3, rows
    assert report.datasets.pareto_k[0] < 0.7 and report.datasets.c2st_amortized[0] < 0.6
    post = guide.posterior(result.params)
    encoder = post.encoder

    def rolled(*a):
        e, count, stats, panel = encoder(*a)
        return jnp.roll(e, 1, axis=-2), count, jnp.roll(stats, 1, axis=-2), panel

    object.__setattr__(post, "encoder", rolled)
    data = jnp.round(trials * jnp.tile(jnp.asarray([0.9, 0.1, 0.5, 0.3]), 5)).astype(jnp.int32)
    ref = _nuts(multilevel_binomial, jax.random.PRNGKey(3), trials, successes=data)
    batch = _batch(guide, successes=data, trials=trials)
    a = np.asarray(guide.latent_layout.constrain(post.sample(KEY, batch, (4000,))[:, 0])[0]["a"])
    assert np.max(np.abs(a.mean(0) - ref["a"].mean(0)) / ref["a"].std(0)) > 1.0
