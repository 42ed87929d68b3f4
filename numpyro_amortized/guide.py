"""AutoAmortizedFlow: an amortized NumPyro autoguide.

The guide is ``q(theta | x)``: a summary network turns the observed data ``x`` into a vector,
which conditions a normalizing flow over the model's latents in unconstrained space. It is a
:class:`numpyro.infer.autoguide.AutoGuide`, so it works in ``numpyro.infer.SVI`` and
``numpyro.infer.Predictive``; after training, the posterior of a new dataset is one forward pass.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.distributions import constraints
from numpyro.handlers import condition
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from numpyro_amortized.data import DataBatch, DataLayout, Simulations, pilot_statistics
from numpyro_amortized.networks.factories import (
    default_flow,
    describe_factory,
    factory_from_description,
)
from numpyro_amortized.networks.flows import ConditionalFlow, StackedFlows, mixture_log_weights
from numpyro_amortized.networks.posterior import AmortizedPosterior
from numpyro_amortized.networks.summary import default_summary_net
from numpyro_amortized.simulation import inspect_model, observed_values, simulate
from numpyro_amortized.transforms import LatentLayout

__all__ = ["AutoAmortizedFlow"]

_MIN_LOG_WEIGHT = -30.0  # a flow-ensemble member's weight never goes to exactly zero


class _MaskDataPlate(Messenger):
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


class _FlowPosterior(dist.Distribution):
    """The flow given one dataset, as a NumPyro distribution over the flat latent vector."""

    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior, data: DataBatch, dim):
        self._posterior, self._data = posterior, data
        super().__init__(batch_shape=(), event_shape=(dim,))

    def sample(self, key, sample_shape=()):
        u, _ = self._posterior.sample_and_log_prob(key, self._data, tuple(sample_shape))
        return u[..., 0, :]

    rsample = sample

    def log_prob(self, value):
        return self._posterior.log_prob(value[None], self._data)[0]


class AutoAmortizedFlow(AutoGuide):
    """An amortized posterior ``q(theta | x)`` for a NumPyro model, as an autoguide.

    A summary network (Flax NNX) turns the model's observed sites into a fixed-length vector;
    a conditional normalizing flow over the model's latents (in unconstrained space, so every
    sample is inside the support) is conditioned on it. Train it with
    :func:`~numpyro_amortized.fit` or ``numpyro.infer.SVI`` with the
    :class:`~numpyro_amortized.NPE` or :class:`~numpyro_amortized.AmortizedELBO` loss, on
    datasets simulated from the model itself; then the posterior of any new dataset is one call.

    :param model: a NumPyro model. Call the guide (and :func:`fit`) with the arguments you would
        call the model with for one dataset of the largest size you want to handle: observed
        sites must have values (``obs=``), which fixes their shapes; those values are not used
        for training (they are simulated). Every other argument (a covariate matrix, group
        indices) is used as given in every simulation, and the summary network does not see
        it: to amortize over covariates, write them as observed sites
        (``numpyro.sample("x", prior, obs=x)``), as the quick start does.
    :param summary_net: a summary-network class or ``functools.partial`` of one, called as
        ``summary_net(spec, rngs=rngs)`` (see :mod:`numpyro_amortized.networks.summary`); by
        default a :class:`~numpyro_amortized.networks.DeepSet` for observations in a plate (a
        :class:`~numpyro_amortized.networks.TimeSeriesNet` with ``time_series=True``) and
        the data themselves (:class:`~numpyro_amortized.networks.Identity`) or an MLP otherwise.
    :param flow: a flow factory ``flow(dim, context_dim, *, loc, scale, rngs)``. Default
        (``None``): chosen at set-up by :func:`default_flow` for how the guide is trained: a
        :func:`~numpyro_amortized.networks.spline_flow` online, and on a fixed simulation
        budget (:func:`fit` with ``num_simulations``) an
        :func:`~numpyro_amortized.networks.ensemble_flow` (see :func:`fixed_budget_flow`),
        which over-fits a finite bank less than any one flow alone. This attribute stays
        ``None``; :attr:`flow_factory` is what was built.
    :param observed: names of sites to treat as observed even without ``obs=``.
    :param data_plate: the plate of exchangeable observations (``"auto"``: found from the model).
    :param set_sizes: ``(min, max)`` dataset sizes to train on. ``max`` must be the plate size in
        the arguments; each simulated dataset keeps its first ``n`` observations, ``n`` uniform in
        ``[min, max]`` (exact for conditionally independent observations). Default: fixed size.
    :param time_series: the data plate is a time axis (observations in order, conditionally
        independent given the latents, e.g. noisy counts around an ODE solution): the default
        summary network is then a :class:`~numpyro_amortized.networks.TimeSeriesNet` instead of
        a DeepSet, and with ``set_sizes`` a series of ``n`` steps is its first ``n`` time points.
    :param num_pilot_simulations: simulations used once to standardize latents and data.
    :param prefix: prefix of the parameter site.

    **Example**::

        import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        from numpyro_amortized import AutoAmortizedFlow, fit

        def model(y=None):
            mu = numpyro.sample("mu", dist.Normal(0, 1))
            with numpyro.plate("N", 10):
                numpyro.sample("y", dist.Normal(mu, 1), obs=y)

        guide = AutoAmortizedFlow(model)
        result = fit(guide, jax.random.PRNGKey(0), y=jnp.zeros(10), num_steps=1000)
        draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params,
                                       y=jnp.ones(10), sample_shape=(1000,))

    **References:** Radev et al. (2020), *BayesFlow: Learning complex stochastic models with
    invertible neural networks*, IEEE TNNLS; Papamakarios & Murray (2016), *Fast epsilon-free
    inference of simulation models with Bayesian conditional density estimation*, NeurIPS.
    """

    def __init__(self, model, *, summary_net=None, flow=None, observed=None, data_plate="auto",
                 set_sizes=None, time_series=False, num_pilot_simulations=4096, prefix="auto"):
        super().__init__(model, prefix=prefix)
        self.summary_net = summary_net
        self.flow = flow
        self.observed = tuple(observed or ())
        self.data_plate = data_plate
        self.set_sizes = None if set_sizes is None else (int(set_sizes[0]), int(set_sizes[1]))
        self.time_series = bool(time_series)
        self.num_pilot_simulations = int(num_pilot_simulations)
        self.structure = None
        self.init_params = None

    # ------------------------------------------------------------------ set-up
    @property
    def param_name(self) -> str:
        """Name of the ``numpyro.param`` site that holds the network parameters."""
        return f"{self.prefix}_amortized$params"

    @property
    def is_setup(self) -> bool:
        """Whether the networks are built (by :func:`fit`, ``SVI``, :meth:`setup` or ``load``)."""
        return self.structure is not None

    @property
    def model_args(self) -> tuple:
        """``(args, kwargs)``: the model arguments the guide was set up with."""
        self._check_setup()
        return self._args, self._kwargs

    @property
    def flow_factory(self):
        """The flow factory the networks were built with: ``flow`` when given, otherwise the
        default chosen at set-up (:func:`default_flow`)."""
        self._check_setup()
        return self._flow_factory

    def setup(self, rng_key, *args, **kwargs):
        """Inspect the model, standardize from pilot simulations, build the networks.

        Called once, eagerly (``fit`` and the first call under ``SVI`` do it). Returns the
        initial network parameters (a pure dict). The default flow is the one for online
        training; :func:`fit` on a fixed budget calls :meth:`initialize` with the budget.
        """
        return self.initialize(rng_key, args, kwargs)

    def initialize(self, rng_key, args=(), kwargs=None, *, num_train_simulations=None,
                   state=None):
        """Set the guide up for the model arguments ``args``/``kwargs``.

        :param num_train_simulations: ``None`` for online training, or the size of a fixed
            bank of training simulations: the default flow depends on it (see
            :func:`default_flow`); a ``flow`` given to the constructor is used as it is.
        :param state: a :meth:`state_dict` (from a checkpoint): the guide is rebuilt with its
            standardization, set-up key and flow, without pilot simulations.
        :return: the initial network parameters (a pure dict). A guide already set up returns
            its parameters unchanged.
        """
        kwargs = dict(kwargs or {})
        if self.structure is not None:
            return self.init_params
        if state is None:
            factory = self.flow if self.flow is not None else default_flow(num_train_simulations)
            return self._build(rng_key, args, kwargs, factory)
        factory = self.flow if self.flow is not None else factory_from_description(state["flow"])
        return self._build(jnp.asarray(state["setup_key"]), args, kwargs, factory,
                           stats=state["stats"], buffers=state["buffers"])

    def state_dict(self) -> dict:
        """What rebuilds this guide's networks without pilot simulations (parameters apart):
        the set-up key, the standardization, the buffers, the model's structure fingerprint and
        the chosen flow. Arrays, numbers and strings only (see :mod:`~numpyro_amortized.checkpoint`).
        """
        self._check_setup()
        return {
            "setup_key": np.asarray(self._setup_key, np.uint32),
            "stats": self._stats,
            "buffers": nnx.to_pure_dict(self._buffers),
            "fingerprint": self.structure.fingerprint(),
            "flow": describe_factory(self._flow_factory),
        }

    def load_buffers(self, buffers):
        """Set the networks' buffers (standardization constants) from a pure dict, as
        :meth:`state_dict` gives them."""
        self._check_setup()
        nnx.replace_by_pure_dict(self._buffers, buffers)

    def reset(self):
        """Forget the set-up: the next use builds the networks anew."""
        self.structure = None
        self.init_params = None

    def _build(self, rng_key, args, kwargs, flow_factory, stats=None, buffers=None):
        """Set-up proper; ``stats`` and ``buffers`` (from a state dict) replace the pilot."""
        structure = inspect_model(
            self.model, *args, observed=self.observed, data_plate=self.data_plate, **kwargs
        )
        plate_size = structure.data_plate_size
        if self.set_sizes is not None:
            if plate_size is None:
                raise ValueError("set_sizes was given but the model has no plate of observations.")
            lo, hi = self.set_sizes
            if not 1 <= lo <= hi or hi != plate_size:
                raise ValueError(
                    f"set_sizes={self.set_sizes}: need 1 <= min <= max, and max equal to the size "
                    f"of plate '{structure.data_plate}' in the arguments ({plate_size}). Call the "
                    "guide with data of the largest size."
                )
        self.latent_layout = LatentLayout(structure.latents)
        self.data_layout = DataLayout(structure.observed, plate_size)
        self.structure = structure
        try:
            return self._build_networks(rng_key, args, kwargs, flow_factory, stats, buffers)
        except BaseException:
            self.structure = None  # a failed set-up leaves the guide as it was
            raise

    def _build_networks(self, rng_key, args, kwargs, flow_factory, stats, buffers):
        self._args, self._kwargs = args, kwargs
        self._setup_key = np.asarray(rng_key)
        k_pilot, k_net = jax.random.split(rng_key)
        if stats is None:
            n = self.num_pilot_simulations
            pilot = jax.jit(lambda k: self.simulate(k, n, *args, **kwargs))(k_pilot)
            stats = pilot_statistics(pilot)
        self._stats = stats
        summary_cls = self.summary_net or default_summary_net(self.data_layout.spec,
                                                              time_series=self.time_series)
        rngs = nnx.Rngs(k_net)
        summary = summary_cls(self.data_layout.spec, rngs=rngs)
        self._accepts_variable_size = bool(getattr(summary, "accepts_variable_size", False))
        self._flow_factory = flow_factory
        flow = flow_factory(self.latent_layout.dim, summary.summary_dim,
                            loc=stats["u_loc"], scale=stats["u_scale"], rngs=rngs)
        posterior = AmortizedPosterior(summary, flow, stats["data"])
        self._graphdef, params, self._buffers = nnx.split(posterior, nnx.Param, ...)
        if buffers is not None:
            nnx.replace_by_pure_dict(self._buffers, buffers)
        self._param_template = params
        self.init_params = nnx.to_pure_dict(params)
        self._param_structure = jax.tree.structure(self.init_params)
        self._sample_batch_jit = jax.jit(self._sample_batch,
                                         static_argnames=("sample_shape", "chunk"))
        self._log_prob_batch_jit = jax.jit(self._log_prob_batch)
        self._embed_batch_jit = jax.jit(self._embed_batch)
        return self.init_params

    def _check_setup(self):
        if self.structure is None:
            raise RuntimeError(
                "The guide has not been set up: train it with fit(guide, ...) or SVI first, "
                "or call guide.setup(rng_key, *model_args)."
            )

    def posterior(self, params) -> AmortizedPosterior:
        """The posterior network with ``params`` (a pure dict, or SVI's param dict)."""
        self._check_setup()
        params = self.network_params(params)
        state = jax.tree.map(lambda x: x, self._param_template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self._graphdef, state, self._buffers)

    def network_params(self, params) -> dict:
        """The networks' parameters (a pure dict) from ``params``: ``fit(...).params``, SVI's
        ``svi.get_params(state)``, or the pure dict itself. Raises a clear error when they do
        not fit this guide's networks (missing or extra entries, other shapes)."""
        self._check_setup()
        if isinstance(params, dict) and self.param_name in params:
            params = params[self.param_name]
        if jax.tree.structure(params) != self._param_structure:
            want = {jax.tree_util.keystr(p) for p, _ in
                    jax.tree_util.tree_flatten_with_path(self.init_params)[0]}
            got = {jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0]}
            missing, extra = sorted(want - got), sorted(got - want)
            raise ValueError(
                f"The parameters do not fit this guide's networks (missing: {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}; unexpected: {extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}). Pass the parameters this guide was trained "
                f"with: fit(...).params, or svi.get_params(state) with the '{self.param_name}' "
                "entry."
            )
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                     jax.tree.leaves(self.init_params), strict=True):
            if jnp.shape(got) != jnp.shape(want):
                raise ValueError(
                    f"Parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(got)}; this "
                    f"guide's networks need {jnp.shape(want)}. Pass the parameters this guide "
                    "was trained with."
                )
        return params

    def set_mixture_weights(self, params, member_log_probs):
        """``params`` with a flow ensemble's mixture weights fitted to ``(K, N)`` held-out
        member log densities (EM, see :func:`~numpyro_amortized.networks.flows.mixture_log_weights`);
        a single flow's parameters come back unchanged. Host-side; ``fit`` calls it at the end."""
        if member_log_probs is None:
            return params
        outer = isinstance(params, dict) and self.param_name in params
        posterior = self.posterior(params)
        log_w = np.maximum(mixture_log_weights(np.asarray(member_log_probs)), _MIN_LOG_WEIGHT)
        posterior.flow.log_weights.set_value(jnp.asarray(log_w, jnp.float32))
        new = nnx.to_pure_dict(nnx.state(posterior, nnx.Param))
        return {**params, self.param_name: new} if outer else new

    # ------------------------------------------------------------------ simulation
    def simulate(self, rng_key, num_simulations, *args, **kwargs) -> Simulations:
        """Simulate ``num_simulations`` datasets from the prior predictive, encoded for training.

        Jittable (``num_simulations`` static). With ``set_sizes``, each dataset gets a random
        size and the observations beyond it are masked.
        """
        self._check_setup()
        k_sim, k_size = jax.random.split(rng_key)
        sims = simulate(self.model, k_sim, num_simulations, *args, **kwargs)
        latents = {s.name: sims[s.name] for s in self.latent_layout.sites}
        observed = {s.name: sims[s.name] for s in self.data_layout.sites}
        num_obs = None
        if self.structure.data_plate is not None:
            if self.set_sizes is not None:
                lo, hi = self.set_sizes
                num_obs = jax.random.randint(k_size, (num_simulations,), lo, hi + 1)
            else:
                num_obs = jnp.full((num_simulations,), self.structure.data_plate_size)
        data = self.data_layout.encode(observed, num_obs)
        u = self.latent_layout.unconstrain(latents)
        finite = [jnp.all(jnp.isfinite(u), axis=-1)]
        for x in (data.set, data.flat):
            if x is not None:
                finite.append(jnp.all(jnp.isfinite(x.reshape(num_simulations, -1)), axis=-1))
        valid = functools.reduce(jnp.logical_and, finite)
        clean = lambda x: jnp.where(
            jnp.reshape(valid, valid.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype)
        )
        u = clean(u)
        _, log_det = self.latent_layout.constrain(u)
        data = DataBatch(*(None if x is None else clean(x) for x in data))
        return Simulations(
            jax.tree.map(clean, latents), u, log_det, jax.tree.map(clean, observed), data,
            num_obs, valid,
        )

    def model_log_density(self, latents, observed, num_obs, *args, **kwargs):
        """``log p(theta, x)`` of the model for one dataset (masked beyond ``num_obs``)."""
        model = condition(self.model, data=observed)
        if num_obs is not None:
            mask = jnp.arange(self.structure.data_plate_size) < num_obs
            model = _MaskDataPlate(model, self.structure.data_plate, mask)
        return log_density(model, args, kwargs, latents)[0]

    # ------------------------------------------------------------------ data
    def observed_data(self, *args, **kwargs) -> dict:
        """The observed values in the model's arguments, checked against the trained shapes."""
        self._check_setup()
        values = observed_values(self.model, *args, **kwargs)
        data = {s.name: values[s.name] for s in self.data_layout.sites if s.name in values}
        self.data_layout.check(data, allow_other_sizes=self._accepts_variable_size)
        self._warn_size(self.data_layout.set_size(data))
        return data

    def _warn_size(self, n, stacklevel=3):
        if n is None or self.structure.data_plate is None:
            return
        lo, hi = self.set_sizes or (self.structure.data_plate_size,) * 2
        if not lo <= n <= hi:
            warnings.warn(
                f"The dataset has {n} observations in plate '{self.structure.data_plate}' but the "
                f"guide was trained on {lo} to {hi}: the answer is an extrapolation. Train with "
                "set_sizes covering this size to rely on it.",
                UserWarning, stacklevel=stacklevel,
            )

    def _encode(self, data, num_obs=None):
        n = self.data_layout.set_size(data, batch_ndim=1)
        pad = max(n, self.data_layout.max_set_size) if n is not None else None
        return self.data_layout.encode(data, num_obs, pad_to=pad)

    def _batch_inputs(self, data, num_obs):
        """A batch of datasets checked and as arrays: the sites the guide reads (no more, no
        fewer), a non-empty batch, and sizes within the padded size."""
        self._check_setup()
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict from observed site name to values with a "
                            f"leading dataset axis; got {type(data).__name__}.")
        names = [site.name for site in self.data_layout.sites]
        extra = sorted(set(data) - set(names))
        if extra:
            raise ValueError(f"data has entries {extra} that are not observed sites of the "
                             f"model; the guide reads {names}.")
        data = {k: jnp.asarray(v) for k, v in data.items()}
        self.data_layout.check(data, batch_ndim=1, allow_other_sizes=self._accepts_variable_size)
        sizes = {np.shape(v)[0] if np.ndim(v) else None for v in data.values()}
        if sizes == {0} or None in sizes:
            raise ValueError("data holds no datasets: give each site a leading dataset axis of "
                             "length >= 1.")
        n = self.data_layout.set_size(data, batch_ndim=1)
        if num_obs is not None:
            num_obs = jnp.asarray(num_obs)
            b = next(iter(sizes))
            if n is None:
                raise ValueError("num_obs was given but the model has no plate of observations.")
            if (num_obs.shape != (b,) or not jnp.issubdtype(num_obs.dtype, jnp.integer)
                    or bool(jnp.any(num_obs < 1)) or bool(jnp.any(num_obs > n))):
                raise ValueError(f"num_obs: need {b} integers between 1 and the padded size {n} "
                                 f"(one per dataset); got {np.asarray(num_obs)!r}.")
            self._warn_size(int(jnp.max(num_obs)), stacklevel=4)
            self._warn_size(int(jnp.min(num_obs)), stacklevel=4)
        else:
            self._warn_size(n, stacklevel=4)
        return data, num_obs

    # ------------------------------------------------------------------ core (jittable)
    def _sample_batch(self, rng_key, params, data, num_obs, sample_shape, chunk):
        """Draws for every dataset; over ``chunk`` datasets at a time (``lax.map``) when there
        are more, so the flow's intermediates stay bounded however many datasets there are."""
        posterior = self.posterior(params)
        num = next(iter(data.values())).shape[0]

        def draw(key, data, num_obs):
            u, _ = posterior.sample_and_log_prob(key, self._encode(data, num_obs), sample_shape)
            return jnp.moveaxis(u, len(sample_shape), 0)  # (datasets, *sample_shape, D)

        if num <= chunk:
            u = draw(rng_key, data, num_obs)
        else:
            n_chunks = -(-num // chunk)
            pad = lambda x: jnp.pad(x, [(0, n_chunks * chunk - num)] + [(0, 0)] * (x.ndim - 1),
                                    mode="edge").reshape((n_chunks, chunk) + x.shape[1:])
            xs = (jax.random.split(rng_key, n_chunks), jax.tree.map(pad, data),
                  None if num_obs is None else pad(num_obs))
            u = jax.lax.map(lambda a: draw(*a), xs)
            u = u.reshape((n_chunks * chunk,) + u.shape[2:])[:num]
        draws, _ = self.latent_layout.constrain(u)
        finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
        return draws, jnp.all(jnp.stack(finite)), jnp.all(jnp.isfinite(u))

    def _log_prob_batch(self, params, latents, data, num_obs):
        u, log_det = self.latent_layout.unconstrain_with_log_det(latents)
        return self.posterior(params).log_prob(u, self._encode(data, num_obs)) - log_det

    def _embed_batch(self, params, data, num_obs):
        return self.posterior(params).embed(self._encode(data, num_obs))

    def log_prob_simulations(self, params, sims: Simulations):
        """``log q(theta_i | x_i)`` for each simulation."""
        return self.posterior(params).log_prob(sims.u, sims.data) - sims.log_det

    def training_log_prob_simulations(self, params, sims: Simulations):
        """What the NPE loss maximizes for each simulation: ``log q(theta_i | x_i)``, or with a
        :class:`~numpyro_amortized.networks.FlowEnsemble` the mean of its members' (each
        member is trained as if alone; the posterior is their mixture)."""
        return self.posterior(params).training_log_prob(sims.u, sims.data) - sims.log_det

    def weight_decay(self, params):
        """Each parameter's decoupled weight decay, a tree like ``params`` (a pure dict, or
        SVI's param dict): the ``weight_decay`` of the flow it belongs to (see
        :func:`~numpyro_amortized.networks.coupling_flow`), 0 elsewhere. Static: it depends
        on the networks' structure only, not on the values."""
        self._check_setup()
        module = nnx.merge(self._graphdef, self._param_template, self._buffers)
        decays = {}  # path of a flow -> the decay of a parameter leaf under it
        for path, node in nnx.iter_graph(module):
            if isinstance(node, StackedFlows) and any(node.weight_decays):
                decays[tuple(path)] = node.decay_of_leaf  # one decay per stacked member
            elif isinstance(node, ConditionalFlow) and node.weight_decay:
                decays[tuple(path)] = lambda leaf, w=node.weight_decay: w
        prefix = (self.param_name,) if self.network_params(params) is not params else ()

        def decay(path, leaf):
            keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            keys = keys[len(prefix):]
            return next((decays[keys[:n]](leaf) for n in range(len(keys), 0, -1)
                         if keys[:n] in decays), 0.0)

        return jax.tree_util.tree_map_with_path(decay, params)

    def member_log_prob_simulations(self, params, sims: Simulations):
        """``(K, B)`` log densities of each member of a flow ensemble for each simulation, or
        ``None`` when the flow is not an ensemble."""
        lps = self.posterior(params).member_log_probs(sims.u, sims.data)
        return None if lps is None else lps - sims.log_det

    # ------------------------------------------------------------------ public API
    def __call__(self, *args, **kwargs):
        """Sample the latents given the data in ``args``/``kwargs`` (as NumPyro guides do)."""
        if self.structure is None:
            key = numpyro.prng_key()
            self.setup(key if key is not None else jax.random.PRNGKey(0), *args, **kwargs)
        params = numpyro.param(self.param_name, self.init_params)
        data = self.observed_data(*args, **kwargs)
        batch = self._encode({k: jnp.asarray(v)[None] for k, v in data.items()})
        u = numpyro.sample(
            f"_{self.prefix}_latent",
            _FlowPosterior(self.posterior(params), batch, self.latent_layout.dim),
            infer={"is_auxiliary": True},
        )
        values, log_dets = self.latent_layout.constrain_sites(u)
        result = {}
        for site in self.latent_layout.sites:
            result[site.name] = numpyro.sample(
                site.name,
                dist.Delta(values[site.name], log_density=-log_dets[site.name],
                           event_dim=len(site.shape)),
            )
        return result

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw posterior samples for the dataset in ``args``/``kwargs``.

        :param rng_key: a PRNG key.
        :param params: the trained parameters (``fit(...).params`` or ``svi.get_params``).
        :param sample_shape: leading shape of the draws.
        :return: dict from latent site name to values of shape ``sample_shape + site_shape``.
        """
        data = self.observed_data(*args, **kwargs)
        out = self._draw(rng_key, params, {k: jnp.asarray(v)[None] for k, v in data.items()},
                         None, sample_shape)
        return {k: v[0] for k, v in out.items()}

    def sample_posterior_batch(self, rng_key, params, data, *, sample_shape=(), num_obs=None):
        """Posterior draws for a batch of datasets in one vectorized call.

        :param data: dict from observed site name to values with a leading dataset axis
            (``(num_datasets, *site_shape)``); all datasets padded to one set size.
        :param num_obs: optional ``(num_datasets,)`` sizes; observations beyond are padding.
        :return: dict from latent site name to ``(num_datasets, *sample_shape, *site_shape)``.

        **Example**::

            draws = guide.sample_posterior_batch(key, params, {"y": Y}, sample_shape=(1000,))
        """
        data, num_obs = self._batch_inputs(data, num_obs)
        return self._draw(rng_key, params, data, num_obs, sample_shape)

    def _draw(self, rng_key, params, data, num_obs, sample_shape):
        # datasets per chunk: about 2^18 draws at a time bounds the flow's intermediates (a
        # few hundred MB) while keeping each chunk large enough to run at full speed
        per_dataset = max(1, math.prod(sample_shape))
        chunk = max(1, 2**18 // per_dataset)
        draws, params_ok, draws_ok = self._sample_batch_jit(
            rng_key, self.network_params(params), data, num_obs,
            sample_shape=tuple(sample_shape), chunk=chunk)
        if not params_ok:
            raise ValueError(
                "The parameters contain NaN or infinity, so every draw would be NaN: training "
                "diverged, or the parameters were changed. Train again (a smaller learning_rate "
                "helps), or use the parameters of an earlier checkpoint.")
        if not draws_ok:
            warnings.warn(
                "Some posterior draws are NaN or infinite: the data may be far outside what the "
                "guide was trained on (check the data's scale against the prior predictive).",
                UserWarning, stacklevel=3)
        return draws

    def log_prob(self, params, latents, *args, **kwargs):
        """``log q(theta | x)``: the density of constrained latent values given the data in
        ``args``/``kwargs``; ``latents`` may have leading sample dims."""
        data = self.observed_data(*args, **kwargs)
        latents = {k: jnp.asarray(v)[None] for k, v in latents.items()}
        data = {k: jnp.asarray(v)[None] for k, v in data.items()}
        return self._log_prob_batch_jit(self.network_params(params), latents, data, None)[0]

    def log_prob_batch(self, params, latents, data, num_obs=None):
        """``log q(theta | x)`` for a batch of datasets; ``latents`` shaped
        ``(num_datasets, *sample_shape, *site_shape)``."""
        data, num_obs = self._batch_inputs(data, num_obs)
        latents = {k: jnp.asarray(v) for k, v in latents.items()}
        return self._log_prob_batch_jit(self.network_params(params), latents, data, num_obs)

    def summary_statistics_batch(self, params, data, num_obs=None):
        """The summary network's output ``(num_datasets, summary_dim)`` for a batch of datasets
        (the learned summary statistics, e.g. for misspecification checks).

        :param data: observed values with a leading dataset axis, as in
            :meth:`sample_posterior_batch`.
        """
        data, num_obs = self._batch_inputs(data, num_obs)
        return self._embed_batch_jit(self.network_params(params), data, num_obs)

    def quantiles(self, params, quantiles, *args, rng_key=None, num_samples=4000, **kwargs):
        """Posterior quantiles of each latent for the data in ``args``, by Monte Carlo.

        :param quantiles: a sequence of levels in ``(0, 1)``.
        :param rng_key: key for the draws (default ``PRNGKey(0)``, so the result is repeatable).
        :return: dict from site name to ``(len(quantiles), *site_shape)``.
        """
        q = np.asarray(quantiles, dtype=float)
        if q.ndim != 1 or q.size == 0 or not np.all((q > 0) & (q < 1)):
            raise ValueError(f"quantiles={quantiles!r}: need a sequence of levels in (0, 1), "
                             "e.g. [0.05, 0.5, 0.95].")
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        draws = self.sample_posterior(key, params, *args, sample_shape=(num_samples,), **kwargs)
        q = jnp.asarray(q)
        return {k: jnp.quantile(v, q, axis=0) for k, v in draws.items()}

    def median(self, params, *args, rng_key=None, num_samples=4000, **kwargs):
        """Posterior median of each latent for the data in ``args`` (see :meth:`quantiles`)."""
        q = self.quantiles(params, [0.5], *args, rng_key=rng_key, num_samples=num_samples,
                           **kwargs)
        return {k: v[0] for k, v in q.items()}
