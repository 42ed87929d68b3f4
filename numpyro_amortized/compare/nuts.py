"""The NUTS reference: NumPyro's own sampler on the same model and data, as ArviZ data.

:func:`run_nuts` runs ``numpyro.infer.MCMC(NUTS(model))`` inside one compiled program whose
inputs are the data, so it is compiled once and reused for every dataset of the same shapes
(NumPyro recompiles an ``MCMC`` object for each new dataset otherwise; a vectorized one cannot be
rerun at all). :func:`warm_start_nuts` starts the chains from guide draws, with the guide's
posterior covariance as the inverse mass matrix, so that a short warm-up suffices.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import arviz as az
import jax
import numpy as np
from numpyro.distributions import biject_to
from numpyro.infer import MCMC, NUTS, init_to_uniform

from numpyro_amortized.compare.draws import observed_values, to_inference_data
from numpyro_amortized.compare.draws import posterior_predictive as _replicate
from numpyro_amortized.compare.importance import importance_resample
from numpyro_amortized.programs import Programs, abstract_key, merge_static, split_static
from numpyro_amortized.simulation import inspect_model

__all__ = ["NUTSResult", "NUTSRunner", "nuts_diagnostics", "run_nuts", "warm_start_nuts"]

_EXTRA_FIELDS = ("num_steps", "adapt_state.step_size", "energy", "accept_prob")


class NUTSResult(NamedTuple):
    """A NUTS run.

    :param inference_data: ArviZ data (``InferenceData``; a ``DataTree`` with ArviZ 1.x) with
        ``posterior`` (by chain),
        ``sample_stats`` (``diverging``, ``tree_depth``, ``n_steps``, ``step_size``,
        ``energy``, ``acceptance_rate``), ``observed_data`` and, when asked,
        ``posterior_predictive``.
    :param samples: posterior draws by site with the chains stacked, ``(chains * draws, ...)``.
    :param diagnostics: see :func:`nuts_diagnostics`.
    :param run_time: seconds of sampling (warm-up included), compilation excluded.
    :param compile_time: seconds spent compiling (0 when a compiled program was reused).
    """

    inference_data: object
    samples: dict
    diagnostics: dict
    run_time: float
    compile_time: float


class NUTSRunner:
    """NumPyro's NUTS for one model and one set of sampler settings, compiled once per data
    shape: the object owns its compiled programs (at most ``max_programs``, the oldest
    dropped first), so running it on many datasets of the same shapes compiles once.

    :param model: the NumPyro model.
    :param settings: as :func:`run_nuts` takes them (``num_warmup``, ``num_samples``,
        ``num_chains``, ``dense_mass``, ``target_accept_prob``, ``max_tree_depth``,
        ``chain_method``, ``adapt_mass_matrix``, ``init_strategy``).

    **Example**::

        runner = NUTSRunner(model, num_warmup=500)
        refs = [runner.run(jax.random.PRNGKey(i), x=x, y=y) for i, (x, y) in enumerate(data)]
        refs[1].compile_time  # 0.0: the program of the first dataset was reused
    """

    def __init__(self, model, *, num_warmup=1000, num_samples=1000, num_chains=4,
                 dense_mass=False, target_accept_prob=0.8, max_tree_depth=10,
                 chain_method="vectorized", adapt_mass_matrix=True, init_strategy=None,
                 max_programs=8):
        if chain_method not in ("vectorized", "sequential"):
            raise ValueError(
                f"chain_method={chain_method!r}: run_nuts compiles the whole run once for all "
                "datasets and supports 'vectorized' or 'sequential'. For chains on several "
                "devices use numpyro.infer.MCMC(..., chain_method='parallel') directly."
            )
        dense = (tuple(map(tuple, dense_mass)) if isinstance(dense_mass, (list, tuple))
                 else dense_mass)
        self.model = model
        self.num_warmup, self.num_chains = int(num_warmup), int(num_chains)
        self.settings = (int(num_warmup), int(num_samples), int(num_chains), dense,
                         float(target_accept_prob), int(max_tree_depth), chain_method,
                         bool(adapt_mass_matrix), init_strategy or init_to_uniform)
        self.programs = Programs(max_programs)  # (data spec, shapes) -> compiled program

    def run(self, rng_key, *args, init_params=None, inverse_mass_matrix=None,
            posterior_predictive=False, predictive_sites=None, **kwargs) -> NUTSResult:
        """Run NUTS on the data in ``args``/``kwargs`` (see :func:`run_nuts`)."""
        model, num_chains, num_warmup = self.model, self.num_chains, self.num_warmup
        dynamic, spec = split_static((args, kwargs))
        if init_params is not None:
            init_params = {k: jax.numpy.asarray(v) for k, v in init_params.items()}
        if inverse_mass_matrix is not None:
            inverse_mass_matrix = jax.numpy.asarray(inverse_mass_matrix)
        extra = (init_params, inverse_mass_matrix)
        key = (spec, abstract_key(dynamic), jax.tree.structure(extra),
               abstract_key(jax.tree.leaves(extra)))
        fresh, t0 = key not in self.programs, time.perf_counter()
        compiled = self.programs.get(key, lambda: jax.jit(
            _nuts_program(model, self.settings, spec)).lower(rng_key, dynamic, *extra).compile())
        compile_time = time.perf_counter() - t0 if fresh else 0.0
        t0 = time.perf_counter()
        samples, fields = jax.block_until_ready(compiled(rng_key, dynamic, *extra))
        run_time = time.perf_counter() - t0

        samples = {k: np.asarray(v) for k, v in samples.items()}
        n_steps = np.asarray(fields["num_steps"])
        stats = {
            "diverging": np.asarray(fields["diverging"]),
            "n_steps": n_steps,
            "tree_depth": (np.log2(np.maximum(n_steps, 1)).astype(int) + 1),
            "step_size": np.asarray(fields["adapt_state.step_size"]),
            "energy": np.asarray(fields["energy"]),
            "acceptance_rate": np.asarray(fields["accept_prob"]),
        }
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in samples.items()}
        ppc = None
        if posterior_predictive:
            ppc = _replicate(model, jax.random.fold_in(rng_key, 1), flat, *args,
                             sites=predictive_sites, **kwargs)
        idata = to_inference_data(
            flat, chains=num_chains, sample_stats=stats,
            observed_data=observed_values(model, *args, **kwargs),
            posterior_predictive_draws=ppc,
            attrs={"inference": "NUTS", "num_warmup": int(num_warmup)},
        )
        return NUTSResult(idata, flat, nuts_diagnostics(idata), run_time, compile_time)


def run_nuts(model, rng_key, *args, num_warmup=1000, num_samples=1000, num_chains=4,
             dense_mass=False, target_accept_prob=0.8, max_tree_depth=10,
             chain_method="vectorized", init_params=None, inverse_mass_matrix=None,
             adapt_mass_matrix=True, init_strategy=None, posterior_predictive=False,
             predictive_sites=None, **kwargs) -> NUTSResult:
    """Run NumPyro's NUTS on ``model`` with the data in ``args``/``kwargs``.

    :param model: the NumPyro model (the same one the amortized guide was trained on).
    :param rng_key: a PRNG key.
    :param num_warmup: warm-up (adaptation) iterations per chain.
    :param num_samples: kept draws per chain.
    :param num_chains: chains; ``chain_method="vectorized"`` (default) runs them in lockstep on
        one device, ``"sequential"`` one after another.
    :param dense_mass: ``True`` for a dense mass matrix (or NumPyro's list of site-name tuples).
    :param target_accept_prob: the step-size adaptation target.
    :param init_params: optional initial positions in *unconstrained* space, by site, with a
        leading ``num_chains`` axis.
    :param inverse_mass_matrix: optional initial inverse mass matrix for the unconstrained
        latents raveled in sorted site order (a vector for a diagonal one).
    :param adapt_mass_matrix: adapt the mass matrix during warm-up.
    :param init_strategy: NumPyro's initialization strategy when ``init_params`` is not given
        (default ``init_to_uniform``, uniform in (-2, 2) in unconstrained space; models whose
        likelihood is flat far from the prior's centre, such as an epidemic that never takes
        off, want ``numpyro.infer.init_to_median``).
    :param posterior_predictive: add a ``posterior_predictive`` group (see
        :func:`~numpyro_amortized.compare.posterior_predictive`).
    :return: a :class:`NUTSResult`.

    Each call compiles its run; a :class:`NUTSRunner` compiles once for every dataset of the
    same shapes.

    **Example**::

        ref = run_nuts(model, jax.random.PRNGKey(0), x=x, y=y)
        arviz.summary(ref.inference_data)
    """
    runner = NUTSRunner(model, num_warmup=num_warmup, num_samples=num_samples,
                        num_chains=num_chains, dense_mass=dense_mass,
                        target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth,
                        chain_method=chain_method, adapt_mass_matrix=adapt_mass_matrix,
                        init_strategy=init_strategy)
    return runner.run(rng_key, *args, init_params=init_params,
                      inverse_mass_matrix=inverse_mass_matrix,
                      posterior_predictive=posterior_predictive,
                      predictive_sites=predictive_sites, **kwargs)


def _nuts_program(model, settings, spec):
    (num_warmup, num_samples, num_chains, dense, target_accept_prob, max_tree_depth,
     chain_method, adapt_mass_matrix, init_strategy) = settings
    dense_mass = list(dense) if isinstance(dense, tuple) else dense

    def run(rng_key, dynamic, init_params, inverse_mass_matrix):
        args, kwargs = merge_static(dynamic, spec)
        kernel = NUTS(model, dense_mass=dense_mass, target_accept_prob=target_accept_prob,
                      max_tree_depth=max_tree_depth, inverse_mass_matrix=inverse_mass_matrix,
                      adapt_mass_matrix=adapt_mass_matrix, init_strategy=init_strategy)
        mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples,
                    num_chains=num_chains, chain_method=chain_method, progress_bar=False)
        mcmc.run(rng_key, *args, init_params=init_params, extra_fields=_EXTRA_FIELDS,
                 **kwargs)
        return mcmc.get_samples(group_by_chain=True), mcmc.get_extra_fields(group_by_chain=True)

    return run


def nuts_diagnostics(idata, *, max_rhat=1.01, min_ess_per_chain=100) -> dict:
    """Convergence checks of a NUTS run (Vehtari et al. 2021).

    :return: dict with ``rhat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``divergences``,
        ``reliable`` (``False`` if R-hat exceeds ``max_rhat``, an ESS is below
        ``min_ess_per_chain`` per chain, or any transition diverged) and ``problems``
        (sentences saying what is wrong).
    """
    chains = idata.posterior.sizes["chain"]
    rhat = float(np.nanmax(_stack(az.rhat(idata))))
    bulk = float(np.nanmin(_stack(az.ess(idata, method="bulk"))))
    tail = float(np.nanmin(_stack(az.ess(idata, method="tail"))))
    divergences = int(np.asarray(idata.sample_stats["diverging"]).sum())
    problems = []
    if chains > 1 and not rhat <= max_rhat:
        problems.append(f"R-hat {rhat:.3f} > {max_rhat}: the chains disagree")
    min_ess = min_ess_per_chain * chains
    if not min(bulk, tail) >= min_ess:
        problems.append(f"ESS bulk {bulk:.0f} / tail {tail:.0f} < {min_ess}")
    if divergences:
        problems.append(f"{divergences} divergent transitions")
    return {"rhat_max": rhat, "ess_bulk_min": bulk, "ess_tail_min": tail,
            "divergences": divergences, "reliable": not problems, "problems": problems}


def _stack(dataset):
    return np.concatenate([np.ravel(v.values) for v in dataset.data_vars.values()])


def _spread_starts(flat, cov, num_chains):
    """Indices of ``num_chains`` distinct rows of ``flat`` (posterior draws) spread apart: the
    first draw, then each time the draw farthest (in the metric of ``cov``) from those chosen,
    the farthest 1% of draws from the mean left out. Chains that start apart expose modes the
    draws hold through R-hat, where starts taken at random can all fall in one mode."""
    _, first = np.unique(flat, axis=0, return_index=True)
    rows = np.sort(first)
    white = np.linalg.solve(np.linalg.cholesky(cov), (flat[rows] - flat.mean(0)).T).T
    radius = np.sum(white**2, axis=1)
    keep = radius <= np.quantile(radius, 0.99)
    rows, white = rows[keep], white[keep]
    chosen = [0]
    gap = np.sum((white - white[0]) ** 2, axis=1)
    while len(chosen) < min(num_chains, len(rows)):
        chosen.append(int(np.argmax(gap)))
        gap = np.minimum(gap, np.sum((white - white[chosen[-1]]) ** 2, axis=1))
    return np.resize(rows[chosen], num_chains)


def warm_start_nuts(guide, params, rng_key, *args, num_warmup=100, num_samples=1000,
                    num_chains=4, dense_mass=True, adapt_mass_matrix=False,
                    num_guide_samples=2000, correct=True, **kwargs) -> NUTSResult:
    """NUTS started from the amortized posterior: a short warm-up instead of a long one.

    Each chain starts at its own posterior draw, the draws chosen far apart (so that R-hat sees
    modes the draws hold), and the inverse mass matrix is the covariance of the draws in
    NumPyro's unconstrained space (dense by default, its diagonal otherwise), so warm-up only
    has to tune the step size. The draws are PSIS-corrected guide draws by
    default (:func:`~numpyro_amortized.compare.importance_resample`), so that mass the guide
    puts where the posterior has none (a spurious mode, a heavy tail) neither starts a chain
    nor inflates the mass matrix. Pass ``adapt_mass_matrix=True`` to keep adapting the mass
    matrix from that start (worth it for warm-ups of a few hundred steps or more).

    :param guide: a trained guide (anything with ``model``, ``sample_posterior`` and, for
        ``correct=True``, ``log_prob``).
    :param params: its parameters.
    :param num_guide_samples: posterior draws used for the start and the covariance.
    :param correct: start from PSIS-corrected draws (``False``: raw guide draws).
    :return: a :class:`NUTSResult` (``run_nuts`` settings otherwise).

    **Example**::

        warm = warm_start_nuts(guide, params, key, x=x, y=y, num_warmup=100)
        warm.diagnostics["rhat_max"]
    """
    if not isinstance(dense_mass, bool):
        raise TypeError("warm_start_nuts takes dense_mass=True (a dense guide covariance) or "
                         "False (its diagonal).")
    k_guide, k_nuts = jax.random.split(rng_key)
    n = max(int(num_guide_samples), num_chains)
    if correct:
        draws = importance_resample(guide, params, k_guide, *args, num_samples=n, warn=False,
                                    **kwargs).draws
    else:
        draws = guide.sample_posterior(k_guide, params, *args, sample_shape=(n,), **kwargs)
    sites = inspect_model(guide.model, *args, **kwargs).latents
    z = {s.name: np.asarray(biject_to(s.support).inv(draws[s.name])) for s in sites}
    flat = np.concatenate([z[k].astype(np.float64).reshape(n, -1) for k in sorted(z)], axis=1)
    cov = np.atleast_2d(np.cov(flat, rowvar=False))
    cov += 1e-6 * np.mean(np.diag(cov)) * np.eye(len(cov))
    imm = cov if dense_mass else np.diag(cov)
    init = {k: v[_spread_starts(flat, cov, num_chains)] for k, v in z.items()}
    return run_nuts(guide.model, k_nuts, *args, num_warmup=num_warmup, num_samples=num_samples,
                    num_chains=num_chains, dense_mass=dense_mass, init_params=init,
                    inverse_mass_matrix=np.asarray(imm, np.float32),
                    adapt_mass_matrix=adapt_mass_matrix, **kwargs)
