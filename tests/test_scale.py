"""Training at scale: all devices, several processes, checkpoints, resume, keep-the-best, faults.

Multi-device and multi-process runs happen in subprocesses (``tests/scripts``), with forced CPU
devices and JAX's distributed runtime on 127.0.0.1 with gloo collectives.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_amortized
from numpyro_amortized import NPE, AutoAmortizedFlow, CheckpointError, fit
from numpyro_amortized.checkpoint import checkpoint_body, read_file, write_file
from numpyro_amortized.examples.models import linear_regression
from numpyro_amortized.networks import affine_flow, spline_flow

SCRIPTS = Path(__file__).parent / "scripts"
NO_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}  # for the multi-device scripts (below)
Z = jnp.zeros(15)


def run_script(name, *args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def small_flow(**kw):
    return functools.partial(affine_flow, num_layers=2, hidden=(32,), **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                              flow=small_flow())
    result = fit(guide, jax.random.PRNGKey(0), x=Z, y=Z, num_steps=60, batch_size=64,
                 num_chunks=3, validation_size=64, progress_bar=False,
                 check=False)  # 60 steps: the checkpoint's contents matter here, not accuracy
    path = tmp_path_factory.mktemp("ckpt") / "regression.ckpt"
    numpyro_amortized.save(path, guide, result)
    return guide, result, path


# ---------------------------------------------------------------------------- devices
@pytest.mark.slow
def test_same_trajectory_on_1_2_4_devices_and_pmap_gives_the_same_update():
    # not through the persistent compilation cache: a 4-device program loaded from it
    # deadlocks in its all-reduce on CPU (a rerun of this test with the cache warm failed so)
    out = json.loads(run_script("devices.py", env=NO_CACHE).strip().splitlines()[-1])
    losses = {int(k): np.asarray(v) for k, v in out["losses"].items()}
    assert losses[1].shape == (30,) and losses[1][-1] < losses[1][0] - 0.5  # it trains
    for n in (2, 4):  # same global batch and seed: same trajectory up to reduction order
        np.testing.assert_allclose(losses[n], losses[1], rtol=0, atol=1e-4)
    assert set(out["sharding"].values()) == {"P()"}  # parameters replicated
    pm = out["pmap"]
    assert pm["max_param_change"] > 1e-4
    assert pm["max_param_diff"] < 1e-6
    assert np.allclose(pm["loss_pmap"], pm["loss_jit"], rtol=1e-6)
    assert pm["dropped_pmap"] == [5, 5, 5, 5]  # psum over devices of unequal drops
    assert out["pmap_online"]["step"] == 1 and np.isfinite(out["pmap_online"]["loss"]).all()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_like_one(tmp_path):
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           **NO_CACHE}
    script = str(SCRIPTS / "distributed_fit.py")
    procs = [subprocess.Popen([sys.executable, script, str(port), "2", str(i),
                               str(tmp_path / f"p{i}.npz"), str(tmp_path / f"p{i}.ckpt")],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    run_script("distributed_fit.py", 0, 0, 0, tmp_path / "single.npz",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", **NO_CACHE})
    a, b, single = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "single.npz"))
    assert int(a["processes"]) == 2 and int(a["devices"]) == 2 and int(single["devices"]) == 2
    params = [k for k in a.files if k.startswith("param")]
    assert len(params) > 10
    for k in params:  # identical parameters in both processes
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_allclose(a[k], single[k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["losses"], single["losses"], rtol=0, atol=1e-5)
    # a flow ensemble's mixture weights: fitted on all the held-out simulations, the same in both
    assert a["log_weights"].shape == (2,)
    np.testing.assert_array_equal(a["log_weights"], b["log_weights"])
    np.testing.assert_allclose(a["log_weights"], single["log_weights"], rtol=0, atol=1e-4)
    # only process 0 writes checkpoints
    assert (tmp_path / "p0.ckpt").exists() and not (tmp_path / "p1.ckpt").exists()


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_save_load_in_a_new_process_gives_identical_draws(trained, tmp_path):
    guide, result, path = trained
    run_script("load_and_sample.py", path, tmp_path / "draws.npy")
    x = jnp.linspace(0.0, 1.0, 12)
    draws = guide.sample_posterior(jax.random.PRNGKey(7), result.params, x=x, y=1.0 + 2.0 * x + 0.5 * jnp.sin(9.0 * x),
                                   sample_shape=(100,))
    here = np.concatenate([draws["beta"], draws["sigma"][:, None]], axis=1)
    np.testing.assert_array_equal(np.load(tmp_path / "draws.npy"), here)


def test_checkpoint_holds_no_pickle_and_its_metadata(trained):
    _, _, path = trained
    raw = path.read_bytes()
    assert raw.startswith(b"numpyro_amortized checkpoint\n")
    assert b"\x80\x04\x95" not in raw[:4096]  # no pickle protocol-4 frame
    body = read_file(path)
    assert body["package_version"] == numpyro_amortized.__version__
    assert json.loads(body["guide"])["flow"]["name"] == "affine_flow"
    assert body["train"]["step"] == 60 and body["train"]["losses"].shape == (60,)


@pytest.mark.slow
def test_interrupted_fit_saves_and_resume_equals_uninterrupted(tmp_path):
    ckpt, script = tmp_path / "run.ckpt", str(SCRIPTS / "interruptible_fit.py")
    proc = subprocess.Popen([sys.executable, script, str(ckpt), str(tmp_path / "a.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of training
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.startswith("interrupted"), out
    assert "Training interrupted at step" in err
    stopped = np.load(tmp_path / "a.npz")
    assert 1000 <= int(stopped["step"]) < 6000 and int(stopped["step"]) % 20 == 0
    assert read_file(ckpt)["train"]["step"] == int(stopped["step"])  # saved on interrupt

    assert run_script("interruptible_fit.py", ckpt, tmp_path / "b.npz", "resume").startswith(
        "finished 6000")
    assert run_script("interruptible_fit.py", tmp_path / "fresh.ckpt",
                      tmp_path / "c.npz").startswith("finished 6000")
    resumed, fresh = np.load(tmp_path / "b.npz"), np.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(resumed["losses"], fresh["losses"])
    assert resumed.files == fresh.files
    for k in resumed.files:
        np.testing.assert_array_equal(resumed[k], fresh[k])


@pytest.mark.filterwarnings("ignore::numpyro_amortized.train.GuideCheckWarning")  # trained badly
@pytest.mark.slow
def test_keep_best_returns_the_parameters_with_the_lowest_validation_loss():
    # a single spline flow, which memorizes this small bank (what keep-the-best is for)
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                              flow=spline_flow)
    result = fit(guide, jax.random.PRNGKey(0), x=Z, y=Z, num_steps=1500, batch_size=64,
                 num_simulations=400, num_chunks=30, patience=0, progress_bar=False)  # overfits
    steps, val = result.validation_losses
    assert result.best_validation_loss == pytest.approx(val.min())
    assert result.best_step == steps[np.argmin(val)] < 1500
    assert val[-1] > val.min() + 0.2  # the bank has been memorized by the end
    fresh = guide.simulate(jax.random.PRNGKey(99), 4096, x=Z, y=Z)
    nll = lambda p: float(jnp.mean(NPE().simulation_losses(guide, p, None, fresh, x=Z, y=Z)))
    assert nll(result.params[guide.param_name]) < nll(result.state.params) - 0.1


@pytest.mark.filterwarnings("ignore::numpyro_amortized.train.GuideCheckWarning")  # trained badly
@pytest.mark.slow
def test_plateau_halves_the_rate_from_the_best_and_ends_the_run():
    # a bank the spline flow over-fits, as above but of 1,000 simulations: with patience, each
    # plateau goes back to the best parameters at half the learning rate, and the last plateau
    # ends the run. A single spline flow (the fixed-budget default is a flow ensemble, which
    # over-fits a bank less). Whether this generalizes better than keeping the best alone is
    # measured in docs/benchmarks.md (10^4 and 10^5 simulations): on a bank this small, with 100
    # held out, the fresh loss went either way (patience 3, seeds 0-3 on the 2026-11-28 machine:
    # 0.09, 0.19 and 0.03 worse, 0.09 better; earlier machine: better on all four), so it is not
    # asserted here.
    from numpyro_amortized.train import Callback

    class Restarts(Callback):  # called after Plateau: records what each halving restarted from
        seen, restarts = 0, []

        def on_chunk(self, run, chunk):
            if run.plateau["halvings"] > self.seen:
                self.seen = run.plateau["halvings"]
                self.restarts.append(all(np.array_equal(a, b) for a, b in zip(
                    jax.tree.leaves(run.state.params), jax.tree.leaves(run.best_params),
                    strict=True)))

    runs, spy = {}, Restarts()
    for patience in (0, 3):
        guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                                  flow=spline_flow)
        runs[patience] = guide, fit(guide, jax.random.PRNGKey(0), x=Z, y=Z, num_steps=3000,
                                    batch_size=64, num_simulations=1000, num_chunks=60,
                                    patience=patience, progress_bar=False,
                                    callbacks=[spy] if patience else [])
    stopped = runs[3][1]
    assert stopped.config["plateau"]["halvings"] == 4 and stopped.config["plateau"]["scale"] == 1 / 16
    assert stopped.stopped_early and len(stopped.losses) < 3000
    assert stopped.validation_losses[0][-1] == len(stopped.losses)
    assert not runs[0][1].stopped_early and len(runs[0][1].losses) == 3000
    # each halving restarts from the best parameters (exactly: checked right after it)
    assert spy.restarts == [True] * 4
    val = stopped.validation_losses[1]
    # the best check is the one kept, and the returned parameters' loss on fresh simulations is
    # that of a trained guide, more than a nat below the first check's (after 50 steps). Seeds
    # 0-3 on an earlier machine: 0.35 to 0.46 against a first check above 2 (0.25 and 1.89 with
    # the numpy initializer); seed 0 on the 2026-12-05 machine: -0.10 against 1.39
    assert stopped.best_validation_loss == pytest.approx(val.min())
    guide = runs[3][0]
    fresh = guide.simulate(jax.random.PRNGKey(99), 4096, x=Z, y=Z)
    nll = float(jnp.mean(NPE().simulation_losses(guide, stopped.params[guide.param_name], None,
                                                 fresh, x=Z, y=Z)))
    assert nll < 1.0 and val[0] - nll > 1.0, (val[0], nll)


def test_patience_needs_keep_best():
    with pytest.raises(ValueError, match="patience needs keep_best"):
        fit(AutoAmortizedFlow(linear_regression), jax.random.PRNGKey(0), x=Z, y=Z,
            num_simulations=100, batch_size=32, keep_best=False, patience=3, progress_bar=False)


# ---------------------------------------------------------------------------- faults
def other_model(y=None):
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", 15):
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_corrupted_truncated_or_foreign_files_give_clear_errors(trained, tmp_path):
    _, _, path = trained
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "flipped": raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:],
        "empty": b"",
        "npz": b"PK\x03\x04 not a checkpoint",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(content)
        match = "truncated or corrupted" if name in ("truncated", "flipped") else "not a numpyro"
        with pytest.raises(CheckpointError, match=match):
            numpyro_amortized.load(bad, linear_regression)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        numpyro_amortized.load(tmp_path / "missing.ckpt", linear_regression)
    numpyro_amortized.load(path, linear_regression)  # the good file still loads


def test_checkpoint_of_another_model_version_or_architecture(trained, tmp_path):
    _guide, _result, path = trained
    with pytest.raises(CheckpointError, match="another model.*theta"):
        numpyro_amortized.load(path, other_model, y=Z)
    body = read_file(path)
    newer = tmp_path / "newer.ckpt"
    write_file(newer, {**body, "format_version": 99, "package_version": "9.0"})
    with pytest.raises(CheckpointError, match="format 99.*Upgrade"):
        numpyro_amortized.load(newer, linear_regression)
    wide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15),
                             flow=functools.partial(affine_flow, num_layers=2, hidden=(48,)))
    with pytest.raises(CheckpointError, match="another architecture"):
        numpyro_amortized.load(path, linear_regression, guide=wide)
    assert wide.structure is None  # a failed load leaves the guide as it was
    changed = tmp_path / "changed.ckpt"  # as if the network code had changed since
    probe = {**body["probe"], "log_q": body["probe"]["log_q"] + 0.5}
    write_file(changed, {**body, "probe": probe})
    with pytest.raises(CheckpointError, match="does not compute the densities"):
        numpyro_amortized.load(changed, linear_regression)


def test_guides_with_networks_of_ones_own_need_the_guide(tmp_path):
    flow = lambda d, c, **kw: affine_flow(d, c, num_layers=2, hidden=(16,), **kw)
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), flow=flow,
                              num_pilot_simulations=256)
    params = guide.setup(jax.random.PRNGKey(0), x=Z, y=Z)
    numpyro_amortized.save(tmp_path / "own.ckpt", guide, params)
    with pytest.raises(CheckpointError, match="of your own.*guide=guide"):
        numpyro_amortized.load(tmp_path / "own.ckpt", linear_regression)
    again = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), flow=flow)
    _, loaded = numpyro_amortized.load(tmp_path / "own.ckpt", linear_regression, guide=again)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="no training state"):
        fit(again, jax.random.PRNGKey(0), x=Z, y=Z, num_steps=10, progress_bar=False,
            resume=tmp_path / "own.ckpt")


def test_resume_with_other_settings_or_another_guide_is_refused(trained):
    guide, result, path = trained
    settings = {"num_steps": 60, "batch_size": 64, "num_chunks": 3, "validation_size": 64,
                "progress_bar": False, "resume": path, "check": False}
    fresh = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), flow=small_flow())
    with pytest.raises(CheckpointError, match="other settings.*batch_size"):
        fit(fresh, jax.random.PRNGKey(0), x=Z, y=Z, **{**settings, "batch_size": 32})
    with pytest.raises(CheckpointError, match="other settings.*'patience': \\(0, 3\\)"):
        fit(fresh, jax.random.PRNGKey(0), x=Z, y=Z, keep_best=True, patience=3, **settings)
    # the same networks, trained with another weight decay: refused, naming it
    with pytest.raises(CheckpointError, match=r"other settings.*'weight_decay': \(\[0.0\], \[0.5\]"):
        fit(fresh, jax.random.PRNGKey(0), x=Z, y=Z, weight_decay=0.5, **settings)
    other = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), flow=small_flow())
    other.setup(jax.random.PRNGKey(5), x=Z, y=Z)  # set up differently from the saved run
    with pytest.raises(CheckpointError, match="set up for another run"):
        fit(other, jax.random.PRNGKey(0), x=Z, y=Z, **settings)
    # a run saved with another optimizer state (another optimizer, or the per-leaf state of the
    # default optimizer before 2026-11-27): refused, saying so; its parameters still load
    body = read_file(path)
    leaf_by_leaf = {f"{k}['leaf']": v for k, v in body["train"]["opt_state"].items()}
    older = path.parent / "older_optimizer.ckpt"
    write_file(older, {**body, "train": {**body["train"], "opt_state": leaf_by_leaf}})
    with pytest.raises(CheckpointError, match="optimizer state.*optimizer the run was trained"):
        fit(guide, jax.random.PRNGKey(0), x=Z, y=Z, **{**settings, "resume": older})
    numpyro_amortized.load(older, linear_regression, guide=AutoAmortizedFlow(
        linear_regression, set_sizes=(5, 15), flow=small_flow()))
    # the guide object of the saved run resumes (the run is complete: nothing more to train)
    again = fit(guide, jax.random.PRNGKey(0), x=Z, y=Z, **settings)
    np.testing.assert_array_equal(again.losses, result.losses)
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(result.state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(trained, tmp_path, monkeypatch):
    guide, result, _path = trained
    target = tmp_path / "keep.ckpt"
    numpyro_amortized.save(target, guide, result)
    before = target.read_bytes()

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("numpyro_amortized.checkpoint.format.serialization.msgpack_serialize", boom)
    with pytest.raises(OSError, match="disk full"):
        write_file(target, checkpoint_body(guide, result.params))
    assert target.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_checkpoint_from_when_the_decay_was_a_flow_option_loads_and_resumes(trained, tmp_path):
    guide, result, path = trained
    body = read_file(path)

    def with_decay(desc):  # the flow description as such files wrote it
        desc = json.loads(desc) if isinstance(desc, str) else desc
        return {**desc, "kwargs": {**desc["kwargs"], "weight_decay": 0.5}}

    run = json.loads(body["train"]["run"])
    run.pop("weight_decay")
    guide_desc = json.loads(body["guide"])
    old = tmp_path / "old.ckpt"
    write_file(old, {**body, "flow": json.dumps(with_decay(body["flow"])),
                     "guide": json.dumps({**guide_desc, "flow": with_decay(guide_desc["flow"])}),
                     "train": {**body["train"], "run": json.dumps({**run, "flow": with_decay(
                         run["flow"])})}})
    loaded, params = numpyro_amortized.load(old, linear_regression)  # the networks load
    data = {"x": jnp.linspace(-1, 1, 12), "y": jnp.linspace(0, 2, 12)}
    np.testing.assert_array_equal(
        loaded.sample_posterior(jax.random.PRNGKey(0), params, sample_shape=(5,), **data)["beta"],
        guide.sample_posterior(jax.random.PRNGKey(0), result.params, sample_shape=(5,),
                               **data)["beta"])
    settings = {"num_steps": 60, "batch_size": 64, "num_chunks": 3, "validation_size": 64,
                "progress_bar": False, "resume": old, "check": False}
    fresh = lambda: AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), flow=small_flow())
    with pytest.raises(CheckpointError, match=r"weight decay 0.5; resume it with fit\(\.\.\., "
                                              r"weight_decay=0.5\)"):
        fit(fresh(), jax.random.PRNGKey(0), x=Z, y=Z, **settings)
    again = fit(fresh(), jax.random.PRNGKey(0), x=Z, y=Z, weight_decay=0.5, **settings)
    np.testing.assert_array_equal(again.losses, result.losses)  # the run was complete
