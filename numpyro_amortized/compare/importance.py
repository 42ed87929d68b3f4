"""Pareto-smoothed importance sampling: the amortized posterior made exact where it can be.

A NumPyro model has an exact joint density, so guide draws can be reweighted by
``p(theta, x) / q(theta | x)``. Pareto smoothing (ArviZ's ``psislw``) stabilizes the weights
and its shape estimate k-hat says whether the correction, and the guide, can be trusted for
this dataset: below 0.5 the guide is good, up to 0.7 the corrected draws are reliable, above
0.7 neither is.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from numpyro_amortized.compare.arviz_data import psislw
from numpyro_amortized.compare.draws import log_joint
from numpyro_amortized.guide_base import AmortizedGuideBase
from numpyro_amortized.programs import log_joints, merge_static, split_static
from numpyro_amortized.simulation import inspect_model
from numpyro_amortized.transforms import LatentLayout

__all__ = ["ImportanceResult", "importance_resample", "psis_weights", "raw_error", "thin",
           "unconstrained", "weigh", "which_draws"]

PARETO_K_THRESHOLD = 0.7
RAW_ESS_FRACTION = 0.9  # importance weights this close to uniform: the guide's own draws
MIN_ESS = 400  # an importance ESS that supports PSIS-resampled draws


def which_draws(pareto_k, ess, ess_fraction, raw_ess_fraction=RAW_ESS_FRACTION,
                min_ess=MIN_ESS) -> str:
    """The draws to use for one dataset, from its importance check: ``"amortized"`` (weights
    close to uniform), ``"corrected"`` (PSIS-resampled: k-hat <= 0.7 and enough ESS) or
    ``"escalate"`` (neither: refine the guide on the dataset, or run NUTS)."""
    if ess_fraction >= raw_ess_fraction:
        return "amortized"
    if pareto_k <= PARETO_K_THRESHOLD and ess >= min_ess:
        return "corrected"
    return "escalate"


class ImportanceResult(NamedTuple):
    """The importance-corrected posterior of one dataset.

    :param draws: ``num_samples`` corrected draws by site (resampled from the proposals with
        the smoothed weights).
    :param proposals: the guide draws by site, ``(num_proposals, ...)``.
    :param log_weights: Pareto-smoothed, normalized log weights of the proposals.
    :param pareto_k: the k-hat diagnostic (> 0.7: do not trust the amortized posterior).
    :param ess: effective sample size of the weighted proposals, ``1 / sum(w^2)``.
    :param ess_fraction: ``ess / num_proposals`` (1 for a perfect guide).
    """

    draws: dict
    proposals: dict
    log_weights: np.ndarray
    pareto_k: float
    ess: float
    ess_fraction: float


def importance_resample(guide, params, rng_key, *args, num_samples=1000, num_proposals=None,
                        warn=True, **kwargs) -> ImportanceResult:
    """Correct the guide's posterior for one dataset by PSIS and resample it.

    Draws ``num_proposals`` samples from ``q(theta | x)``, weights them by
    ``p(theta, x) / q(theta | x)`` (both densities in the constrained space of the latents),
    smooths the weights (PSIS) and resamples ``num_samples`` draws. Drawing ten times more
    proposals than kept draws keeps duplicates rare when the guide is good.

    :param guide: a trained :class:`~numpyro_amortized.AutoAmortizedFlow`, or any guide
        with ``model``, ``sample_posterior`` and ``log_prob(params, latents, *args, **kwargs)``.
    :param params: its parameters.
    :param num_samples: corrected draws to return.
    :param num_proposals: guide draws to weight (default ``10 * num_samples``).
    :param warn: warn when k-hat > 0.7.
    :return: an :class:`ImportanceResult`.

    **Example**::

        res = importance_resample(guide, params, key, x=x, y=y)
        res.pareto_k, res.ess, res.draws["beta"].shape

    **References:** Vehtari, Simpson, Gelman, Yao & Gabry (2024), *Pareto smoothed importance
    sampling*, JMLR; Yao, Vehtari, Simpson & Gelman (2018), *Yes, but did it work?: Evaluating
    variational inference*, ICML.
    """
    n = int(num_proposals or 10 * num_samples)
    res = weigh(guide, [params], rng_key, args, kwargs, int(num_samples), n)
    if warn and not res.pareto_k <= PARETO_K_THRESHOLD:
        warnings.warn(
            f"Pareto k-hat = {res.pareto_k:.2f} > {PARETO_K_THRESHOLD}: the amortized posterior "
            "is far from the exact one for this dataset (importance ESS "
            f"{res.ess:.0f} of {n}), and the corrected draws are not reliable either. Do not "
            "trust the amortized answer here: use numpyro_amortized.posterior, which refines "
            "the guide on this dataset or runs NUTS.",
            UserWarning, stacklevel=2,
        )
    if isinstance(guide, AmortizedGuideBase) and guide.structure.deterministic:
        res = res._replace(draws={**res.draws, **guide._deterministic_sites(
            res.draws, (int(num_samples),), args, kwargs)})
    return res


PROPOSAL_BLOCK = 2048  # proposals per compiled call: one program serves every proposal count


def weigh(guide, proposal_params, rng_key, args, kwargs, num_samples, num_proposals):
    """PSIS of the model's density against the guide under ``proposal_params`` (a list of
    parameter sets: one is the guide itself, several an equal mixture of them, a defensive
    proposal), with ``num_samples`` draws resampled from ``num_proposals`` proposals."""
    keys = jax.random.split(rng_key, len(proposal_params) + 1)
    if isinstance(guide, AmortizedGuideBase):
        proposals, log_q, log_p = _propose(guide, proposal_params, keys[0], args, kwargs,
                                           int(num_proposals))
    else:
        m = -(-int(num_proposals) // len(proposal_params))
        parts = [guide.sample_posterior(k, p, *args, sample_shape=(m,), **kwargs)
                 for k, p in zip(keys[:-1], proposal_params, strict=True)]
        proposals = {name: jnp.concatenate([d[name] for d in parts]) for name in parts[0]}
        log_qs = [np.asarray(guide.log_prob(p, proposals, *args, **kwargs), np.float64)
                  for p in proposal_params]
        log_q = np.logaddexp.reduce(np.stack(log_qs), axis=0) - np.log(len(log_qs))
        log_p = np.asarray(log_joint(guide.model, proposals, *args, **kwargs), np.float64)
    smoothed, k, ess = psis_weights(log_p - log_q)
    idx = jax.random.choice(keys[-1], len(log_q), (int(num_samples),),
                            p=jnp.asarray(np.exp(smoothed)))
    draws = {name: v[idx] for name, v in proposals.items()}
    return ImportanceResult(draws, proposals, smoothed, k, ess, ess / len(log_q))


def _propose(guide, proposal_params, rng_key, args, kwargs, num_proposals):
    """``num_proposals`` draws of the equal mixture of the guide under ``proposal_params`` for
    one dataset, with ``log q`` (the mixture's) and ``log p(theta, x)``: in blocks of a fixed
    size, drawn with their density in one pass, by a program compiled once per kind of data."""
    data = guide.observed_data(*args, **kwargs)
    batch = guide._encode({k: jnp.asarray(v)[None] for k, v in data.items()})
    dynamic, spec = split_static((args, kwargs))
    count = len(proposal_params)
    m = -(-num_proposals // count)  # from each parameter set: the mixture's equal shares
    block = min(PROPOSAL_BLOCK, m)
    settings = (count, block, guide._groups_given(data))
    run = guide.programs.get(("proposals", spec, settings),
                             lambda: _proposal_program(guide, spec, *settings))
    nets = [guide.network_params(p) for p in proposal_params]
    parts = [run(nets, jax.random.fold_in(rng_key, i), batch, dynamic)
             for i in range(-(-m // block))]
    if not all(bool(ok) for *_, ok in parts):
        raise ValueError("The parameters contain NaN or infinity: training diverged, or the "
                         "parameters were changed. Use those of an earlier checkpoint.")

    def take(values):  # blocks of (count * block, ...) -> m of each set, the sets in order
        v = jnp.stack([jnp.reshape(x, (count, block) + x.shape[1:]) for x in values], 1)
        v = jnp.reshape(v, (count, -1) + v.shape[3:])[:, :m]
        return jnp.reshape(v, (count * m,) + v.shape[2:])

    proposals = {name: take([p[0][name] for p in parts]) for name in parts[0][0]}
    return (proposals, np.asarray(take([p[1] for p in parts]), np.float64),
            np.asarray(take([p[2] for p in parts]), np.float64))


def _proposal_program(guide, spec, count, block, num_groups=None):
    """The jitted block of :func:`_propose`: ``block`` draws from each of ``count`` parameter
    sets, the log density of their equal mixture and the model's (of ``num_groups`` groups,
    fewer than the guide's maximum: the density of their marginal)."""
    present = (None if num_groups is None
               else jnp.arange(guide.groups.layout.num_groups) < num_groups)
    given = {} if present is None else {"present": present}

    def run(nets, key, batch, dynamic):
        a, kw = merge_static(dynamic, spec)
        posteriors = [guide.posterior(p) for p in nets]
        us, log_qs = [], []
        for i, (post, k) in enumerate(zip(posteriors, jax.random.split(key, count))):
            u, own = post.sample_and_log_prob(k, batch, (block,), **given)
            us.append(jnp.moveaxis(u, 0, 1))  # (1, block, D): the dataset axis first
            log_qs.append([None if j != i else jnp.moveaxis(own, 0, 1) for j in range(count)])
        u = jnp.concatenate(us, axis=1)
        for i, post in enumerate(posteriors):  # each draw's density under the other sets
            for j, ui in enumerate(us):
                if log_qs[j][i] is None:
                    log_qs[j][i] = post.log_prob(ui, batch, **given)
        log_q_u = jax.nn.logsumexp(jnp.stack([jnp.concatenate(
            [log_qs[j][i] for j in range(count)], axis=1) for i in range(count)]), 0)
        latents, log_det = guide.latent_layout.constrain(u[0])
        if present is not None:
            log_det = guide._group_log_det(u, present)[0]
            latents = guide._first_groups(latents, num_groups, 1)
        log_p = log_joints(guide.model, a, kw, latents)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(nets)]))
        return latents, log_q_u[0] - np.log(count) - log_det, log_p, finite

    return jax.jit(run)


