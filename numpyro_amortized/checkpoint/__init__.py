"""Checkpoints: a trained guide as one file that is safe to load and checked on loading.

The file is a short header, a SHA-256 checksum and a msgpack body (``flax.serialization``):
arrays, numbers and strings only, so loading a file cannot run code (no pickle). It holds the
network parameters and buffers, the pilot standardization, the guide's configuration, the
model's example arguments (when they are arrays or numbers), a fingerprint of the model's
latent/observed structure, the package version, and, for checkpoints written during
:func:`~numpyro_amortized.fit`, the optimizer state and training history to resume from.

- :func:`save`: write a guide with its parameters (or a whole :class:`~numpyro_amortized.FitResult`).
- :func:`load`: rebuild the guide for a model in a fresh process and return ``(guide, params)``.

Loading checks everything it can and says what is wrong: a truncated or corrupted file, a file
that is not a checkpoint, one written for a model with other latents or observations, by a newer
checkpoint format, or for a network of another shape.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from numpyro_amortized._version import __version__
from numpyro_amortized.checkpoint.config import (
    check_config,
    check_sizes,
    design_arrays,
    guide_config,
    resolve_factory,
    stored_design,
)
from numpyro_amortized.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointError,
    check_writable,
    decode_model_args,
    decode_value,
    encode_model_args,
    flatten_tree,
    read_file,
    unflatten_tree,
    write_file,
)
from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.data import DataBatch, Simulations
from numpyro_amortized.guide import AutoAmortizedFlow
from numpyro_amortized.networks.factories import current_description
from numpyro_amortized.simulation import inspect_model
from numpyro_amortized.summary_range import SummaryRange

__all__ = ["CheckpointError", "check_writable", "checkpoint_body", "flatten_tree", "load",
           "probe_simulations", "read_file", "restore_guide", "save", "train_record",
           "unflatten_tree", "write_file"]

# ---------------------------------------------------------------------------- public API
def checkpoint_body(guide, params, *, train=None, probe=None) -> dict:
    """The contents of a checkpoint (see :func:`save`), through the guide's public state.

    :param probe: :func:`probe_simulations` of the guide (computed here when not given).
    """
    params = guide.network_params(params)
    state = guide.state_dict()
    model_args, why = encode_model_args(*guide.model_args)
    structure = guide.structure
    stats = state["stats"]
    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "jax_version": jax.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": state["fingerprint"],
        "structure": {
            "latents": ", ".join(f"{s.name}{list(s.shape)}" for s in structure.latents),
            "observed": ", ".join(f"{s.name}{list(s.shape)}" for s in structure.observed),
        },
        "guide": json.dumps(guide_config(guide)),
        "flow": json.dumps(state["flow"]),
        **({"local_flow": json.dumps(state["local_flow"])} if state["local_flow"] else {}),
        "model_args": model_args if model_args is not None else {},
        "model_args_missing": why or "",
        "stats": {
            "u_loc": stats["u_loc"], "u_scale": stats["u_scale"],
            "data": {str(i): {"kind": "none"} if x is None else {"kind": "array", "value": x}
                     for i, x in enumerate(stats["data"])},
            **({"group": dict(zip(("loc", "scale"), stats["group"]))} if "group" in stats else {}),
            **({"log_counts": True} if stats.get("log_counts") else {}),
        },
        "setup_key": state["setup_key"],
        "probe": _probe(guide, params, probe or probe_simulations(guide)),
        "params": flatten_tree(params),
        "buffers": flatten_tree(state["buffers"]),
        **({"train": train} if train is not None else {}),
        **({"summary_range": guide.summary_range.to_dict()}
           if guide.summary_range is not None else {}),
        **({"design": design_arrays(guide)} if design_arrays(guide) else {}),
    }


def probe_simulations(guide, n=16):
    """A few simulations whose guide densities a checkpoint stores: loading recomputes them,
    so a guide that does not compute what was saved (other network code) is caught."""
    args, kwargs = guide.model_args
    sims = jit_once(lambda k: guide.simulate(k, n, *args, **kwargs))(jax.random.PRNGKey(12345))
    return sims, jit_once(guide.log_prob_simulations)


def _probe(guide, params, probe):
    sims, log_prob = probe
    log_q = log_prob(params, sims)
    data = {name: {"kind": "none"} if x is None else {"kind": "array", "value": np.asarray(x)}
            for name, x in zip(DataBatch._fields, sims.data, strict=True)}
    return {"u": np.asarray(sims.u), "log_det": np.asarray(sims.log_det), "data": data,
            "valid": np.asarray(sims.valid), "log_q": np.asarray(log_q)}


def _version_of(path):
    try:
        return read_file(path)["package_version"]
    except CheckpointError:
        return "?"


def _check_probe(guide, params, probe, path):
    data = DataBatch(*(decode_value(probe["data"][k]) if k in probe["data"] else None
                       for k in DataBatch._fields))
    sims = Simulations({}, jax.numpy.asarray(probe["u"]), jax.numpy.asarray(probe["log_det"]), {},
                       data, None, jax.numpy.asarray(probe["valid"]))
    got = np.asarray(jit_once(guide.log_prob_simulations)(params, sims))  # one program
    want = np.asarray(probe["log_q"])
    ok = np.asarray(probe["valid"], bool)
    err = float(np.max(np.abs(got[ok] - want[ok]) / (1.0 + np.abs(want[ok])), initial=0.0))
    if not err < 1e-4:
        raise CheckpointError(
            f"{path}: the loaded guide does not compute the densities it was saved with (relative "
            f"difference {err:.3g}): its networks differ from the ones that wrote the checkpoint "
            f"(another network code or version). It was written by numpyro_amortized "
            f"{_version_of(path)}; load it with that version, or pass the guide it was trained "
            "with as guide=."
        )


def train_record(result, best_params=None) -> dict:
    """What a checkpoint keeps of a training run (a :class:`~numpyro_amortized.FitResult`).

    :param best_params: the network parameters of the best validation step as trained (a flow
        ensemble's mixture weights as in training, not the fitted ones of ``result.params``);
        default: those of ``result.params``.
    """
    state = jax.tree.map(_host_array, result.state)
    run = result.config or {}
    if best_params is None:
        best_params = next(iter(result.params.values()))
    return {
        "opt_state": flatten_tree(state.opt_state),
        "final_params": flatten_tree(state.params),
        "best_params": flatten_tree(jax.tree.map(_host_array, best_params)),
        "rng_key": np.asarray(state.rng_key),
        "step": int(state.step), "num_skipped": int(state.num_skipped),
        "num_dropped": int(state.num_dropped),
        "losses": np.asarray(result.losses, np.float32),
        "val_steps": np.asarray(result.validation_losses[0], np.int64),
        "val_losses": np.asarray(result.validation_losses[1], np.float32),
        "best_step": int(result.best_step),
        "best_validation_loss": float(result.best_validation_loss),
        "train_time": float(result.train_time),
        "run": json.dumps(run),
    }


def _host_array(x):
    """A replicated array as numpy, also when its devices span several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


@runtime_checkable
class TrainingRun(Protocol):
    """What :func:`save` keeps of a training run (a :class:`~numpyro_amortized.FitResult`)."""

    params: dict
    state: Any
    losses: Any
    validation_losses: tuple


def save(path, guide, params):
    """Save a trained guide to ``path`` (one file; no pickle).

    :param guide: a set-up :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters: ``fit(...).params``, ``svi.get_params(state)``, or a
        :class:`~numpyro_amortized.FitResult` (then its optimizer state and history are saved
        too, so training can be resumed with ``fit(..., resume=path)``).

    **Example**::

        result = fit(guide, jax.random.PRNGKey(0), x=x, y=y)
        numpyro_amortized.save("regression.ckpt", guide, result)
        # later, in another process:
        guide, params = numpyro_amortized.load("regression.ckpt", model)
    """
    train = None
    if isinstance(params, TrainingRun):  # a FitResult: keep its run, to resume it
        train = train_record(params)
        params = params.params
    write_file(path, checkpoint_body(guide, params, train=train))


def load(path, model, *args, guide=None, **kwargs):
    """Load a guide saved with :func:`save` (or by ``fit(..., checkpoint=...)``).

    :param model: the NumPyro model the guide was trained for (code is never read from the
        file; its structure is checked against the checkpoint's fingerprint).
    :param args: the model's example arguments; by default the ones stored in the checkpoint.
    :param guide: a guide built as for training (needed when it used a summary network or flow
        of your own; the package's own are rebuilt from the stored configuration).
    :return: ``(guide, params)``, ready for ``guide.sample_posterior(key, params, ...)``.
    """
    body = read_file(path)
    config = json.loads(body["guide"])
    if not args and not kwargs:
        if not body["model_args"]:
            raise CheckpointError(
                f"{path}: the checkpoint has no example model arguments "
                f"({body['model_args_missing']}); pass them: load(path, model, *args, **kwargs)."
            )
        args, kwargs = decode_model_args(body["model_args"])
    if guide is None:
        nets = {}
        for role in ("summary_net", "flow"):
            if config[role] is None:
                raise CheckpointError(
                    f"{path}: the guide was trained with a {role} of your own; build the guide "
                    f"as for training and pass it: load(path, model, guide=guide)."
                )
            nets[role] = resolve_factory(config[role], role, path)
        set_sizes = config["set_sizes"]
        guide = AutoAmortizedFlow(
            model, summary_net=nets["summary_net"], flow=nets["flow"],
            observed=config["observed"], data_plate=config["data_plate"],
            set_sizes=None if set_sizes is None else tuple(set_sizes),
            time_series=bool(config.get("time_series", False)), design=stored_design(body, path),
            num_pilot_simulations=config["num_pilot_simulations"], prefix=config["prefix"],
            hierarchical=config.get("hierarchical", "auto"),
            num_groups=None if config.get("num_groups") is None else tuple(config["num_groups"]),
        )
    elif guide.is_setup:
        raise CheckpointError("load(guide=...) needs a guide that has not been set up yet.")
    params = restore_guide(guide, body, path, args, kwargs)
    return guide, {guide.param_name: params}


def _state_of(body):
    stats_data = body["stats"]["data"]
    return {
        "setup_key": np.asarray(body["setup_key"], np.uint32),
        "stats": {
            "u_loc": np.asarray(body["stats"]["u_loc"]),
            "u_scale": np.asarray(body["stats"]["u_scale"]),
            "data": tuple(decode_value(stats_data[str(i)]) for i in range(len(stats_data))),
            **({"group": tuple(np.asarray(body["stats"]["group"][k]) for k in ("loc", "scale"))}
               if "group" in body["stats"] else {}),
            **({"log_counts": True} if body["stats"].get("log_counts") else {}),  # see raw_counts
        },
        "flow": current_description(json.loads(body["flow"])),
        "local_flow": json.loads(body["local_flow"]) if "local_flow" in body else None,
    }


def _summary_range(body, guide, params, path):
    """The checkpoint's summary range (``None`` when it has none), checked against the
    summary network's output size."""
    if "summary_range" not in body:
        return None
    try:
        dim = guide.posterior(params).summary_net.summary_dim
        return SummaryRange.from_dict(body["summary_range"], dim)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: the checkpoint's summary range does not fit the "
                              "guide's summary network (a damaged or forged file).") from None


