"""Periodic checkpoints of a run, and resuming one, on top of :mod:`numpyro_amortized.checkpoint`."""

from __future__ import annotations

import json
import os
import warnings

import jax.numpy as jnp
import numpy as np

from numpyro_amortized.checkpoint import (
    CheckpointError,
    check_writable,
    checkpoint_body,
    probe_simulations,
    read_file,
    restore_guide,
    train_record,
    unflatten_tree,
    write_file,
)
from numpyro_amortized.train.callbacks import Callback
from numpyro_amortized.train.sharding import host_tree
from numpyro_amortized.train.step import TrainState

__all__ = ["Checkpointer", "resume_run"]


class Checkpointer(Callback):
    """Save the run to ``path`` every ``every`` steps, at the end and on an interruption.

    The folder is checked before training starts. A save that fails during training (a full
    disk, say) warns and training goes on; the finished result is always returned.
    """

    def __init__(self, path, guide, every, make_result, is_writer=True, resuming=False):
        self.path, self.guide, self.every = os.fspath(path), guide, int(every)
        self.make_result, self.is_writer = make_result, is_writer
        self.probe = None  # simulated and compiled once per run
        self.last_saved = None  # the step of the last checkpoint written
        if is_writer:
            check_writable(self.path)
            if os.path.exists(self.path) and not resuming:
                raise CheckpointError(
                    f"{self.path}: a checkpoint is already there; this run would overwrite it. "
                    f"Continue that run with fit(..., resume={self.path!r}), or remove the file "
                    "or choose another path for a new run.")

    def save(self, run):
        # every process computes the result (it may run programs over all devices, which every
        # process must join); only the writer simulates the probe and writes
        result = self.make_result(run)
        if not self.is_writer:
            return
        if self.probe is None:
            self.probe = probe_simulations(self.guide)
        params = host_tree(result.params[self.guide.param_name])
        try:
            record = train_record(result, best_params=run.best_params)
            write_file(self.path, checkpoint_body(self.guide, params, train=record,
                                                  probe=self.probe))
            self.last_saved = run.step
        except OSError as e:
            warnings.warn(f"Could not save the checkpoint {self.path} at step {run.step} ({e}); "
                          "training goes on, and fit returns its result.", UserWarning,
                          stacklevel=3)

    def on_chunk(self, run, chunk):
        if run.step % self.every == 0 or run.step == run.num_steps or run.stop:
            self.save(run)

    def on_end(self, run):
        if run.interrupted:
            self.save(run)


def resume_run(path, guide, optimizer, args, kwargs, run_config):
    """The :class:`TrainState` and the history stored in checkpoint ``path``, for this run."""
    body = read_file(path)
    train = body.get("train")
    if not train:
        raise CheckpointError(f"{path}: this checkpoint holds a trained guide but no training "
                              "state (it was written by save(path, guide, params)); it cannot be "
                              "resumed. Save the FitResult, or use fit(..., checkpoint=path).")
    saved = json.loads(train["run"])
    diff = {k: (saved[k], v) for k, v in run_config.items()
            if k in saved and k not in ("plateau", "flow") and saved[k] != v}
    if diff:
        raise CheckpointError(
            f"{path}: the checkpoint is of a run with other settings {diff} (saved, now); resume "
            "with the same rng_key, num_steps, batch_size, num_simulations, validation_size, "
            "num_chunks, keep_best, patience and ema_decay to continue that run."
        )
    flow = saved.get("flow")  # a description, or the repr of a factory of the user's own
    legacy = ((flow.get("kwargs") or {}) if isinstance(flow, dict) else {}).get("weight_decay",
                                                                               0.0)
    if "weight_decay" not in saved and "weight_decay" in run_config and \
            [float(w) for w in np.atleast_1d(legacy)] != run_config["weight_decay"]:
        raise CheckpointError(  # written when the decay was an option of the flow
            f"{path}: the run was trained with weight decay {legacy}; resume it with "
            f"fit(..., weight_decay={legacy!r}).")
    best = restore_guide(guide, body, path, args, kwargs)
    params = unflatten_tree(best, train["final_params"], "parameters", path)
    best = unflatten_tree(best, train["best_params"], "parameters", path)
    opt_state = unflatten_tree(optimizer.init(params), train["opt_state"], "optimizer state",
                               path, hint="Resume with the optimizer the run was trained with.")
    as_i32 = lambda v: jnp.asarray(int(v), jnp.int32)
    state = TrainState(params, opt_state, jnp.asarray(train["rng_key"]), as_i32(train["step"]),
                       as_i32(train["num_skipped"]), as_i32(train["num_dropped"]))
    history = {
        "losses": list(np.asarray(train["losses"]).reshape(1, -1)),
        "val_steps": [int(v) for v in np.asarray(train["val_steps"]).reshape(-1)],
        "val_losses": [float(v) for v in np.asarray(train["val_losses"]).reshape(-1)],
        "best": (int(train["best_step"]), float(train["best_validation_loss"]), best),
        "train_time": float(train["train_time"]),
        "plateau": saved.get("plateau", {}),
    }
    return state, history

