"""The package's shape: one-way imports, a light top level, no mutation of what users pass in,
and a clear error for every argument that would otherwise train or sample on nonsense."""

import ast
import copy
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_amortized import NPE, AutoAmortizedFlow, fit
from numpyro_amortized.networks import affine_flow

# these tests train guides for a few steps to exercise the API: the held-out check rightly says
# that their raw draws are off
pytestmark = pytest.mark.filterwarnings("ignore::numpyro_amortized.train.GuideCheckWarning")

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "numpyro_amortized"
KEY = jax.random.PRNGKey(0)
Y = jnp.zeros(10)


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """Module -> the package's modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_in_an_import_circle():
    graph = import_graph()
    assert len(graph) > 30 and "numpyro_amortized.train.loop" in graph
    assert cycles(graph) == []
    # the check finds a circle when there is one
    broken = {**graph, "numpyro_amortized.guide": graph["numpyro_amortized.guide"]
              | {"numpyro_amortized.train.loop"}}
    assert cycles(broken)


def module_level_caches(path):
    """Names of functools caches (``lru_cache``, ``cache``) used anywhere in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("lru_cache", "cache"):
            found.append(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module == "functools":
            found += [a.name for a in node.names if a.name in ("lru_cache", "cache")]
    return found


def test_no_module_level_cache_of_compiled_programs(tmp_path):
    from numpyro_amortized.programs import Programs

    assert {p.name: module_level_caches(p) for p in PACKAGE.rglob("*.py")
            if module_level_caches(p)} == {}
    cached = tmp_path / "cached.py"
    cached.write_text("import functools\n@functools.lru_cache(8)\ndef f(x):\n    return x\n")
    assert module_level_caches(cached) == ["lru_cache"]  # the check sees one
    # the store that owners use instead is bounded, least recently used out first
    programs, built = Programs(2), []
    for key in ("a", "b", "a", "c"):
        programs.get(key, lambda k=key: built.append(k) or k)
    assert built == ["a", "b", "c"] and "a" in programs and "b" not in programs


def test_import_leaves_plotting_tables_arviz_and_sklearn_out():
    code = ("import sys, numpyro_amortized as na; heavy = ('matplotlib', 'pandas', 'arviz', "
            "'sklearn'); print([m for m in heavy if m in sys.modules]); na.c2st; "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]  # loaded when asked for, not before


def normal_mean(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", 10):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def small_flow(d, c, **kw):
    return affine_flow(d, c, num_layers=2, hidden=(8,), **kw)


def test_fit_leaves_the_guides_settings_unchanged():
    guide = AutoAmortizedFlow(normal_mean, num_pilot_simulations=256)
    settings = {k: copy.copy(v) for k, v in vars(guide).items()}
    result = fit(guide, KEY, y=Y, num_steps=10, num_simulations=300, batch_size=32,
                 progress_bar=False)
    for name, before in settings.items():
        if name in ("structure", "init_params", "programs", "summary_range") or \
                name.startswith("_"):
            continue  # what set-up and training fill in
        assert getattr(guide, name) == before, name
    assert guide.flow is None and result.config["flow"]["name"] == "ensemble_flow"


@pytest.fixture(scope="module")
def trained():
    guide = AutoAmortizedFlow(normal_mean, flow=small_flow, num_pilot_simulations=256)
    return guide, fit(guide, KEY, y=Y, num_steps=10, batch_size=32, progress_bar=False)


@pytest.mark.parametrize("bad, match", [
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"num_steps": 0}, "num_steps=0"),
    ({"num_steps": -5}, "num_steps=-5"),
    ({"checkpoint_every": -1}, "checkpoint_every=-1"),
    ({"checkpoint_every": 0}, "checkpoint_every=0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"num_simulations": -100}, "num_simulations=-100"),
    ({"num_simulations": 0}, "num_simulations=0"),
    ({"num_simulations": 100, "batch_size": 256}, "larger than the 90 training simulations"),
    ({"validation_size": 0}, "validation_size=0"),
    ({"num_chunks": 0}, "num_chunks=0"),
    ({"patience": -1}, "patience=-1"),
    ({"batch_size": 64, "loss": NPE(batch_size=128)}, r"batch_size=64 and NPE\(batch_size=128\)"),
])
def test_nonsense_settings_are_refused_before_training(bad, match):
    guide = AutoAmortizedFlow(normal_mean, flow=small_flow, num_pilot_simulations=256)
    with pytest.raises(ValueError, match=match):
        fit(guide, KEY, y=Y, **{"num_steps": 10, "progress_bar": False, **bad})
    assert not guide.is_setup  # refused before any work


def test_the_losss_batch_size_is_the_runs():
    guide = AutoAmortizedFlow(normal_mean, flow=small_flow, num_pilot_simulations=256)
    result = fit(guide, KEY, y=Y, num_steps=10, loss=NPE(batch_size=48), progress_bar=False)
    assert result.config["batch_size"] == 48 and result.num_simulations == 480
    with pytest.raises(ValueError, match="batch_size=0"):
        NPE(batch_size=0)


def test_parameters_that_do_not_fit_or_are_not_finite_are_refused(trained):
    guide, result = trained
    params = result.params[guide.param_name]
    partial = {k: v for k, v in params.items() if k != "flow"}
    with pytest.raises(ValueError, match="do not fit this guide's networks.*missing"):
        guide.sample_posterior(KEY, partial, y=Y, sample_shape=(10,))
    with pytest.raises(ValueError, match="do not fit this guide's networks.*missing"):
        guide.sample_posterior(KEY, {guide.param_name: partial}, y=Y, sample_shape=(10,))
    nan = jax.tree.map(lambda x: x * jnp.nan, params)
    with pytest.raises(ValueError, match="NaN or infinity"):
        guide.sample_posterior(KEY, nan, y=Y, sample_shape=(10,))
    y = jax.random.normal(KEY, (10,))  # data like the model's: no warning either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draws = guide.sample_posterior(KEY, result.params, y=y, sample_shape=(10,))
    assert np.all(np.isfinite(draws["mu"]))


def test_a_simulator_that_gives_nan_for_some_draws_is_counted_not_refused():
    # the set-up trace meets a draw for which the likelihood has a NaN scale, with NumPyro's
    # validation on: the structure does not depend on that draw, and fit drops and counts such
    # simulations (at most 1% of the prior here) instead of failing at set-up
    first = []

    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        centre = first[0] if first else mu  # a window around the first traced draw
        bad = jnp.abs(mu - centre) < 0.0125
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(mu, jnp.where(bad, jnp.nan, 1.0)), obs=y)

    with numpyro.handlers.block(), numpyro.validation_enabled(False):
        tr = numpyro.handlers.trace(numpyro.handlers.seed(model, KEY)).get_trace(y=Y)
    first.append(float(tr["mu"]["value"]))
    guide = AutoAmortizedFlow(model, flow=small_flow, num_pilot_simulations=2048)
    with numpyro.validation_enabled(True):
        with pytest.raises(ValueError, match="scale"):  # what the set-up trace used to meet
            numpyro.handlers.seed(model, KEY)(y=Y)
        result = fit(guide, KEY, y=Y, num_steps=20, batch_size=256, progress_bar=False)
    share = result.num_dropped / (20 * 256)
    assert 0 < share < 0.03, share  # dropped and counted
    assert np.all(np.isfinite(result.losses))


