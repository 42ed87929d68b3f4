"""The hierarchy read from a model's plates: global and local latents, and which observations
belong to which group (inside the group plate, in a plate nested in it, or through an index)."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized.hierarchy import find_hierarchy

GROUP = jnp.asarray(np.random.default_rng(0).permutation(np.repeat(np.arange(6), 5)))


def varying_intercepts(group, num_groups, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    x = jnp.linspace(-1, 1, group.shape[0])
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(a[group] + b[group] * x, sigma), obs=y)


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", sigma.shape[0]):
        eta = numpyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * eta)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def binomial_groups(trials, y=None):
    abar = numpyro.sample("abar", dist.Normal(0.0, 1.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1.0))
    with numpyro.plate("tanks", trials.shape[0]):
        logit = numpyro.sample("logit", dist.Normal(abar, sigma))
        numpyro.sample("y", dist.Binomial(trials, logits=logit), obs=y)


def nested(y=None):  # 4 groups of 7 observations: the observation plate inside the group plate
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 4, dim=-1):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
        with numpyro.plate("rows", 7, dim=-2):
            numpyro.sample("y", dist.Normal(a, 1.0), obs=y)


def test_global_and_local_latents_and_the_index_link():
    h = find_hierarchy(varying_intercepts, GROUP, 6, y=jnp.zeros(30))
    assert h.hierarchical and h.global_latents == ("mu", "tau", "sigma")
    g = h.group
    assert (g.name, g.size, g.dim, g.local) == ("groups", 6, -1, ("a", "b"))
    assert g.observed == ("y",) and g.index == {"y": "group"}  # read from the model, not named


@pytest.mark.parametrize("model, args, local", [
    (eight_schools, (jnp.full(8, 10.0),), ("eta",)),
    (binomial_groups, (jnp.full(12, 20),), ("logit",)),
])
def test_observations_inside_the_group_plate(model, args, local):
    h = find_hierarchy(model, *args, y=jnp.zeros(args[0].shape[0]))
    assert h.group.local == local and h.group.index == {"y": None}
    assert h.group.size == args[0].shape[0]


def test_an_observation_plate_nested_in_the_group_plate():
    h = find_hierarchy(nested, y=jnp.zeros((7, 4)))
    assert h.global_latents == ("mu",) and h.group.local == ("a",)
    assert (h.group.size, h.group.index) == (4, {"y": None})


def test_a_flat_model_has_no_group_plate():
    def regression(x, y=None):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", x.shape[0]):
            numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    h = find_hierarchy(regression, jnp.ones(5), y=jnp.zeros(5))
    assert not h.hierarchical and h.global_latents == ("b",)


def test_an_index_the_model_computes_must_be_named():
    def computed(y=None):  # the index is not an argument: nothing to read it from per dataset
        with numpyro.plate("groups", 6):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", 30):
            numpyro.sample("y", dist.Normal(a[GROUP], 1.0), obs=y)

    with pytest.raises(ValueError, match=r"'y' belongs to groups of plate 'groups'.*"
                                         r"no integer argument.*group_index="):
        find_hierarchy(computed, y=jnp.zeros(30))


def test_two_candidate_indices_need_a_declaration_which_is_checked():
    def two(group, other, y=None):
        varying_intercepts(group, 6, y)

    with pytest.raises(ValueError, match=r"several arguments hold \(\['group', 'other'\]\)"):
        find_hierarchy(two, GROUP, GROUP, y=jnp.zeros(30))
    h = find_hierarchy(two, GROUP, GROUP, y=jnp.zeros(30), group_index={"y": "other"})
    assert h.group.index == {"y": "other"}
    with pytest.raises(ValueError, match="reads its rows' groups"):
        find_hierarchy(varying_intercepts, GROUP, 6, y=jnp.zeros(30),
                       group_index={"y": "num_groups"})


def test_what_is_not_a_two_level_hierarchy_is_refused_by_name():
    def three_levels(y=None):
        with numpyro.plate("schools", 3, dim=-2), numpyro.plate("classes", 4, dim=-1):
            c = numpyro.sample("c", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(c, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"'c' is inside nested plates \['schools', 'classes'\]"):
        find_hierarchy(three_levels, y=jnp.zeros((3, 4)))

    def crossed(g1, g2, y=None):
        with numpyro.plate("a_groups", 3):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("b_groups", 4):
            b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", g1.shape[0]):
            numpyro.sample("y", dist.Normal(a[g1] + b[g2], 1.0), obs=y)

    g1, g2 = jnp.arange(12) % 3, jnp.arange(12) % 4
    with pytest.raises(ValueError, match="several plates.*crossed"):
        find_hierarchy(crossed, g1, g2, y=jnp.zeros(12))

    def multi_membership(y=None):
        with numpyro.plate("groups", 5):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", 4):
            numpyro.sample("y", dist.Normal(a[:4] + a[1:], 1.0), obs=y)

    with pytest.raises(ValueError, match="depends on 2 groups"):
        find_hierarchy(multi_membership, y=jnp.zeros(4))
