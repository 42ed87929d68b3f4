"""Faults injected, clear outcomes asserted: samplers that hang, chunks that never finish,
set-up keys, forged network sizes and files left by crashed writers."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized import AutoAmortizedFlow, CheckpointError, load, save
from numpyro_amortized.networks import affine_flow
from numpyro_amortized.simulation import looping_sites, simulate

SCRIPTS = pathlib.Path(__file__).parent / "scripts"
KEY = jax.random.PRNGKey(0)

# the binomial regression whose prior-predictive draw never returned with NumPyro's sampler
COUNTS = jnp.array([825, 108, 560, 25, 325, 593, 417, 375, 191, 393, 373, 341])
DEPT = jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
MALE = jnp.array([1, 0] * 6)


def admissions(admit=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.5).expand([6]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", 12):
        numpyro.sample("admit", dist.Binomial(COUNTS, logits=a[DEPT] + b * MALE), obs=admit)


@pytest.mark.parametrize("observed", ["", ", admit=jax.numpy.zeros(12, 'int32')"])
def test_binomial_simulations_return_where_numpyros_sampler_hangs(observed):
    # batch 3908 of 256 keys, vmapped and compiled for CPU, never returns from NumPyro's
    # Binomial sampler (checked by hand: > 45 s, twice); the simulator draws it in milliseconds,
    # also when the observations are given, as fit gives them (with LoopSafe inside uncondition
    # they reached it observed and kept NumPyro's sampler: no return within 60 s, and the
    # multilevel binomial's training stalled at step 5,300)
    code = (
        f"import jax, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "from test_reliability import admissions\n"
        "from numpyro_amortized.simulation import simulate\n"
        f"f = jax.jit(lambda k: simulate(admissions, k, 256{observed}))\n"
        "for i in (3907, 3908, 3909):\n"
        "    keys = jax.random.fold_in(jax.random.PRNGKey(0), i)\n"
        "    jax.block_until_ready(f(keys))\n"
        "print('returned')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "returned" in out.stdout


@pytest.mark.parametrize("wrap", ["plain", "expanded", "independent"])
def test_simulated_binomials_have_the_binomial_distribution(wrap):
    n, p = jnp.array([3, 40, 900]), jnp.array([0.1, 0.5, 0.83])

    def model(y=None):
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        d = dist.Binomial(n, probs=p)
        if wrap == "expanded":
            d = dist.Binomial(n[:, None], probs=p[:, None]).expand([3, 2])
        if wrap == "independent":
            d = d.to_event(1)
        numpyro.sample("y", d, obs=y)

    y = simulate(model, KEY, 40_000)["y"]
    given = simulate(model, KEY, 40_000, y=jnp.zeros(np.shape(y)[1:], y.dtype))["y"]
    np.testing.assert_array_equal(y, given)  # the same sampler whether observations are given
    assert y.dtype == jnp.asarray(n).dtype
    y = np.asarray(y).reshape(40_000, 3, -1)[:, :, 0]
    mean, var = np.asarray(n * p), np.asarray(n * p * (1 - p))
    # sample mean within 4.5 standard errors; variance within 4.5 of its standard errors
    np.testing.assert_array_less(np.abs(y.mean(0) - mean), 4.5 * np.sqrt(var / 40_000))
    np.testing.assert_array_less(np.abs(y.var(0) / var - 1), 4.5 * np.sqrt(2 / 40_000) + 0.01)


def test_sites_sampled_with_loops_are_named():
    assert looping_sites(admissions) == [("admit", "BinomialLogits")]

    def normal(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    assert looping_sites(normal) == []


def test_a_chunk_that_never_finishes_raises_names_sites_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    out = subprocess.run([sys.executable, str(SCRIPTS / "stalled_fit.py"), str(path)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    message = result["message"]
    assert "steps 31-40 have not finished after 3 s" in message
    assert "'y' (BinomialLogits)" in message
    assert "holds the run as last saved (step 20)" in message and "resume=" in message
    assert result["state_step"] == 30
    assert result["seconds"] < 120
    guide, params = load(path, binomial_rows)  # the periodic checkpoint survives, and loads
    assert guide.sample_posterior(KEY, params, y=jnp.array([3, 4, 5]))["mu"].shape == ()


def binomial_rows(y=None):  # the model of scripts/stalled_fit.py
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", 3):
        numpyro.sample("y", dist.Binomial(jnp.array([20, 30, 40]), logits=mu), obs=y)


def test_set_up_draws_use_the_callers_key():
    seen = []

    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        if not isinstance(mu, jax.core.Tracer):
            seen.append(float(mu))
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    draws = []
    for key in (jax.random.PRNGKey(1), jax.random.PRNGKey(2), jax.random.PRNGKey(1)):
        seen.clear()
        AutoAmortizedFlow(model, flow=affine_flow, num_pilot_simulations=64).initialize(
            key, (), {"y": jnp.zeros(10)})
        draws.append(tuple(seen))
    assert draws[0] == draws[2] and draws[0] != draws[1]


def normal_mean(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", 10):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_forged_network_sizes_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    from numpyro_amortized.checkpoint import read_file, write_file
    from numpyro_amortized.networks import spline_flow

    guide = AutoAmortizedFlow(normal_mean, flow=spline_flow, num_pilot_simulations=256)
    params = guide.setup(KEY, y=jnp.zeros(10))
    save(tmp_path / "a.ckpt", guide, params)
    body = read_file(tmp_path / "a.ckpt")
    built = []

    def build(*args, **kwargs):
        built.append(1)
        raise AssertionError("a forged network was built")

    monkeypatch.setattr(AutoAmortizedFlow, "_build_networks", build)
    forged = {"hidden": [20_000, 20_000]}, {"num_layers": 10**6}, {"num_bins": 10**5}
    for kwargs in forged:
        flow = {"name": "spline_flow", "kwargs": kwargs}
        config = dict(json.loads(body["guide"]), flow=flow)
        write_file(tmp_path / "big.ckpt", {**body, "guide": json.dumps(config),
                                           "flow": json.dumps(flow)})
        with pytest.raises(CheckpointError, match="larger than anything the stored weights"):
            load(tmp_path / "big.ckpt", normal_mean)
    assert not built


def test_temporary_files_of_crashed_writers_are_removed(tmp_path):
    from numpyro_amortized.checkpoint import read_file, write_file
    from numpyro_amortized.checkpoint.format import _temporary

    target = tmp_path / "run.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=False, capture_output=True, text=True).stdout.strip()
    fd, mine = _temporary(target)  # a save in progress in this (live) process
    os.close(fd)
    host = socket.gethostname()
    orphan = tmp_path / f".run.ckpt.{host}.{dead}.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    other = tmp_path / f".other.ckpt.{host}.{dead}.abc123.tmp"  # another target's: not ours
    other.write_bytes(b"x")
    old_umask = os.umask(0o027)
    try:
        write_file(target, {"format_version": 3})
    finally:
        os.umask(old_umask)
    assert not orphan.exists() and os.path.exists(mine) and other.exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)  # the umask's, not 0600
    assert read_file(target) == {"format_version": 3}


def location_scale(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("N", 20):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_data_outside_the_training_range_warn_and_the_range_is_saved(tmp_path):
    import warnings

    from numpyro.infer import Predictive

    from numpyro_amortized import fit
    from numpyro_amortized.checkpoint.format import read_file, write_file

    guide = AutoAmortizedFlow(location_scale, flow=affine_flow, num_pilot_simulations=512)
    params = fit(guide, KEY, y=jnp.zeros(20), num_steps=300, validation_size=512,
                 progress_bar=False).params
    assert guide.summary_range.num_reference == 256
    ys = Predictive(location_scale, num_samples=1000)(jax.random.PRNGKey(5))["y"]
    # datasets from the model are inside, but for the conformal 1-in-257 share by chance
    outside = guide.summary_range.outside(guide.summary_statistics_batch(params, {"y": ys}))
    assert outside.mean() < 0.012, outside.mean()
    far = ys[0] + 25.0  # 25 prior sds of mu away
    with pytest.warns(UserWarning, match="This dataset lies outside the data the guide was "
                                         "trained on") as record:
        guide.sample_posterior(KEY, params, y=far, sample_shape=(10,))
    assert record[0].filename == __file__  # the warning points at the caller's line
    with pytest.warns(UserWarning, match=r"1 of 3 datasets \(indices 1\) lie outside"):
        guide.sample_posterior_batch(KEY, params, {"y": jnp.stack([ys[1], far, ys[2]])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide.sample_posterior(KEY, params, y=ys[3], sample_shape=(10,))
    # the range travels with a checkpoint, and a forged one is refused
    save(tmp_path / "g.ckpt", guide, params)
    loaded, loaded_params = load(tmp_path / "g.ckpt", location_scale)
    assert loaded.summary_range.threshold == guide.summary_range.threshold
    with pytest.warns(UserWarning, match="outside the data the guide was trained on"):
        loaded.sample_posterior(KEY, loaded_params, y=far)
    body = read_file(tmp_path / "g.ckpt")
    body["summary_range"]["loc"] = np.zeros(3)
    write_file(tmp_path / "forged.ckpt", body)
    with pytest.raises(CheckpointError, match="summary range does not fit"):
        load(tmp_path / "forged.ckpt", location_scale)