def psis_weights(log_w):
    """Pareto-smoothed importance weights of raw log weights ``log_w``: the normalized
    smoothed log weights, k-hat and the ESS ``1 / sum(w^2)``. Non-finite weights get weight
    0; a ``ValueError`` when none is finite."""
    log_w = np.asarray(log_w, np.float64)
    finite = np.isfinite(log_w)
    if not finite.any():
        raise ValueError(
            "No guide draw has a finite importance weight: the model gives log density -inf "
            "(or NaN) to all of them. Check that the data are possible under the model."
        )
    log_w = log_w - np.max(log_w[finite])
    with np.errstate(over="ignore", invalid="ignore"):  # extreme tails: the fit gives a large k
        smoothed, k = psislw(np.where(finite, log_w, np.min(log_w[finite]) - 1e3))
    smoothed = np.where(finite, smoothed, -np.inf)
    smoothed = smoothed - logsumexp(smoothed)
    return smoothed, float(k), float(1.0 / np.sum(np.exp(2 * smoothed)))


RAW_ERROR = 0.3  # posterior sds: raw draws off by more than this fail the check
RAW_ERROR_Z = 4.0  # the noise guard, in standard errors (the largest of many latents)


MAX_THINNING = 5.0  # the guide's own draws are thinned keeping at least one in this many


