"""``fit``: the training loop, a short loop over a data source, a compiled chunk of steps and
callbacks (see :mod:`numpyro_amortized.train.callbacks`)."""

from __future__ import annotations

import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from numpyro_amortized.checkpoint import CheckpointError, read_file, restore_guide
from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.losses import NPE, masked_mean, resolve_batch_size
from numpyro_amortized.networks import describe_factory
from numpyro_amortized.programs import simulate_in_blocks, take_rows
from numpyro_amortized.samplers import looping_sites
from numpyro_amortized.train.callbacks import Chunk, Converge, Plateau, ProgressBar, Run, TimeBudget
from numpyro_amortized.train.check import (
    FAILED_SHARE,
    GuideCheckWarning,
    PreparedCheck,
    data_check,
    held_out_check,
    held_out_member_log_probs,
)
from numpyro_amortized.train.checkpointing import Checkpointer, resume_run
from numpyro_amortized.train.optim import (
    average_params,
    averaged,
    check_ema_decay,
    default_optimizer,
    fixed_budget_weight_decay,
    flow_weight_decay,
)
from numpyro_amortized.train.result import FitResult
from numpyro_amortized.train.settings import resolve_settings
from numpyro_amortized.train.sharding import data_mesh, host_tree, host_value, replicate
from numpyro_amortized.train.step import trainer
from numpyro_amortized.train.watchdog import StallWatch, TrainingStalled, stall_message

__all__ = ["FitResult", "fit"]

DEFAULT_MEMBERS = ("spline", "affine", "spline", "affine")  # ensemble_flow's default members
CHECK_KEY = np.array([0, 1], np.uint32)  # jax.random.PRNGKey(1), without a computation


