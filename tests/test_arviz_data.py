"""The ArviZ calls behave the same on ArviZ 1.x (Python >= 3.12) and 0.x (Python 3.11)."""

import numpy as np
import pytest

from numpyro_amortized.compare.arviz_data import ARVIZ_1, from_dict, psislw
from numpyro_amortized.compare.importance import psis_weights


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_pareto_k_of_pareto_weights_is_one_over_the_tail_index(alpha):
    # weights with a Pareto(alpha) tail: the generalized Pareto shape of their tail is 1/alpha
    rng = np.random.default_rng(0)
    ks = [psislw(np.log(rng.pareto(alpha, size=4000) + 1.0))[1] for _ in range(8)]
    assert abs(np.median(ks) - 1 / alpha) < 0.12, ks


def test_smoothed_weights_are_normalized_and_keep_the_order():
    rng = np.random.default_rng(1)
    log_w = rng.normal(size=2000) * 2.0
    smoothed, k = psislw(log_w)
    assert k < 0.7
    np.testing.assert_allclose(np.exp(smoothed).sum(), 1.0, rtol=1e-9)
    # smoothing replaces the largest weights by Pareto quantiles: the order is kept
    order = np.argsort(log_w)
    assert np.all(np.diff(smoothed[order]) >= -1e-12)


def test_equal_weights_are_a_perfect_proposal_not_an_error():
    log_w = np.full(1000, -3.0) + 1e-7 * np.random.default_rng(2).normal(size=1000)
    smoothed, k = psislw(log_w)
    assert k == -np.inf
    np.testing.assert_allclose(np.exp(smoothed), 1e-3, rtol=1e-5)
    _, k, ess = psis_weights(log_w)
    assert k < 0.5 and ess == pytest.approx(1000, rel=1e-3)


def test_a_heavy_right_tail_of_weights_is_flagged():
    # proposal N(0, 1) for a target N(0, 3^2): log w = x^2 (1/2 - 1/18) + const, a Pareto tail
    # of index 9/8, so k = 8/9: a few draws carry most of the weight
    x = np.random.default_rng(3).normal(size=4000)
    assert psislw(x**2 * (1 / 2 - 1 / 18))[1] > 0.7


def test_sampled_groups_are_shaped_by_chain():
    rng = np.random.default_rng(4)
    data = from_dict(posterior={"theta": rng.normal(size=(4, 100, 3))},
                     observed_data={"y": np.ones(5)}, attrs={"source": "test"})
    assert dict(data.posterior.sizes)["chain"] == 4 and data.posterior["theta"].shape == (4, 100, 3)
    assert data.attrs["source"] == "test"
    assert ARVIZ_1 == (type(data).__name__ == "DataTree")
