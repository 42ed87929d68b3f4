"""The NumPyro model as a simulator.

Built from NumPyro's effect handlers: a trace of the model finds its latent and observed sample
sites (:func:`inspect_model`), and ``trace(seed(uncondition(model)))`` vectorized with
:func:`jax.vmap` draws (latents, observations) from the prior predictive (:func:`simulate`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import biject_to, constraints
from numpyro.handlers import block, seed, trace, uncondition
from numpyro.primitives import Messenger

from numpyro_amortized.design import categories_of, covariate_values, with_arguments
from numpyro_amortized.samplers import LoopSafe, looping_sites

__all__ = ["LatentSite", "ModelStructure", "ObservedSite", "covariate_values", "inspect_model",
           "looping_sites", "observed_values", "prior_predictive_arguments", "simulate"]


class LatentSite(NamedTuple):
    """A latent sample site: its name, value shape, support and unconstrained shape."""

    name: str
    shape: tuple
    support: Any
    unconstrained_shape: tuple


class ObservedSite(NamedTuple):
    """An observed sample site.

    ``plate_axis`` is the axis of the site's value that runs over the data plate (the
    exchangeable observations), or ``None`` if the site is not inside it. ``log_scale`` is
    ``True`` when the site's distribution has positive continuous support (LogNormal, Gamma,
    Exponential, HalfNormal, ...): the summary network then reads its logarithm. ``counts``
    is ``True`` for unbounded counts (Poisson, negative binomial, geometric): it reads
    ``log(1 + y)``. ``categories`` > 0 marks a vector of category indices (a group-index
    covariate with values ``0 .. categories - 1``): the summary network reads it one-hot.
    """

    name: str
    shape: tuple
    plate_axis: int | None
    log_scale: bool = False
    categories: int = 0
    counts: bool = False


class ModelStructure(NamedTuple):
    """What the amortized guide needs to know about a model.

    :param latents: the latent sites, in model order.
    :param observed: the observed sites (what the summary network sees), in model order.
    :param data_plate: name of the plate that holds exchangeable observations, or ``None``.
    :param data_plate_size: its size in the traced arguments (the largest dataset size).
    :param covariates: array arguments of the model with one row per observation of the data
        plate (design matrices, group indices, exposures), as :class:`ObservedSite` entries
        named after the argument: the summary network reads them next to the observations.
    :param deterministic: names of the model's ``numpyro.deterministic`` sites.
    """

    latents: tuple
    observed: tuple
    data_plate: str | None
    data_plate_size: int | None
    covariates: tuple = ()
    deterministic: tuple = ()

    def fingerprint(self) -> str:
        """A short hash of the latent and observed structure (names, shapes, supports)."""
        desc = {
            "latents": [(s.name, list(s.shape), _support_name(s.support)) for s in self.latents],
            "observed": [(s.name, list(s.shape), s.plate_axis) + (("log",) if s.log_scale else ())
                         for s in self.observed],
            "data_plate": self.data_plate,
        }
        if self.covariates:
            desc["covariates"] = [(c.name, list(c.shape), c.categories) for c in self.covariates]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


def _support_name(support) -> str:
    return type(support).__name__.lstrip("_")


class _LastSite(Messenger):
    """Remembers the sample site being processed (to name it when its sampler fails)."""

    name = fn = None

    def process_message(self, msg):
        if msg["type"] == "sample":
            self.name, self.fn = msg["name"], type(msg["fn"]).__name__


def _model_trace(model, rng_key, args, kwargs):
    """One trace, for the model's structure only: the values of one prior draw must not
    matter, so NumPyro's argument validation (which a draw in a region where the model gives
    NaN would trip) is off here; simulations count such draws instead (see ``fit``)."""
    last = _LastSite(model)
    with block(), numpyro.validation_enabled(False):
        try:
            return trace(seed(last, rng_key)).get_trace(*args, **kwargs)
        except NotImplementedError:
            raise ValueError(
                f"Sample site {last.name!r} cannot be drawn from its distribution "
                f"({last.fn}). Amortized inference simulates datasets from the prior, so "
                "every latent needs a proper prior: give it one (a wide Normal, or a Uniform "
                "over the range you mean).") from None


def observed_values(model, *args, **kwargs) -> dict:
    """The values of the model's observed sample sites in these arguments (one trace; the
    latents' values do not matter)."""
    tr = _model_trace(model, jax.random.PRNGKey(0), args, kwargs)  # any key: values are given
    return {name: s["value"] for name, s in tr.items()
            if s["type"] == "sample" and s["is_observed"]}