def fit(guide, rng_key, *args, num_steps=None, batch_size=None, loss=None, optimizer=None,
        learning_rate=2e-3, num_simulations=None, validation_size=1024, progress_bar=True,
        num_chunks=None, devices=None, keep_best=None, patience=None, checkpoint=None,
        checkpoint_every=None, resume=None, callbacks=(), stall_timeout=None, check=True,
        weight_decay=None, time_budget=None, ema_decay=None, **kwargs) -> FitResult:
    """Train an amortized guide on simulations from its model.

    :param guide: an :class:`~numpyro_amortized.AutoAmortizedFlow`. It is set up here if it is
        not yet; its own attributes (``flow``, ``summary_net``, ...) are never changed. A guide
        built without ``flow`` gets :func:`~numpyro_amortized.default_flow` for how it is
        trained (one spline flow online; a flow ensemble on a fixed budget), reported in
        ``result.config["flow"]`` and ``guide.flow_factory``.
    :param rng_key: a PRNG key.
    :param args: the model's arguments for one dataset (observed sites with values, of the
        largest size); ``kwargs`` likewise. Covariates passed here are used as they are for
        every simulation, and the summary network reads them (see the guide's ``model``).
    :param num_steps: optimizer steps. Default online: as long as the validation loss improves,
        then a decay of the learning rate over half as many steps again, at most 20,000
        steps (:class:`~numpyro_amortized.train.Converge`; a given ``num_steps`` trains that
        many steps on a cosine schedule). With a fixed budget: 30 passes over the training
        simulations, at least 5,000 and at most 20,000 steps. With ``time_budget``: as many
        as the time allows (``num_steps``, if given, is a cap).
    :param time_budget: seconds: train online for as long as this call may take, set-up and
        compilation included (:class:`~numpyro_amortized.train.TimeBudget`: a cosine decay of
        the learning rate over the time left, validation every 50 steps). The check after
        training (``check``) comes on top. How many steps that is depends on the machine
        and its load, so a run is not reproducible step for step.
    :param batch_size: simulations per step (the global batch, over all devices). Default:
        the loss's ``batch_size`` if it has one, else 256.
    :param loss: :class:`~numpyro_amortized.NPE` (default) or
        :class:`~numpyro_amortized.AmortizedELBO`.
    :param optimizer: any optax transformation (default
        :func:`~numpyro_amortized.train.default_optimizer` from ``learning_rate`` and
        ``weight_decay``).
    :param weight_decay: decoupled weight decay of the flow's parameters under the default
        optimizer: a number, or one per member of a flow ensemble. Default: for the default
        fixed-budget ensemble (a spline and an affine flow, each twice),
        :func:`~numpyro_amortized.train.fixed_budget_weight_decay` (the second of each kind
        decayed, less for larger banks); 0 otherwise. Reported in ``result.config``.
    :param ema_decay: validate, keep and return an exponential moving average of the
        parameters over about the last ``1 / (1 - ema_decay)`` steps
        (:func:`~numpyro_amortized.train.averaged`) instead of each step's own; ``None``
        (default): no average. ``result.state`` holds the last step's parameters and the average.
    :param num_simulations: ``None`` (default) simulates fresh data every step, inside the jitted
        step (online); an integer fixes a simulation budget: that many simulations are drawn once
        and minibatches are sampled from them, 10% (at most ``validation_size``) held out.
    :param validation_size: held-out simulations for the validation loss (online mode).
    :param progress_bar: show a tqdm bar with the loss (on process 0 only).
    :param num_chunks: how often to report progress and validate. Default: 100 times over the
        run, at most every 10 steps (every 100 steps when the length follows the loss).
    :param devices: devices to train on, data parallel: ``None`` for all (all processes' under
        ``jax.distributed``), an int for the first ``n``, or a list.
    :param keep_best: return the parameters with the lowest validation loss instead of the last
        ones (``result.state`` is always the last). Default: on with a fixed budget, off online.
    :param patience: validation checks without improvement after which training goes back to
        the best parameters and halves the learning rate (:class:`~numpyro_amortized.train.Plateau`);
        after the fourth halving the next plateau ends training. Default: 10 with a fixed budget,
        off (0) online.
    :param checkpoint: a file to save the run to (process 0 writes): every
        ``checkpoint_every`` steps (default: a tenth of the run), at the end, and when training
        is interrupted. Load it with :func:`~numpyro_amortized.load`.
    :param resume: a checkpoint written by ``fit(..., checkpoint=...)``: continue that run
        (same ``rng_key`` and settings) to the same result as an uninterrupted run.
    :param callbacks: more :class:`~numpyro_amortized.train.Callback` objects, called after the
        built-in ones after every chunk.
    :param stall_timeout: seconds a chunk of steps may take before training is declared stalled
        (:class:`~numpyro_amortized.train.TrainingStalled`). Default: ten minutes for the first
        chunk, then 50 times the slowest chunk so far, at least a minute.
    :param check: at the end, weigh the guide's draws on 32 held-out simulations by the model's
        exact density (:func:`~numpyro_amortized.train.held_out_check`) and warn
        (:class:`~numpyro_amortized.train.GuideCheckWarning`) when, on more than a quarter of
        them, k-hat > 0.7 or the raw draws are more than 0.3 posterior sds off
        (:func:`~numpyro_amortized.compare.importance.raw_error`); the figures are in
        ``result.check``. The data given to ``fit`` are
        checked too, unless an observed site there is constant (placeholders such as zeros),
        with a warning when the guide fails on them. ``False`` skips both.
    :return: a :class:`FitResult`.

    Non-finite simulations are dropped from their batch and counted (an error is raised when
    most of them are); Ctrl-C stops training and returns (and saves) the last completed chunk's
    result, with ``result.interrupted`` set. A chunk that does not finish in time (a sampler
    that loops forever on some simulated parameters) raises
    :class:`~numpyro_amortized.train.TrainingStalled`, naming the model's sites that sample with
    loops, after saving the last completed chunk to ``checkpoint``; the error's ``result``
    holds it.

    **Example**::

        result = fit(guide, jax.random.PRNGKey(0), x=x, y=y, num_steps=3000)
        result.params, result.losses[-1]
    """
    t_call = time.perf_counter()
    cfg = resolve_settings(rng_key, num_steps=num_steps,
                           batch_size=resolve_batch_size(loss, batch_size),
                           learning_rate=learning_rate, num_simulations=num_simulations,
                           validation_size=validation_size, num_chunks=num_chunks,
                           keep_best=keep_best, patience=patience, checkpoint=checkpoint,
                           checkpoint_every=checkpoint_every, resume=resume,
                           time_budget=time_budget)
    watch = StallWatch(stall_timeout)
    mesh = data_mesh(devices)
    if cfg.batch_size % mesh.devices.size:
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of the "
                         f"{mesh.devices.size} devices; use a multiple, or fewer (devices=...).")
    loss = NPE() if loss is None else loss
    program = _Program(guide, cfg, loss, optimizer, mesh, args, kwargs, weight_decay, ema_decay)
    make_result = lambda r: program.result(r, compile_time, t0)
    is_writer = jax.process_index() == 0
    hooks = [Plateau(cfg.patience)] if cfg.patience else []
    if cfg.converge:
        hooks.append(Converge())
    if checkpoint is not None:  # the path is checked before any work
        resuming = resume is not None and os.fspath(resume) == os.fspath(checkpoint)
        hooks.append(Checkpointer(checkpoint, guide, cfg.checkpoint_every, make_result, is_writer,
                                  resuming=resuming))
    run = program.start(resume)
    compiled, compile_time = program.compile(run.state)
    if cfg.time_budget:
        hooks.append(TimeBudget(cfg.time_budget, t_call))
    hooks += [ProgressBar(None if cfg.time_budget else cfg.num_steps, run.step,
                          not progress_bar or not is_writer), *callbacks]
    if check and run.step < cfg.num_steps and not run.stop:
        program.prepare_check(run.state)
    t0 = time.perf_counter()
    try:
        while run.step < cfg.num_steps and not run.stop:
            started = time.perf_counter()
            new_state, judged, losses, dropped, v = compiled(
                run.state, program.bank, program.val, jnp.float32(run.scale))
            n = min(cfg.chunk, cfg.num_steps - run.step)
            if not watch.wait(v, started):  # no device work from here: it would queue behind
                run.stop = "stalled"
                saved = [h.last_saved for h in hooks if isinstance(h, Checkpointer)]
                stalled = TrainingStalled(stall_message(
                    looping_sites(guide.model, *args, **kwargs), run.step, n, watch.limit,
                    checkpoint, saved[0] if saved else None))
                stalled.state = jax.device_get(run.state)  # ready: a copy, not a computation
                raise stalled
            losses, dropped, v = host_tree((losses, dropped, v))
            program.check_dropped(dropped[:n], n)
            run.state, run.step = new_state, run.step + n
            run.losses.append(losses[:n])
            run.val_steps.append(run.step)
            run.val_losses.append(float(v))
            if float(v) < run.best_loss:  # tracked always; returned only with keep_best
                run.best_step, run.best_loss, run.best_params = run.step, float(v), judged
            for hook in hooks:
                hook.on_chunk(run, Chunk(losses, dropped, float(v), n))
    except KeyboardInterrupt:
        run.interrupted = True
        warnings.warn(
            f"Training interrupted at step {run.step} of {cfg.num_steps}: returning the "
            "parameters of the last completed chunk"
            + (f" (saved to {checkpoint}; continue with fit(..., resume={checkpoint!r}))."
               if checkpoint is not None else "."), UserWarning, stacklevel=2)
    finally:
        for hook in hooks:
            hook.on_end(run)
    jax.block_until_ready(run.state.params)
    result = make_result(run)
    if check and not run.interrupted:
        result = result._replace(check=program.check(result))
        if result.check.failed_share > FAILED_SHARE:
            warnings.warn(result.check.message(), GuideCheckWarning, stacklevel=2)
        elif result.check.data_failed:
            warnings.warn(result.check.data_message(), GuideCheckWarning, stacklevel=2)
    return result


