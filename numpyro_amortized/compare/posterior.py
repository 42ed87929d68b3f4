"""One call that checks the amortized answer for a dataset, corrects it, and escalates.

A NumPyro model has an exact log density, so the guide's draws for one dataset can be checked
against it (Pareto k-hat and the importance ESS of ``p(theta, x) / q(theta | x)``). The
answer goes only as far as it needs:

1. ``"amortized"``: the guide's own draws, when the importance weights are close to uniform,
   thinned by rejection against those weights (:func:`~numpyro_amortized.compare.importance.thin`:
   distinct draws, without the far tail where the guide is heavier than the posterior);
2. ``"psis"``: the draws resampled with Pareto-smoothed weights, when k-hat <= 0.7 and the
   importance ESS is large enough;
3. ``"refined+psis"``: otherwise the guide is fine-tuned on this one dataset (its ELBO with
   the model's exact density, starting from the amortized posterior: semi-amortized
   inference), then checked again with proposals from both the refined and the amortized
   guide (so a mode that refinement dropped still shows), and the PSIS-resampled draws
   returned when they pass as in 2;
4. ``"nuts"``: still failing, NUTS started from the (refined) guide.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_amortized.compare.importance import (
    MIN_ESS,
    RAW_ESS_FRACTION,
    psis_weights,
    raw_error,
    thin,
    unconstrained,
    weigh,
    which_draws,
)
from numpyro_amortized.compare.nuts import warm_start_nuts
from numpyro_amortized.group_data import GROUP_COUNT
from numpyro_amortized.programs import abstract_key, log_joints, merge_static, split_static

__all__ = ["PosteriorResult", "posterior", "posterior_batch", "refine_guide"]


class PosteriorResult(NamedTuple):
    """What :func:`posterior` returns for one dataset.

    :param draws: ``num_samples`` posterior draws by site (latents and deterministic sites).
    :param method: what produced them: ``"amortized"``, ``"psis"``, ``"refined+psis"`` or
        ``"nuts"``.
    :param pareto_k: k-hat of the guide's draws (after refinement, if it ran).
    :param ess: importance ESS of the proposals; ``ess_fraction`` its share of them.
    :param steps: one dict per check or step taken (name, k-hat, ESS, seconds; for a check,
        ``raw_error``: how many posterior sds the proposals' own means or sds are off, beyond
        noise, see :func:`~numpyro_amortized.compare.importance.raw_error`).
    :param params: the guide's parameters behind the draws (refined ones after refinement).
    :param nuts: the :class:`~numpyro_amortized.compare.NUTSResult` when NUTS ran.
    :param seconds: wall time of the call.
    :param reliable: ``False`` when the returned draws failed every check (NUTS not allowed)
        or NUTS's own diagnostics (R-hat, ESS, divergences) failed; a warning says which.
    """

    draws: dict
    method: str
    pareto_k: float
    ess: float
    ess_fraction: float
    steps: list
    params: dict
    nuts: object
    seconds: float
    reliable: bool = True


def proposal_count(n):
    """``n`` rounded up to one of four sizes per octave (at most 25% more): the programs that
    draw and weigh proposals are compiled per count, and a count computed from an ESS would
    otherwise be new for every dataset."""
    n = max(int(np.ceil(n)), 1)
    step = 1 << max(n.bit_length() - 3, 0)
    return -(-n // step) * step


def _quiet_range(fn):
    """``posterior`` checks every answer against the model's density, so the summary-range
    warning of ``sample_posterior`` would only repeat what its checks measure."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*outside the data the guide was trained")
            return fn(*args, **kwargs)
    return wrapper