def inspect_model(model, *args, observed=None, data_plate="auto", rng_key=None,
                  time_series=False, **kwargs) -> ModelStructure:
    """Find the latent and observed sites of ``model`` called with ``*args, **kwargs``.

    Observed sites are the sample sites given a value (``obs=``) in these arguments, plus any
    named in ``observed``. Covariates written as observed sample sites
    (``numpyro.sample("x", dist.Normal(0, 1), obs=x)``) are observed sites too: they are part
    of the data the summary network sees.

    :param model: a NumPyro model.
    :param observed: optional names of sites to treat as observed even if ``obs`` is ``None``.
    :param data_plate: name of the plate that holds the exchangeable observations; ``"auto"``
        picks the largest plate that contains observed sites and no latent site; ``None`` means
        the data are one fixed-size vector.
    :param time_series: observations with no plate but one common leading length (a series
        observed inside ``numpyro.contrib.control_flow.scan``) take that axis as the data
        plate, a time axis named ``"time"``.
    :param rng_key: the key of the two prior draws that find the sites and check that no
        support moves with other latents (default ``PRNGKey(0)``); a guide passes its set-up key.
    :return: a :class:`ModelStructure`.
    :raises ValueError: for a discrete latent, a model with nothing observed, a latent inside
        the data plate, or a latent whose support depends on another latent.

    **Example**::

        def model(y=None):
            mu = numpyro.sample("mu", dist.Normal(0, 1))
            with numpyro.plate("N", 10):
                numpyro.sample("y", dist.Normal(mu, 1), obs=y)

        structure = inspect_model(model, y=jnp.zeros(10))
        assert [s.name for s in structure.latents] == ["mu"]
    """
    observed = set(observed or ())
    k_sites, k_check = jax.random.split(jax.random.PRNGKey(0) if rng_key is None else rng_key)
    tr = _model_trace(model, k_sites, args, kwargs)
    sites = [s for s in tr.values() if s["type"] == "sample"]
    names = {s["name"] for s in sites}
    unknown = observed - names
    if unknown:
        raise ValueError(f"observed={sorted(unknown)} names no sample site of the model; "
                         f"its sample sites are {sorted(names)}.")
    factors = [s["name"] for s in sites if type(s["fn"]).__name__ == "Unit"]
    if factors:
        raise ValueError(
            f"The model adds numpyro.factor term(s) {factors}. Simulations from the model's "
            "prior predictive do not see a factor, so the guide would learn a posterior without "
            "it. Write the term as a distribution of observed data instead (for a marginalized "
            "discrete variable, e.g. dist.MixtureSameFamily), or drop it.")
    obs_sites = [s for s in sites if s["is_observed"] or s["name"] in observed]
    lat_sites = [s for s in sites if not (s["is_observed"] or s["name"] in observed)
                 and not s.get("infer", {}).get("is_auxiliary", False)]
    if not obs_sites:
        raise ValueError(
            "The model has no observed site, so there is nothing to condition the posterior on. "
            "Call it with data for its observed sites (numpyro.sample(name, d, obs=value)) as "
            "you would for MCMC, or name them with observed=[...]."
        )
    if not lat_sites:
        raise ValueError("The model has no latent sample site: there is no posterior to learn.")
    for s in lat_sites:
        if s["fn"].support.is_discrete:
            raise ValueError(
                f"Latent site '{s['name']}' has a discrete support ({type(s['fn']).__name__}). "
                "A normalizing flow models continuous latents only: marginalize the discrete "
                "variable out of the observations' distribution (e.g. a mixture written as "
                "dist.MixtureSameFamily(dist.Categorical(probs), component_dist), observed), "
                "or make it observed."
            )
    _check_static_supports(model, k_check, args, kwargs, lat_sites)

    plate_sizes = {s["name"]: s["args"][0] for s in tr.values() if s["type"] == "plate"}
    latent_plates = {f.name for s in lat_sites for f in s["cond_indep_stack"]}
    if data_plate == "auto":
        candidates = {f.name for s in obs_sites for f in s["cond_indep_stack"]} - latent_plates
        data_plate = max(sorted(candidates), key=lambda p: plate_sizes[p], default=None)
    elif data_plate is not None:
        if data_plate not in plate_sizes:
            raise ValueError(f"data_plate='{data_plate}' is not a plate of the model; its "
                             f"plates are {sorted(plate_sizes)}.")
        if data_plate in latent_plates:
            bad = [s["name"] for s in lat_sites if data_plate in _plates(s)]
            raise ValueError(
                f"Latent site(s) {bad} sit inside plate '{data_plate}', which holds the data. "
                "The amortized guide learns global latents only: move per-observation latents "
                "out of the model (marginalize them) or use a different data_plate."
            )

    latents = []
    for s in lat_sites:
        shape = tuple(jnp.shape(s["value"]))
        t = biject_to(s["fn"].support)
        latents.append(LatentSite(s["name"], shape, s["fn"].support, tuple(t.inverse_shape(shape))))
    obs = []
    for s in obs_sites:
        value = s["value"]
        if value is None:
            raise ValueError(f"Observed site '{s['name']}' has no value in these arguments.")
        shape = tuple(jnp.shape(value))
        axis = None
        for f in s["cond_indep_stack"]:
            if f.name == data_plate:
                axis = len(shape) - s["fn"].event_dim + f.dim
                if not (0 <= axis < len(shape)) or shape[axis] != f.size:
                    raise ValueError(
                        f"Observed site '{s['name']}' with shape {shape} does not have plate "
                        f"'{data_plate}' (size {f.size}) at dim {f.dim}; check the plate's dim."
                    )
        positive, counts = _reading(s["fn"].support)
        obs.append(ObservedSite(s["name"], shape, axis, positive, counts=counts))
    if data_plate is not None and all(o.plate_axis is None for o in obs):
        data_plate = None
    size = plate_sizes[data_plate] if data_plate is not None else None
    lengths = {o.shape[0] for o in obs if o.shape}
    if time_series and data_plate is None and len(lengths) == 1:  # a series from a scan
        size = lengths.pop()
        data_plate = "time"
        obs = [o._replace(plate_axis=0) if o.shape else o for o in obs]
    covariates = []
    if size is not None:
        values = [s["value"] for s in obs_sites]
        for name, value in covariate_values(model, args, kwargs).items():
            if (name in names or any(value is v for v in values) or np.ndim(value) < 1
                    or np.shape(value)[0] != size):
                continue
            covariates.append(ObservedSite(name, tuple(np.shape(value)), 0,
                                           categories=categories_of(value)))
    deterministic = tuple(n for n, s in tr.items() if s["type"] == "deterministic")
    return ModelStructure(tuple(latents), tuple(obs), data_plate, size, tuple(covariates),
                          deterministic)