class _Program:
    """The parts of one run: the step, the simulations it trains and validates on, the
    compiled chunk, and the result."""

    def __init__(self, guide, cfg, loss, optimizer, mesh, args, kwargs, weight_decay, ema_decay):
        self.guide, self.cfg, self.loss, self.args, self.kwargs = guide, cfg, loss, args, kwargs
        self.ema_decay = None if ema_decay is None else check_ema_decay(ema_decay)
        self.weight_decay, self.optimizer, self.n_devices = weight_decay, optimizer, mesh.devices.size
        self.replicated, self.batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.tr = self.prepared_check = None
        # replicated: under several processes every one fits the same weights from all of val
        self.member_log_probs = jit_once(held_out_member_log_probs(guide),
                                         out_shardings=self.replicated)

    def start(self, resume) -> Run:
        """Set the guide up (or restore it) and the initial state, then draw the simulations."""
        guide, cfg = self.guide, self.cfg
        guide.summary_range = None  # another run's range must not outlive it (set at the end)
        k_init, k_data, k_val = jax.random.split(cfg.rng_key, 3)
        history = {"losses": [], "val_steps": [], "val_losses": [], "best": None,
                   "train_time": 0.0, "plateau": {}}
        resuming = resume is not None and os.path.exists(os.fspath(resume))
        if not resuming:  # resume=path of a run not yet started: start it
            k_setup, _ = jax.random.split(k_init)
            guide.initialize(k_setup, self.args, self.kwargs,
                             num_train_simulations=cfg.num_train)
        optimizer = self.optimizer
        if optimizer is None:
            if not guide.is_setup:  # the decay depends on the networks: set up from the file
                restore_guide(guide, read_file(resume), resume, self.args, self.kwargs)
            decay = self.weight_decay
            if decay is None:
                default = guide.posterior(guide.init_params).flow
                decay = (fixed_budget_weight_decay(cfg.num_train or 10_000)
                         if getattr(default, "member_kinds", None) == DEFAULT_MEMBERS else 0.0)
            cfg.record["weight_decay"] = [float(w) for w in np.atleast_1d(decay)]
            optimizer = default_optimizer(None if cfg.converge or cfg.time_budget
                                          else cfg.num_steps,
                                          cfg.learning_rate,
                                          weight_decay=flow_weight_decay(guide, decay))
        elif self.weight_decay is not None:
            raise ValueError("weight_decay is a setting of the default optimizer; with an "
                             "optimizer of your own, give it default_optimizer(..., "
                             "weight_decay=flow_weight_decay(guide, ...)) or add decay there.")
        cfg.record["ema_decay"] = self.ema_decay
        if self.ema_decay is not None:
            optimizer = averaged(optimizer, self.ema_decay)
        self.tr = trainer(guide, loss=self.loss, optimizer=optimizer,
                          batch_size=cfg.batch_size,
                          data_sharding=self.batched if self.n_devices > 1 else None)
        if resuming:
            state, history = resume_run(resume, guide, optimizer, self.args, self.kwargs,
                                        cfg.record)
        else:
            state = self.tr.init(k_init, *self.args, **self.kwargs)
        state = jax.device_put(host_tree(state), self.replicated)
        self._draw_simulations(k_data, k_val)
        best_step, best_loss, best_params = history["best"] or (-1, math.inf, None)
        run = Run(state=state, step=int(host_value(state.step)), num_steps=cfg.num_steps,
                  losses=history["losses"], val_steps=history["val_steps"],
                  val_losses=history["val_losses"], best_step=best_step, best_loss=best_loss,
                  best_params=best_params, train_time=history["train_time"])
        plateau = history["plateau"]
        run.plateau.update({k: v for k, v in plateau.items() if k not in ("scale", "stopped")})
        run.scale = float(plateau.get("scale", 1.0))
        if plateau.get("stopped"):
            run.stop = plateau["stopped"] if isinstance(plateau["stopped"], str) \
                else "validation plateau"
        if run.step % cfg.chunk and run.step < cfg.num_steps:
            raise CheckpointError(f"{resume}: the checkpoint stopped at step {run.step}, not at "
                                  f"a multiple of this run's chunk ({cfg.chunk}).")
        return run

    def _draw_simulations(self, k_data, k_val):
        """One simulation program draws the validation set (and the bank, on a budget)."""
        cfg, guide = self.cfg, self.guide
        n = cfg.num_simulations if cfg.num_simulations is not None else cfg.validation_size
        simulate = lambda k: replicate(simulate_in_blocks(  # the pilot's compiled program
            guide.programs, guide.simulate, k, n, self.args, self.kwargs), self.replicated)
        if cfg.num_simulations is None:
            self.bank, val = None, simulate(k_val)
        else:
            sims = simulate(k_data)
            val = take_rows(sims, 0, cfg.num_held_out)
            self.bank = take_rows(sims, cfg.num_held_out, cfg.num_simulations)
        self.val = jax.device_put(val, self.batched) if len(val.u) % self.n_devices == 0 else val

    def compile(self, state):
        cfg, tr, guide, loss = self.cfg, self.tr, self.guide, self.loss
        args, kwargs = self.args, self.kwargs

        # the bank and the validation set are arguments, not constants baked into the program
        def run_chunk(state, bank, val, scale):
            def step(state, _):
                sims = None
                if bank is not None:
                    idx = jax.random.randint(jax.random.fold_in(state.rng_key, 1),
                                             (cfg.batch_size,), 0, bank.u.shape[0])
                    sims = jax.tree.map(lambda x: x[idx], bank)
                new_state, info = tr.update(state, *args, simulations=sims,
                                            update_scale=scale if cfg.patience or cfg.converge
                                            or cfg.time_budget else None,
                                            **kwargs)
                active = state.step < cfg.num_steps
                new_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
                return new_state, (info.loss, info.num_dropped)

            state, (losses, dropped) = jax.lax.scan(step, state, length=cfg.chunk)
            judged = average_params(state)
            val_losses = loss.validation_losses(guide, judged, jax.random.PRNGKey(0), val,
                                                *args, **kwargs)
            return state, judged, losses, dropped, masked_mean(val_losses, val.valid)

        t0 = time.perf_counter()
        out = (self.replicated,) * 5
        compiled = jax.jit(run_chunk, out_shardings=out).lower(
            state, self.bank, self.val, jnp.float32(1.0)).compile()
        return compiled, time.perf_counter() - t0

    def prepare_check(self, state):
        """Compile the end's held-out check while training runs, on the core a training step
        leaves idle (:class:`~numpyro_amortized.train.check.PreparedCheck`)."""
        if jax.process_count() == 1:
            self.prepared_check = PreparedCheck(self.guide, {self.guide.param_name: state.params},
                                                CHECK_KEY, self.val, self.args, self.kwargs,
                                                out_sharding=self.replicated)

    def check(self, result):
        """The exact-density check of the returned parameters on held-out simulations."""
        check = held_out_check(self.guide, result.params, CHECK_KEY, self.val, self.args,
                               self.kwargs, out_sharding=self.replicated,
                               program=self.prepared_check)
        on_data = None if jax.process_count() > 1 else data_check(
            self.guide, result.params, jax.random.PRNGKey(2), self.args, self.kwargs)
        if on_data is None:
            return check
        return check._replace(data_pareto_k=on_data[0], data_ess_fraction=on_data[1],
                              data_raw_error=on_data[2])

    def check_dropped(self, dropped, n):
        if dropped.sum() > 0.5 * n * self.cfg.batch_size:
            raise RuntimeError(
                f"Most simulations in the last {n} steps were non-finite ({int(dropped.sum())} of "
                f"{n * self.cfg.batch_size}). Check the model for values outside a "
                "distribution's domain.")

    def result(self, run, compile_time, t0) -> FitResult:
        guide, cfg = self.guide, self.cfg
        chosen = run.best_params if cfg.keep_best and run.best_params is not None else \
            average_params(run.state)
        params = chosen
        member_lps = self.member_log_probs(chosen, self.val)
        if member_lps is not None:  # a flow ensemble's weights, fitted on held-out simulations
            params = guide.set_mixture_weights(host_tree(chosen), host_value(member_lps))
            params = jax.device_put(jax.tree.map(np.asarray, params), self.replicated)
        # sample_posterior warns on data outside the range of the held-out simulations
        guide.set_summary_range(params, self.val, out_sharding=self.replicated)
        flow = describe_factory(guide.flow_factory) or repr(guide.flow_factory)
        config = dict(cfg.record, flow=flow,
                      plateau={**run.plateau, "scale": run.scale,
                               "stopped": run.stop if run.stop in (
                                   "validation plateau", "converged", "time budget") else False})
        return FitResult(
            params={guide.param_name: params},
            losses=np.concatenate(run.losses) if run.losses else np.zeros(0),
            validation_losses=(np.asarray(run.val_steps), np.asarray(run.val_losses)),
            state=run.state,
            num_skipped=int(host_value(run.state.num_skipped)),
            num_dropped=int(host_value(run.state.num_dropped)),
            num_simulations=(run.step * cfg.batch_size if self.bank is None
                             else cfg.num_simulations),
            compile_time=compile_time,
            train_time=run.train_time + time.perf_counter() - t0,
            best_step=run.best_step,
            best_validation_loss=run.best_loss,
            interrupted=run.interrupted,
            stopped_early=run.stop is not None and run.step < cfg.num_steps,
            config=config,
        )
