"""Each bijection: invertible, and its log-det equals log|det| of jax.jacobian."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturb
from flax import nnx

from numpyro_amortized.networks.flows import (
    ActNorm,
    AffineCoupling,
    ConditionalAffine,
    FlowEnsemble,
    Permutation,
    SplineCoupling,
    StackedFlows,
    Standardize,
    coupling_flow,
    mixture_log_weights,
)
from numpyro_amortized.networks.flows.spline_coupling import (
    num_spline_params,
    rational_quadratic_spline,
)

CONTEXT = 3


def make(name, dim):
    rngs = nnx.Rngs(0)
    if name == "affine":
        return AffineCoupling(dim, CONTEXT, hidden=(16, 16), rngs=rngs)
    if name in ("spline", "spline_learned_interval"):
        return SplineCoupling(dim, CONTEXT, num_bins=6, bound=3.0, hidden=(16, 16),
                              learned_interval=name != "spline", rngs=rngs)
    if name == "conditional_affine":
        return ConditionalAffine(dim, CONTEXT, hidden=(16,), rngs=rngs)
    if name == "actnorm":
        return ActNorm(dim)
    if name == "permutation":
        return Permutation(dim, rngs=rngs)
    if name == "standardize":
        return Standardize(jnp.linspace(-1, 1, dim), jnp.linspace(0.5, 2.0, dim))


BIJECTIONS = ["affine", "spline", "spline_learned_interval", "conditional_affine", "actnorm",
              "permutation", "standardize"]


@pytest.mark.parametrize("name", BIJECTIONS)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_invertible_and_log_det_matches_jacobian(name, dim):
    # a learned interval's log half-widths scale every slope of the layer exponentially: at the
    # others' noise one input of 40 met a slope near 1e-3, which float32 inverted only to 0.15
    b = perturb(make(name, dim), scale=0.15 if name == "spline_learned_interval" else 0.3)
    key = jax.random.PRNGKey(1)
    # spread inputs over the spline interval and its tails
    x = 2.5 * jax.random.normal(key, (8, dim))
    c = jax.random.normal(jax.random.PRNGKey(2), (8, CONTEXT))
    y, ld = b.transform_and_log_det(x, c)
    x_back, ld_inv = b.inverse_and_log_det(y, c)
    # tight on the data side; on the base side float32 loses digits where the map is flat
    # (spline derivatives down to 1e-3), and the inverse's log-det is taken there, while a
    # wrong inverse or log-det is off by O(0.1) or more
    np.testing.assert_allclose(b.transform_and_log_det(x_back, c)[0], y, atol=2e-4)
    np.testing.assert_allclose(x_back, x, atol=1e-2)
    np.testing.assert_allclose(ld + ld_inv, 0.0, atol=2e-3)
    fwd = lambda v, ci: b.transform_and_log_det(v[None], ci[None])[0][0]
    inv = lambda v, ci: b.inverse_and_log_det(v[None], ci[None])[0][0]
    jac = jax.jit(jax.vmap(jax.jacobian(fwd)))(x, c)
    jac_inv = jax.jit(jax.vmap(jax.jacobian(inv)))(y, c)
    np.testing.assert_allclose(ld, jnp.linalg.slogdet(jac)[1], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(ld_inv, jnp.linalg.slogdet(jac_inv)[1], atol=2e-3, rtol=1e-3)


def test_perturbed_bijections_are_not_identity():
    """The test above would be vacuous on identity maps."""
    for name in ["affine", "spline", "spline_learned_interval", "conditional_affine", "actnorm",
                 "standardize"]:
        b = perturb(make(name, 3), scale=0.3)
        x = jnp.ones((2, 3))
        y, _ = b.transform_and_log_det(x, jnp.ones((2, CONTEXT)))
        assert float(jnp.max(jnp.abs(y - x))) > 1e-2, name


@pytest.mark.parametrize("dim", [1, 2, 3, 10])
def test_every_coordinate_is_transformed_every_other_layer(dim):
    """Random permutations alone can leave a coordinate untransformed through a whole flow."""
    for seed in range(20):
        flow = coupling_flow(dim, CONTEXT, num_layers=4, hidden=(4,), rngs=nnx.Rngs(seed))
        order = np.arange(dim)  # which original coordinate sits at each position
        transformed = []
        for b in flow.layers():
            if isinstance(b, Permutation):
                order = order[np.asarray(b.perm[...])]
            elif hasattr(b, "num_transformed"):
                transformed.append(set(order[: b.num_transformed].tolist()))
        for first, second in itertools.pairwise(transformed):
            assert first | second == set(range(dim)), (seed, transformed)


def test_spline_is_monotone_and_identity_in_tails():
    p = jax.random.normal(jax.random.PRNGKey(0), (400, 3 * 8 - 1))
    x = jnp.linspace(-6, 6, 400)
    y, _ = rational_quadratic_spline(x, jnp.broadcast_to(p[0], p.shape), num_bins=8, bound=5.0)
    assert bool(jnp.all(jnp.diff(y) > 0))
    tails = jnp.abs(x) >= 5.0
    np.testing.assert_allclose(y[tails], x[tails])


def test_a_learned_interval_contracts_bulk_and_tails_alike():
    """A spline with a fixed interval that contracts its bulk stretches its outer bins; with a
    learned interval the same contraction carries the tails along (lines with the end
    derivatives), and zero parameters are the identity."""
    k, bound = 8, 5.0
    x = jnp.linspace(-9.0, 9.0, 1801)
    zero = jnp.zeros((x.size, num_spline_params(k, True)))
    y, ld = rational_quadratic_spline(x, zero, num_bins=k, bound=bound, learned_interval=True)
    np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(ld, 0.0, atol=1e-5)
    # output interval [-bound e^-2, bound e^-2], end derivatives e^-2: everything shrinks by e^-2
    shrink = math.log(math.expm1(math.exp(-2.0) - 1e-3)) - math.log(math.expm1(1 - 1e-3))
    p = zero.at[:, 2 * k:3 * k + 1].set(shrink).at[:, 3 * k + 1:].set(-2.0)
    y, ld = rational_quadratic_spline(x, p, num_bins=k, bound=bound, learned_interval=True)
    np.testing.assert_allclose(y, math.exp(-2.0) * x, atol=1e-4)
    np.testing.assert_allclose(ld, -2.0, atol=1e-3)
    x_back, _ = rational_quadratic_spline(y, p, num_bins=k, bound=bound, inverse=True,
                                          learned_interval=True)
    np.testing.assert_allclose(x_back, x, atol=1e-3)
    # a fixed-interval spline whose middle bins map [-10/3, 10/3] onto [-5/8, 5/8] (bin slopes
    # 3/16) must give its outer bins slopes of 21/8 to cover [-5, 5]: steeper than 3 in places
    slopes = np.array([2.625] * 2 + [0.1875] * 4 + [2.625] * 2)
    knots = np.sqrt(slopes[:-1] * slopes[1:])  # interior derivatives between adjacent bins
    fixed = jnp.zeros((x.size, num_spline_params(k)))
    fixed = (fixed.at[:, :k].set(jnp.log(jnp.asarray([1.0] * 2 + [2.0] * 4 + [1.0] * 2)))
             .at[:, k:2 * k].set(jnp.log(jnp.asarray([7.0] * 2 + [1.0] * 4 + [7.0] * 2)))
             .at[:, 2 * k:].set(jnp.asarray(np.log(np.expm1(knots - 1e-3))
                                            - math.log(math.expm1(1 - 1e-3)), jnp.float32)))
    y_fixed, ld_fixed = rational_quadratic_spline(x, fixed, num_bins=k, bound=bound)
    assert abs(float(y_fixed[jnp.argmin(jnp.abs(x - 10 / 3))]) - 0.625) < 0.05
    assert float(jnp.max(ld_fixed)) > math.log(3.0) and float(jnp.max(ld)) < -1.99


def test_coupling_layers_start_as_identity():
    for cls in (AffineCoupling, SplineCoupling,
                functools.partial(SplineCoupling, learned_interval=True)):
        layer = cls(4, CONTEXT, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
        y, _ld = layer.transform_and_log_det(x, jnp.ones((5, CONTEXT)))
        np.testing.assert_allclose(y, x, atol=5e-3)


@pytest.mark.parametrize("transformer", ["spline", "affine"])
@pytest.mark.parametrize("dim", [1, 4])
def test_flow_sample_log_prob_consistent(transformer, dim):
    flow = perturb(coupling_flow(dim, CONTEXT, transformer=transformer, num_layers=3,
                                 hidden=(16, 16), rngs=nnx.Rngs(0)), scale=0.05)
    c = jax.random.normal(jax.random.PRNGKey(3), (6, CONTEXT))
    u, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(4), c, (7,))
    assert u.shape == (7, 6, dim) and log_q.shape == (7, 6)
    np.testing.assert_allclose(log_q, flow.log_prob(u, c), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("transformer", ["spline", "affine"])
def test_flow_density_integrates_to_one(transformer):
    flow = perturb(coupling_flow(1, CONTEXT, transformer=transformer, num_layers=3,
                                 hidden=(16, 16), rngs=nnx.Rngs(0)), scale=0.1)
    grid = jnp.linspace(-15, 15, 20001)[:, None]
    c = jnp.full((1, CONTEXT), 0.7)
    density = jnp.exp(flow.log_prob(grid, c))
    total = float(jnp.trapezoid(density, grid[:, 0]))
    assert abs(total - 1.0) < 1e-3


def two_member_ensemble(weights):
    """Two perturbed 1-d flows around -2 (sd 0.5) and +1.5 (sd 1), mixed with ``weights``."""
    members = [perturb(coupling_flow(1, CONTEXT, transformer=t, num_layers=2, hidden=(16,),
                                     loc=jnp.array([m]), scale=jnp.array([s]),
                                     rngs=nnx.Rngs(i)), scale=0.05, seed=i)
               for i, (t, m, s) in enumerate([("spline", -2.0, 0.5), ("affine", 1.5, 1.0)])]
    flow = FlowEnsemble(members, 1)
    flow.log_weights[...] = jnp.log(jnp.asarray(weights, jnp.float32))
    return flow


def test_ensemble_is_the_weighted_mixture_of_its_members():
    flow = two_member_ensemble([0.25, 0.75])
    c = jnp.full((1, CONTEXT), 0.7)
    grid = jnp.linspace(-15, 15, 20001)[:, None]
    members = jnp.exp(flow.member_log_probs(grid, c))
    density = jnp.exp(flow.log_prob(grid, c))
    np.testing.assert_allclose(density, 0.25 * members[0] + 0.75 * members[1], rtol=1e-4,
                               atol=1e-12)
    assert abs(float(jnp.trapezoid(density, grid[:, 0])) - 1.0) < 1e-3
    # draws follow the mixture: Kolmogorov-Smirnov distance to its CDF (the 1% critical value
    # for 20,000 draws is 0.0115; drawing the members with equal weights gives ~0.25)
    u, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(1), c, (20_000,))
    np.testing.assert_allclose(log_q, flow.log_prob(u, c), atol=1e-4)
    cdf = np.cumsum(np.asarray(density)) * float(grid[1, 0] - grid[0, 0])
    ecdf = np.searchsorted(np.sort(np.asarray(u[:, 0, 0])), np.asarray(grid[:, 0])) / 20_000
    assert np.max(np.abs(ecdf - cdf)) < 0.0115
    # the training objective is each member on its own: the mean of their log densities
    np.testing.assert_allclose(flow.training_log_prob(grid, c),
                               jnp.mean(flow.member_log_probs(grid, c), axis=0), rtol=1e-6)


def test_mixture_weights_maximize_the_held_out_likelihood(rng):
    # points from 0.3 N(-2, 1) + 0.7 N(2, 1); EM on the true component densities recovers 0.3
    x = np.where(rng.uniform(size=4000) < 0.3, rng.normal(-2, 1, 4000), rng.normal(2, 1, 4000))
    lps = np.stack([-0.5 * (x + 2) ** 2, -0.5 * (x - 2) ** 2]) - 0.5 * np.log(2 * np.pi)
    w = np.exp(mixture_log_weights(lps))
    assert abs(w[0] - 0.3) < 0.03 and abs(w.sum() - 1) < 1e-9
    # a member that is wrong everywhere gets no weight; non-finite values count as density 0
    bad = np.stack([lps[1], -0.5 * (x - 9) ** 2, np.full_like(x, np.nan)])
    w = np.exp(mixture_log_weights(bad))
    assert w[0] > 0.99 and w[2] < 1e-6


@pytest.mark.slow
def test_members_of_one_structure_stack_into_one_vectorized_flow_in_member_order():
    # the two spline members share their graph (same construction key, hence permutations) and
    # differ in weights; the affine one stands alone
    def member(t, seed):
        flow = coupling_flow(2, CONTEXT, transformer=t, num_layers=2, hidden=(16,),
                             rngs=nnx.Rngs(0))
        return perturb(flow, scale=0.1, seed=seed)

    members = [member("spline", 1), member("affine", 2), member("spline", 3)]
    c = jax.random.normal(jax.random.PRNGKey(3), (6, CONTEXT))
    u = jax.random.normal(jax.random.PRNGKey(4), (6, 2))
    alone = jnp.stack([m.log_prob(u, c) for m in members])
    flow = FlowEnsemble(members, 2)
    assert [g.size for g in flow.groups] == [2, 1]
    assert flow.member_kinds == ("spline", "affine", "spline")
    assert flow.member_groups == ((0, 2), (1,))  # the members each stacked group holds
    np.testing.assert_allclose(flow.member_log_probs(u, c), alone, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(alone[0] - alone[2]).max()) > 1e-2  # the stacked members differ
    # sampling: every member draws its own points; the mixture's log q is consistent
    draws, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(5), c, (50,))
    assert draws.shape == (50, 6, 2)
    np.testing.assert_allclose(log_q, flow.log_prob(draws, c), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one structure"):
        StackedFlows([member("spline", 1), member("affine", 2)])


def test_repeated_layers_are_the_unrolled_chain():
    """The scanned stack of coupling layers computes what the layers one by one do."""
    from numpyro_amortized.networks.flows import ConditionalFlow, Repeated

    flow = perturb(coupling_flow(3, CONTEXT, num_layers=4, hidden=(8,), rngs=nnx.Rngs(1)),
                   scale=0.3)
    assert isinstance(flow.bijections[0], Repeated) and flow.bijections[0].length == 4
    unrolled = ConditionalFlow(flow.layers(), 3)
    assert len(unrolled.bijections) == 4 * 3 + 1  # [coupling, ActNorm, permutation] x 4, scale
    assert flow.layer_types() == [type(b) for b in unrolled.bijections]
    u = jax.random.normal(jax.random.PRNGKey(3), (7, 3))
    c = jax.random.normal(jax.random.PRNGKey(4), (7, CONTEXT))
    np.testing.assert_allclose(flow.log_prob(u, c), unrolled.log_prob(u, c), rtol=1e-5,
                               atol=1e-5)
    draws = flow.sample(jax.random.PRNGKey(5), c)
    np.testing.assert_allclose(draws, unrolled.sample(jax.random.PRNGKey(5), c), atol=1e-5)
    with pytest.raises(ValueError, match="one structure"):
        Repeated(flow.layers()[:2])  # a coupling and an ActNorm


def test_a_fitted_affine_end_learns_the_mean_and_sd_and_adds_its_gaussian_likelihood():
    """A flow ending in a fitted conditional affine layer: its training objective is its log
    density plus the layer's Gaussian likelihood of the standardized latents (exactly; an
    ensemble of such flows adds its members' terms; a plain affine end adds none), and training on N(2c - 1, (0.2 + 0.3c)^2) latents fits the
    layer's location and scale to that mean and sd, which the flow's likelihood alone leaves to
    the splines (measured, 800 steps: the fitted layer within .03 of the mean and 6% of the sd;
    the same layer trained without its likelihood .85 and 213% off)."""
    import optax

    from numpyro_amortized.networks.flows import ensemble_flow

    loc, scale = jnp.array([1.0, -2.0]), jnp.array([2.0, 0.5])
    small = {"hidden": (16,), "num_layers": 1, "rngs": nnx.Rngs(0)}
    flow = coupling_flow(2, 1, conditional_affine="fitted", loc=loc, scale=scale, **small)
    plain = coupling_flow(2, 1, conditional_affine=True, **small)
    ens = ensemble_flow(2, 1, conditional_affine="fitted", **small)
    u = jax.random.normal(jax.random.PRNGKey(0), (6, 2)) * 3
    c = jnp.linspace(0, 1, 6)[:, None]

    @jax.jit  # one program, not one per operation
    def objectives(u, c):
        extra = lambda f: f.training_log_prob(u, c) - f.log_prob(u, c)
        return (extra(flow), extra(plain), ens.training_log_prob(u, c)
                - jnp.mean(ens.member_log_probs(u, c), 0), flow.layers()[-2]._loc_scale(c))

    fitted, unfitted, members, (m, s) = objectives(u, c)
    gauss = jnp.sum(-0.5 * (((u - loc) / scale - m) / s) ** 2 - jnp.log(s) - 0.9189385, -1)
    np.testing.assert_allclose(fitted, gauss, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(unfitted, 0.0)
    assert np.abs(members).min() > 1.0  # each member adds its layer's likelihood

    def train(kind):  # 800 Adam steps in one compiled loop
        f = coupling_flow(1, 1, hidden=(16, 16), num_layers=1, conditional_affine=kind,
                          rngs=nnx.Rngs(1))
        graphdef, params, rest = nnx.split(f, nnx.Param, ...)
        opt = optax.adam(3e-3)

        def loss(params, key):
            c = jax.random.uniform(key, (256, 1))
            x = 2 * c - 1 + (0.2 + 0.3 * c) * jax.random.normal(jax.random.fold_in(key, 1),
                                                                  (256, 1))
            return -nnx.merge(graphdef, params, rest).training_log_prob(x, c).mean()

        def step(i, carry):
            params, state = carry
            grads = jax.grad(loss)(params, jax.random.PRNGKey(i))
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 800, step, (p, opt.init(p))))(params)
        cs = jnp.array([[0.1], [0.5], [0.9]])
        m, s = nnx.merge(graphdef, params, rest).layers()[-2]._loc_scale(cs)
        return np.abs(m[:, 0] - (2 * cs[:, 0] - 1)), np.abs(s[:, 0] / (0.2 + 0.3 * cs[:, 0]) - 1)

    mean_err, sd_err = train("fitted")
    assert mean_err.max() < 0.05 and sd_err.max() < 0.1, (mean_err, sd_err)