def _reading(support):
    """(positive continuous, unbounded counts): how the summary network reads the site."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return (isinstance(support, type(constraints.positive)) and not support.is_discrete,
            isinstance(support, type(constraints.nonnegative_integer)))


def _plates(site):
    return {f.name for f in site["cond_indep_stack"]}


def _check_static_supports(model, rng_key, args, kwargs, lat_sites):
    """The flow lives in one fixed unconstrained space, so supports must not move with latents."""
    other = _model_trace(model, rng_key, args, kwargs)
    for s in lat_sites:
        a = jax.tree.leaves(s["fn"].support)
        b = jax.tree.leaves(other[s["name"]]["fn"].support)
        same = len(a) == len(b) and all(
            np.shape(x) == np.shape(y) and np.allclose(x, y) for x, y in zip(a, b)
        )
        if not same:
            raise ValueError(
                f"The support of latent site '{s['name']}' ({s['fn'].support}) changes with the "
                "values of other latents. Reparametrize it with a fixed support, e.g. "
                "x = lower + (upper - lower) * numpyro.sample('u', dist.Uniform(0, 1)) "
                "recorded with numpyro.deterministic."
            )
        if s["fn"].support is constraints.real and not jnp.issubdtype(
            jnp.result_type(s["value"]), jnp.floating
        ):
            raise ValueError(f"Latent site '{s['name']}' is not floating point.")


def simulate(model, rng_key, num_simulations, *args, **kwargs) -> dict:
    """Draw ``num_simulations`` joint samples from the prior predictive of ``model``.

    ``trace(seed(uncondition(model), key))`` under :func:`jax.vmap` over keys: one vectorized
    computation (jit it, or call it inside a jitted function). Observed sites inside
    ``numpyro.contrib.control_flow.scan`` are set to ``None``, as ``Predictive`` does, so that
    simulated values flow through the scan's carry. Binomial sites are drawn with
    :func:`jax.random.binomial` (exact; NumPyro's sampler, vectorized and compiled for CPU,
    can fail to return for some parameter values), whether or not observations are given.

    :return: every sample site's values by name, with a leading axis of ``num_simulations``.

    **Example**::

        sims = simulate(model, jax.random.PRNGKey(0), 1000, y=jnp.zeros(10))
        sims["mu"].shape  # (1000,)
    """
    return simulate_designs(model, rng_key, num_simulations, args, kwargs)


def simulate_designs(model, rng_key, num_simulations, args, kwargs, designs=None) -> dict:
    """:func:`simulate`, with the arguments named in ``designs`` set per simulation."""
    args, kwargs = prior_predictive_arguments(model, args, kwargs)

    def one(key, values):
        a, kw = with_arguments(model, args, kwargs, values) if values else (args, kwargs)
        # LoopSafe outside uncondition, so observed sites reach it unconditioned (value None)
        tr = trace(seed(LoopSafe(uncondition(model)), key)).get_trace(*a, **kw)
        return {n: s["value"] for n, s in tr.items() if s["type"] == "sample"}

    with block():
        return jax.vmap(one)(jax.random.split(rng_key, num_simulations), designs or {})


class _ControlFlow(Messenger):
    """Records whether the model runs ``numpyro.contrib.control_flow`` primitives (scan)."""

    found = False

    def process_message(self, msg):
        if msg["type"] == "control_flow":
            self.found = True


def _sites(tr):
    return {n: tuple(jnp.shape(s["value"])) for n, s in tr.items() if s["type"] == "sample"}


def prior_predictive_arguments(model, args, kwargs, sites=None):
    """The arguments to simulate with: as given, or, for a model with a scan, with the
    arguments that hold observations (named like an observed site, or the very array a site
    observes; only of ``sites`` if given) set to ``None``, checked to give the same sites and
    shapes, as ``numpyro.infer.Predictive`` needs them."""
    spy = _ControlFlow(model)
    with block(), numpyro.validation_enabled(False):
        tr = trace(seed(spy, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    if not spy.found:
        return args, kwargs
    observed = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and s["is_observed"]
                and (sites is None or n in sites)}
    try:
        bound = inspect.signature(model).bind(*args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    names = [n for n, v in (bound.arguments.items() if bound is not None else ())
             if v is not None and (n in observed or any(v is o for o in observed.values()))]
    if names:
        for n in names:
            bound.arguments[n] = None
        args, kwargs = bound.args, bound.kwargs
    try:
        with block(), numpyro.validation_enabled(False):
            again = trace(seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        same = _sites(again) == _sites(tr)
    except Exception:  # noqa: BLE001 - any failure means: cannot simulate it faithfully
        same = False
    if not (names and same):
        raise ValueError(
            f"The model observes sites {sorted(observed)} inside numpyro.contrib.control_flow."
            "scan. Simulating it means calling it without those observations, as Predictive "
            "does (the scan's carry must take the simulated values), but "
            + (f"called with {names} = None it does not give the same sites and shapes. "
               if names else "no argument of the model holds them. ")
            + "Give the observations as an argument named like their site, defaulting to None "
            "(def model(y=None)), and pass length= to scan so the model runs without them.")
    return args, kwargs


class MaskDataPlate(Messenger):
    """Mask the observed sites of the data plate beyond a dataset's size."""

    def __init__(self, fn, plate, mask):
        self.plate, self.mask = plate, mask
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or not msg["is_observed"]:
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate:
                m = jnp.reshape(self.mask, self.mask.shape + (1,) * (-frame.dim - 1))
                msg["fn"] = msg["fn"].mask(m)