def test_batch_inputs_are_checked(trained):
    guide, result = trained
    Y3 = jax.random.normal(KEY, (3, 12))  # data like the model's
    draws = guide.sample_posterior_batch(KEY, result.params,
                                         {"y": np.asarray(Y3[:, :10]).tolist()},
                                         sample_shape=(5,))  # a Python list works as in fit
    assert draws["mu"].shape == (3, 5)
    with pytest.raises(ValueError, match=r"entries \['z'\] that are not observed sites"):
        guide.sample_posterior_batch(KEY, result.params, {"y": Y3[:, :10], "z": Y3})
    with pytest.raises(ValueError, match="holds no datasets"):
        guide.sample_posterior_batch(KEY, result.params, {"y": jnp.zeros((0, 10))})
    for bad in ([-1, 5, 5], [5, 5, 11], [5, 5], [1.5, 2.0, 3.0]):
        with pytest.raises(ValueError, match="num_obs: need 3 integers between 1 and"):
            guide.sample_posterior_batch(KEY, result.params, {"y": Y3[:, :10]}, num_obs=bad)
    with warnings.catch_warnings(record=True) as caught:  # may also be outside the summaries'
        warnings.simplefilter("always")
        guide.sample_posterior_batch(KEY, result.params, {"y": Y3})
    assert any(re.search("has 12 observations.*trained on 10 to 10", str(w.message))
               for w in caught), [str(w.message) for w in caught]
    for bad in ([1.5], [0.0, 0.5], 0.5, []):
        with pytest.raises(ValueError, match="levels in \\(0, 1\\)"):
            guide.quantiles(result.params, bad, y=Y3[0, :10])
    q = guide.quantiles(result.params, [0.05, 0.95], y=Y3[0, :10])
    assert q["mu"].shape == (2,) and q["mu"][0] < q["mu"][1]