@_quiet_range
def posterior(guide, params, rng_key, *args, num_samples=1000, num_proposals=None,
              max_proposals=50_000, target_ess=None, raw_ess_fraction=RAW_ESS_FRACTION,
              min_ess=MIN_ESS, refine=True, refine_steps=300,
              refine_particles=32, refine_learning_rate=1e-3, nuts=True, nuts_warmup=500,
              **kwargs) -> PosteriorResult:
    """The posterior of the dataset in ``args``/``kwargs``, checked against the model's exact
    density and escalated only as far as needed (see the module's description).

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`.
    :param params: its parameters.
    :param num_samples: draws to return.
    :param num_proposals: guide draws to weight (default ``10 * num_samples``).
    :param max_proposals: when PSIS-resampled draws would rest on an importance ESS below
        ``target_ess`` (many repeated draws), the proposals are drawn anew, as many as make
        the ESS about ``target_ess``, up to this many.
    :param target_ess: importance ESS wanted under PSIS-resampled draws (default
        ``4 * num_samples``: about 90% of the returned draws distinct).
    :param raw_ess_fraction: the guide's own draws (thinned by rejection against their
        weights) are returned when the importance ESS is at least this share of the
        proposals (weights close to uniform).
    :param min_ess: PSIS-resampled draws are returned when k-hat <= 0.7 and the importance
        ESS is at least this.
    :param refine: fine-tune the guide on this dataset when the checks fail;
        ``refine_steps`` Adam steps at ``refine_learning_rate``, ``refine_particles`` draws
        per step.
    :param nuts: run NUTS (warm-started from the guide, ``nuts_warmup`` warm-up steps) when
        refinement does not pass either; ``False`` returns the best draws with a warning.
    :return: a :class:`PosteriorResult`.

    **Example**::

        res = posterior(guide, params, key, x=x, y=y)
        res.method, res.pareto_k, res.draws["beta"].mean(0)
    """
    t0 = time.perf_counter()
    guide.observed_data(*args, **kwargs)  # checks the data before any work
    k_check, k_refine, k_again, k_nuts = jax.random.split(rng_key, 4)
    n = int(num_samples)
    target = int(target_ess or 4 * n)
    steps = []

    def check(proposal_params, key, name):
        t = time.perf_counter()
        m = int(num_proposals or 10 * n)
        res = weigh(guide, proposal_params, key, args, kwargs, n, m)
        use = which_draws(res.pareto_k, res.ess, res.ess_fraction, raw_ess_fraction, min_ess)
        if use == "corrected" and res.ess < target and m < max_proposals:
            # more proposals, so that the resampled draws are mostly distinct
            more = min(int(max_proposals), proposal_count(m * target / res.ess))
            res = weigh(guide, proposal_params, jax.random.fold_in(key, 1), args, kwargs, n,
                        more)
            use = which_draws(res.pareto_k, res.ess, res.ess_fraction, raw_ess_fraction,
                              min_ess)
        error = raw_error(unconstrained(guide.model, res.proposals, args, kwargs),
                          res.log_weights)
        steps.append({"step": name, "pareto_k": res.pareto_k, "ess": res.ess,
                      "ess_fraction": res.ess_fraction, "raw_error": error,
                      "num_proposals": len(res.log_weights), "seconds": time.perf_counter() - t})
        if use == "amortized" and len(proposal_params) == 1:
            kept = thin(res.log_weights, n, int(jax.random.randint(key, (), 0, 2**31 - 1)))
            return res, "", {k: v[kept] for k, v in res.proposals.items()}
        if use != "escalate":
            return res, "psis", res.draws
        return res, None, None

    def done(p, res, method, draws, nuts_result=None, reliable=True):
        if nuts_result is None and guide.structure.deterministic:
            draws = {**draws, **guide._deterministic_sites(draws, (n,), args, kwargs)}
        return PosteriorResult(draws, method, res.pareto_k, res.ess, res.ess_fraction, steps,
                               p, nuts_result, time.perf_counter() - t0, reliable)

    res, how, draws = check([params], k_check, "amortized")
    if draws is not None:
        return done(params, res, how or "amortized", draws)
    if refine:
        t = time.perf_counter()
        refined = refine_guide(guide, params, k_refine, *args, num_steps=refine_steps,
                               num_particles=refine_particles,
                               learning_rate=refine_learning_rate, **kwargs)
        steps.append({"step": "refine", "seconds": time.perf_counter() - t})
        # checked with proposals from both the refined and the amortized guide (a defensive
        # mixture): refinement seeks one mode, and a mode it dropped is seen only through
        # the amortized proposals
        res_r, how, draws = check([refined, params], k_again, "refined")
        if draws is not None:
            return done(refined, res_r, "refined+psis", draws)
        if res_r.pareto_k < res.pareto_k:
            params, res = refined, res_r
    if not nuts:
        warnings.warn(
            f"Pareto k-hat {res.pareto_k:.2f}, importance ESS {res.ess:.0f}: the guide's "
            "posterior for this dataset failed the checks and NUTS was not allowed "
            "(nuts=False); the returned draws (PSIS-resampled) are not reliable.",
            UserWarning, stacklevel=3)
        return done(params, res, "psis", res.draws, reliable=False)
    t = time.perf_counter()
    chains = 4
    ref = warm_start_nuts(guide, params, k_nuts, *args, num_warmup=nuts_warmup,
                          num_samples=-(-n // chains), num_chains=chains,
                          adapt_mass_matrix=True, **kwargs)
    steps.append({"step": "nuts", "seconds": time.perf_counter() - t, **ref.diagnostics})
    draws = {k: np.asarray(v)[:n] for k, v in ref.samples.items()}
    if not ref.diagnostics["reliable"]:
        warnings.warn(
            "The guide's posterior for this dataset failed the checks, and so did the NUTS run "
            "that replaced it (" + "; ".join(ref.diagnostics["problems"]) + "): the returned "
            "draws are not reliable. Run NUTS longer (nuts_warmup) or reparametrize the model.",
            UserWarning, stacklevel=3)
    return done(params, res, "nuts", draws, ref, ref.diagnostics["reliable"])


def refine_guide(guide, params, rng_key, *args, num_steps=300, num_particles=32,
                 learning_rate=1e-3, **kwargs):
    """The guide's parameters fine-tuned on one dataset: Adam on the negative ELBO
    ``E_q[log q(theta | x) - log p(theta, x)]`` with the model's exact density, from
    ``params``. The result is a posterior for this dataset (and no longer an amortized one).
    """
    data = guide.observed_data(*args, **kwargs)
    batch = guide._encode({k: jnp.asarray(v)[None] for k, v in data.items()})
    dynamic, spec = split_static((args, kwargs))
    settings = (int(num_steps), int(num_particles), float(learning_rate),
                guide._groups_given(data))
    run = guide.programs.get(("refine", spec, settings),
                             lambda: _refine_program(guide, spec, *settings))
    refined = run(guide.network_params(params), rng_key, batch, dynamic)
    outer = isinstance(params, dict) and guide.param_name in params
    return {**params, guide.param_name: refined} if outer else refined


def _refine_program(guide, spec, num_steps, num_particles, learning_rate, num_groups=None):
    """The jitted refinement: ``num_steps`` Adam steps on the negative ELBO of one dataset
    (of ``num_groups`` groups, fewer than the guide's maximum: the ELBO of their marginal)."""
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(learning_rate))

    def negative_elbo(p, key, batch, dynamic):
        a, kw = merge_static(dynamic, spec)
        if num_groups is None:
            u, log_q_u = guide.posterior(p).sample_and_log_prob(key, batch, (num_particles,))
            u, log_q_u = u[:, 0], log_q_u[:, 0]
            latents, log_det = guide.latent_layout.constrain(u)
        else:
            present = jnp.arange(guide.groups.layout.num_groups) < num_groups
            u, log_q_u = guide.posterior(p).sample_and_log_prob(key, batch, (num_particles,),
                                                                present=present)
            u, log_q_u = jnp.moveaxis(u, 0, 1), log_q_u[:, 0]
            log_det = guide._group_log_det(u, present)[0]
            latents = guide._first_groups(guide.latent_layout.constrain(u[0])[0],
                                          num_groups, 1)
        log_p = log_joints(guide.model, a, kw, latents)
        return -jnp.mean(log_p - (log_q_u - log_det))

    def run(p, key, batch, dynamic):
        def step(carry, key):
            p, state = carry
            loss, grads = jax.value_and_grad(negative_elbo)(p, key, batch, dynamic)
            updates, state = optimizer.update(grads, state, p)
            new = optax.apply_updates(p, updates)
            ok = jnp.isfinite(loss)  # a non-finite step is skipped
            p = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, p)
            return (p, state), loss

        (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)),
                                 jax.random.split(key, num_steps))
        return p

    return jax.jit(run)