def restore_guide(guide, body, path, args, kwargs):
    """Set ``guide`` up for ``args`` from the checkpoint ``body`` (no pilot simulations) and
    return its parameters, after checking the model's structure and the networks' shapes. A
    guide already set up must be the one of the checkpoint (same model, key, standardization
    and flow): it is checked, not rebuilt."""
    check_sizes(body, path)
    structure = inspect_model(guide.model, *args, observed=guide.observed,
                              data_plate=guide.data_plate, time_series=guide.time_series,
                              **kwargs)
    if structure.fingerprint() != body["fingerprint"]:
        here = ", ".join(f"{s.name}{list(s.shape)}" for s in structure.latents)
        obs = ", ".join(f"{s.name}{list(s.shape)}" for s in structure.observed)
        raise CheckpointError(
            f"{path}: the checkpoint was written for another model: it has latents "
            f"[{body['structure']['latents']}] and observed [{body['structure']['observed']}], "
            f"this model has latents [{here}] and observed [{obs}] (names, shapes and supports "
            "must match). Load it with the model it was trained for."
        )
    check_config(guide, body, path)
    state = _state_of(body)
    if guide.is_setup:
        here = guide.state_dict()
        buffers = unflatten_tree(here["buffers"], body["buffers"], "buffers", path)
        same = (here["fingerprint"] == body["fingerprint"]
                and np.array_equal(here["setup_key"], state["setup_key"])
                and json.loads(json.dumps(here["flow"])) == state["flow"]
                and all(np.array_equal(a, b) for a, b in zip(
                    jax.tree.leaves(here["buffers"]), jax.tree.leaves(buffers), strict=True)))
        if not same:
            raise CheckpointError(
                f"{path}: this guide was set up for another run (other model, key, flow or "
                "standardization) than the checkpoint's. Resume with a new guide built as for "
                "that run, or with the guide object that ran it."
            )
        params = unflatten_tree(guide.init_params, body["params"], "parameters", path)
        guide.summary_range = _summary_range(body, guide, params, path)
        return params
    try:
        guide.initialize(None, args, kwargs, state={**state, "buffers": None})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        here = guide.state_dict()["buffers"]
        buffers = unflatten_tree(here, body["buffers"], "buffers", path)
        guide.load_buffers(buffers)
        params = unflatten_tree(guide.init_params, body["params"], "parameters", path)
        _check_probe(guide, params, body["probe"], path)
        guide.summary_range = _summary_range(body, guide, params, path)
    except BaseException:
        guide.reset()  # leave the guide as it was: not set up
        raise
    guide.init_params = params
    return params