def test_checkpoint_paths_are_checked_before_training_and_saves_never_lose_a_run(
        tmp_path, monkeypatch):
    import os

    from numpyro_amortized import CheckpointError, load, save
    from numpyro_amortized.train import checkpointing

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    guide = AutoAmortizedFlow(normal_mean, flow=small_flow, num_pilot_simulations=256)
    settings = {"num_steps": 20, "batch_size": 32, "num_chunks": 2, "progress_bar": False}
    with pytest.raises(CheckpointError, match="cannot be written there"):
        fit(guide, KEY, y=Y, checkpoint=blocker / "run.ckpt", **settings)
    assert not guide.is_setup  # refused before set-up, simulation and compilation
    path = tmp_path / "run.ckpt"
    first = fit(guide, KEY, y=Y, checkpoint=path, **settings)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())  # not always 0600
    with pytest.raises(CheckpointError, match="already there.*resume="):
        fit(AutoAmortizedFlow(normal_mean, flow=small_flow), KEY, y=Y, checkpoint=path,
            **settings)
    load(path, normal_mean, guide=AutoAmortizedFlow(normal_mean, flow=small_flow))  # intact

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_file", full_disk)
    with pytest.warns(UserWarning, match="Could not save the checkpoint.*No space left"):
        again = fit(AutoAmortizedFlow(normal_mean, flow=small_flow, num_pilot_simulations=256),
                    KEY, y=Y,
                    checkpoint=tmp_path / "other.ckpt", **settings)
    assert len(again.losses) == 20  # the run finished and its result came back
    np.testing.assert_array_equal(again.losses, first.losses)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load(tmp_path, normal_mean)  # a folder
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load(fifo, normal_mean)  # refused at once, not read forever
    save(tmp_path / "sub" / "saved.ckpt", guide, first.params)
    assert (tmp_path / "sub" / "saved.ckpt").exists()


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_factors_are_refused_and_the_discrete_advice_works():
    from numpyro_amortized import inspect_model

    def with_factor(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("penalty", -mu**2)
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"numpyro.factor term\(s\) \['penalty'\]"):
        inspect_model(with_factor, y=Y)

    def discrete(y=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    with pytest.raises(ValueError, match="discrete support.*MixtureSameFamily"):
        inspect_model(discrete, y=Y)

    def marginalized(y=None):  # what the message advises: it sets up and samples
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        mix = dist.MixtureSameFamily(dist.Categorical(jnp.array([0.5, 0.5])),
                                     dist.Normal(jnp.stack([mu, -mu]), 1.0))
        with numpyro.plate("N", 10):
            numpyro.sample("y", mix, obs=y)

    guide = AutoAmortizedFlow(marginalized, flow=small_flow, num_pilot_simulations=256)
    params = guide.setup(KEY, y=Y)
    assert guide.sample_posterior(KEY, params, y=Y, sample_shape=(4,))["mu"].shape == (4,)


def test_forged_network_names_are_refused(tmp_path):
    import json

    from numpyro_amortized import CheckpointError, load, save
    from numpyro_amortized.checkpoint import read_file, write_file
    from numpyro_amortized.networks import spline_flow

    guide = AutoAmortizedFlow(normal_mean, flow=spline_flow, num_pilot_simulations=256)
    params = guide.setup(KEY, y=Y)
    save(tmp_path / "a.ckpt", guide, params)
    body = read_file(tmp_path / "a.ckpt")
    for name in ("__class__", "AutoAmortizedFlow", ["spline_flow"], 7):
        config = dict(json.loads(body["guide"]), flow={"name": name, "kwargs": {}})
        write_file(tmp_path / "forged.ckpt", {**body, "guide": json.dumps(config)})
        with pytest.raises(CheckpointError, match="not one of numpyro_amortized.networks"):
            load(tmp_path / "forged.ckpt", normal_mean)
    write_file(tmp_path / "forged.ckpt", {**body, "format_version": "two"})
    with pytest.raises(CheckpointError, match="checkpoint format -1"):
        load(tmp_path / "forged.ckpt", normal_mean)
    write_file(tmp_path / "old.ckpt", {**body, "format_version": 1})
    with pytest.raises(CheckpointError, match="format 1.*reads format 3 only"):
        load(tmp_path / "old.ckpt", normal_mean)
    loaded, _ = load(tmp_path / "a.ckpt", normal_mean)
    assert loaded.flow_factory is spline_flow


def test_improper_priors_and_untrained_guides_get_clear_errors():
    from numpyro.distributions import constraints

    from numpyro_amortized import inspect_model
    from numpyro_amortized.diagnostics import diagnose

    def improper(y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))
        with numpyro.plate("N", 10):
            numpyro.sample("y", dist.Normal(a + b, 1.0), obs=y)

    with pytest.raises(ValueError, match="Sample site 'b' cannot be drawn.*ImproperUniform.*"
                                         "proper prior"):
        inspect_model(improper, y=Y)
    untrained = AutoAmortizedFlow(normal_mean)
    with pytest.raises(RuntimeError, match="has not been set up.*fit"):
        diagnose(untrained, {}, KEY, y=Y, progress_bar=False)


@pytest.mark.slow
def test_many_datasets_are_sampled_in_bounded_memory():
    # 4,000 datasets x 1,000 draws (46 MB of output): drawn all at once, the flow's
    # intermediates raised the peak RSS by 3.5 GB; in chunks of about 2^18 draws, by ~0.3 GB
    script = pathlib.Path(__file__).parent / "scripts" / "batch_memory.py"
    out = subprocess.run([sys.executable, str(script), "4000"], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    growth, output = map(float, out.split())
    assert output > 25 and growth < 1000, (growth, output)