@_quiet_range
def posterior_batch(guide, params, rng_key, datasets, *, num_samples=1000, num_proposals=None,
                    max_proposals=50_000, target_ess=None, raw_ess_fraction=RAW_ESS_FRACTION,
                    min_ess=MIN_ESS, **options) -> list:
    """:func:`posterior` for many datasets: the first check runs for all of them at once
    (one vectorized call per group of datasets with equal shapes), and only the datasets that
    fail it are refined or sent to NUTS, one by one.

    :param datasets: the model's keyword arguments per dataset (dicts), or ``(args, kwargs)``
        pairs.
    :param options: :func:`posterior`'s options for the escalated datasets (``refine``,
        ``refine_steps``, ``nuts``, ...).
    :return: a list of :class:`PosteriorResult`, in the order of ``datasets``.
    """
    allowed = {"refine", "refine_steps", "refine_particles", "refine_learning_rate", "nuts",
               "nuts_warmup"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"posterior_batch got unknown options {unknown}; it takes "
                        f"{sorted(allowed)} besides num_samples, num_proposals, "
                        "max_proposals, target_ess, raw_ess_fraction and min_ess.")
    items = _as_datasets(datasets)
    for i, (a, kw) in enumerate(items):  # every dataset checked before any work
        try:
            guide.observed_data(*a, **kw)
        except (ValueError, TypeError) as e:
            raise type(e)(f"dataset {i}: {e}") from None
    n, m = int(num_samples), int(num_proposals or 10 * num_samples)
    target = int(target_ess or 4 * n)
    k_first, k_resample, k_rest = jax.random.split(rng_key, 3)
    thin_seed = int(jax.random.randint(k_resample, (), 0, 2**31 - 1))  # numpy's, per dataset
    groups = {}
    for i, item in enumerate(items):
        dynamic, spec = split_static(item)
        groups.setdefault((spec, abstract_key(dynamic)), []).append(i)
    results = [None] * len(items)
    for (spec, _), idx in groups.items():
        t = time.perf_counter()
        data = [guide.observed_data(*items[i][0], **items[i][1]) for i in idx]
        batch = {k: jnp.stack([jnp.asarray(d[k]) for d in data]) for k in data[0]}
        count = batch.pop(GROUP_COUNT, None)  # groups of index-linked rows, if fewer
        proposals = guide.sample_posterior_batch(jax.random.fold_in(k_first, idx[0]), params,
                                                 batch, sample_shape=(m,), num_groups=count)
        log_q = np.asarray(guide.log_prob_batch(params, proposals, batch, num_groups=count),
                           np.float64)
        dynamic = [jnp.stack(x) for x in zip(*(split_static(items[i])[0] for i in idx),
                                             strict=True)]
        log_joint = guide.programs.get(("log_joint_batch", spec),
                                       lambda s=spec: _log_joint_batch(guide.model, s))
        log_p = np.asarray(log_joint(proposals, dynamic), np.float64)
        seconds = (time.perf_counter() - t) / len(idx)
        for j, i in enumerate(idx):
            smoothed, k, ess = psis_weights(log_p[j] - log_q[j])
            step = {"step": "amortized", "pareto_k": k, "ess": ess, "ess_fraction": ess / m,
                    "seconds": seconds}
            use = which_draws(k, ess, ess / m, raw_ess_fraction, min_ess)
            if use == "amortized":
                method, take = "amortized", thin(smoothed, n, (thin_seed, i))
            elif use == "corrected" and (ess >= target or m >= max_proposals):
                method = "psis"
                take = np.asarray(jax.random.choice(jax.random.fold_in(k_resample, i), m, (n,),
                                                    p=jnp.asarray(np.exp(smoothed))))
            else:  # escalate this one (or draw more proposals for it)
                a, kw = items[i]
                results[i] = posterior(guide, params, jax.random.fold_in(k_rest, i), *a,
                                       num_samples=n, num_proposals=num_proposals,
                                       max_proposals=max_proposals, target_ess=target,
                                       raw_ess_fraction=raw_ess_fraction, min_ess=min_ess,
                                       **options, **kw)
                continue
            draws = {name: v[j][take] for name, v in proposals.items()}
            if guide.structure.deterministic:
                a, kw = items[i]
                draws.update(guide._deterministic_sites(draws, (n,), a, kw))
            results[i] = PosteriorResult(draws, method, k, ess, ess / m, [step], params, None,
                                         seconds)
    return results


def _log_joint_batch(model, spec):
    """``log p(theta, x)`` for ``(datasets, draws)`` latents and stacked data, compiled once."""
    def one_dataset(latents, dynamic):
        a, kw = merge_static(dynamic, spec)
        return log_joints(model, a, kw, latents)

    return jax.jit(jax.vmap(one_dataset))


def _as_datasets(datasets):
    if isinstance(datasets, dict):
        datasets = [datasets]
    items = []
    for d in datasets:
        if isinstance(d, dict):
            items.append(((), d))
        elif isinstance(d, tuple) and len(d) == 2 and isinstance(d[1], dict):
            items.append((tuple(d[0]), d[1]))
        else:
            raise ValueError(
                "Each dataset must be a dict of the model's keyword arguments, or an "
                f"(args, kwargs) pair; got {type(d).__name__}."
            )
    if not items:
        raise ValueError("No datasets to compare.")
    return items