def thin(log_weights, num_samples, seed=0) -> np.ndarray:
    """Indices of ``num_samples`` distinct proposals kept by rejection against their importance
    weights: proposal i is kept with probability ``min(1, w_i / K)`` (weights of mean 1; ``K``
    the largest weight, at most ``MAX_THINNING``), in proposal order.

    Where every ``w_i <= K`` the kept draws are draws of the weighted posterior; above ``K`` a
    draw is kept but not repeated. Draws where the guide is far heavier than the posterior
    (weights near 0) are dropped: a long tail of the guide that k-hat and the ESS read as
    harmless, but that can set an sd alone. When fewer than ``num_samples`` pass, the rest are
    the proposals nearest to passing. ``seed`` seeds numpy's generator (an int or a tuple of
    them).
    """
    log_weights = np.asarray(log_weights, np.float64)
    w = np.exp(log_weights - logsumexp(log_weights)) * len(log_weights)
    keep = np.minimum(1.0, w / min(float(w.max()), MAX_THINNING))
    ratio = np.random.default_rng(seed).random(len(w)) / np.maximum(keep, 1e-300)
    passed = np.flatnonzero(ratio < 1.0)
    if len(passed) >= num_samples:
        return passed[:num_samples]
    return np.sort(np.argsort(ratio, kind="stable")[:num_samples])


def raw_error(u, smoothed):
    """How far the guide's own draws are from the posterior, as PSIS sees it: over every
    coordinate of the draws ``u`` (``(m, ...)``, unconstrained), the larger of the raw mean's
    and the raw sd's distance from the weighted ones (``smoothed``: normalized log weights),
    each less ``RAW_ERROR_Z`` standard errors of that distance (self-normalized importance
    sampling, the delta method), in weighted sds, and at least 0.

    k-hat says whether the weights can correct the draws, not whether the draws needed it: a
    guide can be a posterior sd off with k-hat under 0.5. A value above ``RAW_ERROR`` says the
    raw draws (``sample_posterior``) are off by more than that, beyond noise."""
    u = np.asarray(u, np.float64).reshape(len(smoothed), -1)
    w = np.exp(np.asarray(smoothed, np.float64))
    keep = np.isfinite(u).all(1) & (w > 0)
    u, w = u[keep], w[keep] / w[keep].sum()
    if len(u) < 2:
        return float("inf")
    d = w - 1.0 / len(u)  # raw and weighted estimates differ by sums weighted by d
    dev = u - w @ u
    var = w @ dev**2
    spread = var > 0
    u, dev, var = u[:, spread], dev[:, spread], var[spread]
    sd = np.sqrt(var)
    mean_off = np.abs(d @ dev) - RAW_ERROR_Z * np.sqrt(d**2 @ dev**2)
    sd_off = (np.abs(u.std(0) - sd)
              - RAW_ERROR_Z * np.sqrt(d**2 @ (dev**2 - var) ** 2) / (2 * sd))
    return float(max(np.max(np.maximum(mean_off, sd_off) / sd, initial=0.0), 0.0))


def unconstrained(model, draws, args, kwargs):
    """``(m, D)``: the latent draws of ``model`` (by site, ``(m, ...)``) in NumPyro's
    unconstrained space, for the data in ``args``/``kwargs`` (their shapes)."""
    layout = LatentLayout(inspect_model(model, *args, **kwargs).latents)
    return np.asarray(layout.unconstrain(draws))
