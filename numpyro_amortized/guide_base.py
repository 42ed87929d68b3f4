"""The machinery under :class:`~numpyro_amortized.AutoAmortizedFlow`: set-up (model structure,
pilot standardization, networks), its public state, simulation, and the jitted batch cores.

:class:`AmortizedGuideBase` holds no NumPyro surface of its own; ``guide.py`` adds it (``__call__``,
``sample_posterior``, ``quantiles``, ...), so the two files read one concept each.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numpyro.handlers import condition
from numpyro.infer.util import log_density

from numpyro_amortized.data import DataLayout, Simulations, pilot_statistics, raw_counts
from numpyro_amortized.design import (
    covariate_values,
    draw_designs,
    warn_other_design,
    warn_unpaired_rows,
)
from numpyro_amortized.group_data import GROUP_COUNT, encode_groups, group_setup, pad_groups
from numpyro_amortized.guide_groups import GroupsMixin
from numpyro_amortized.networks.factories import (
    default_flow,
    describe_factory,
    factory_from_description,
    local_flow_factory,
)
from numpyro_amortized.networks.flows import mixture_log_weights
from numpyro_amortized.networks.hierarchical import hierarchical_posterior
from numpyro_amortized.networks.posterior import AmortizedPosterior
from numpyro_amortized.networks.summary import default_summary_net
from numpyro_amortized.param_check import check_params
from numpyro_amortized.predictive import split_responses
from numpyro_amortized.programs import Programs, observed_values_compiled, simulate_in_blocks
from numpyro_amortized.simulation import MaskDataPlate, inspect_model, simulate_designs
from numpyro_amortized.summary_range import SummaryRange
from numpyro_amortized.transforms import LatentLayout

__all__ = ["AmortizedGuideBase"]


class AmortizedGuideBase(GroupsMixin):
    """Set-up, state, simulation and the batch cores of an amortized guide (see
    :class:`~numpyro_amortized.AutoAmortizedFlow`, which is the class to use)."""

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
        default chosen at set-up (:func:`default_flow`; with ``learned_interval=True`` for a
        hierarchical guide)."""
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
                           stats=state["stats"], buffers=state["buffers"],
                           local_flow=state.get("local_flow"))

    def state_dict(self) -> dict:
        """What rebuilds this guide's networks without pilot simulations (parameters apart):
        the set-up key, the standardization, the buffers, the model's structure fingerprint and
        the chosen flow; arrays, numbers and strings only (:mod:`~numpyro_amortized.checkpoint`)."""
        self._check_setup()
        return {
            "setup_key": np.asarray(self._setup_key, np.uint32),
            "stats": self._stats,
            "buffers": nnx.to_pure_dict(self._buffers),
            "fingerprint": self.structure.fingerprint(),
            "flow": describe_factory(self._flow_factory),
            "local_flow": describe_factory(self._local_flow_factory),  # None for a flat guide
        }

    def load_buffers(self, buffers):
        """Set the networks' buffers (standardization constants) from a :meth:`state_dict`'s."""
        self._check_setup()
        nnx.replace_by_pure_dict(self._buffers, buffers)

    def reset(self):
        """Forget the set-up: the next use builds the networks anew."""
        self.structure = None
        self.init_params = None

    def _build(self, rng_key, args, kwargs, flow_factory, stats=None, buffers=None,
               local_flow=None):
        """Set-up proper; ``stats`` and ``buffers`` (from a state dict) replace the pilot."""
        structure = inspect_model(self.model, *args, observed=self.observed, rng_key=rng_key,
                                  data_plate=self.data_plate, time_series=self.time_series, **kwargs)
        if stats is not None and not stats.get("log_counts"):  # a checkpoint that read counts raw
            structure = raw_counts(structure)
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
        responses, fixed = split_responses(self.model, structure, args, kwargs)
        self.data_layout = DataLayout(responses, plate_size, fixed + structure.covariates)
        self.groups = group_setup(self.model, args, kwargs, structure, self.latent_layout,
                                  option=self.hierarchical, rng_key=rng_key,
                                  set_sizes=self.set_sizes, num_groups=self.num_groups)
        self.structure = structure
        try:
            return self._build_networks(rng_key, args, kwargs, flow_factory, stats, buffers,
                                        local_flow)
        except BaseException:
            self.structure = None  # a failed set-up leaves the guide as it was
            raise

    def _build_networks(self, rng_key, args, kwargs, flow_factory, stats, buffers, local_flow):
        self._args, self._kwargs = args, kwargs
        given = self._covariates(args, kwargs)  # those a declared design draws are not fixed
        drawn = draw_designs(self.design, rng_key, 1, given) if self.design is not None else {}
        self._design = {k: np.asarray(v, np.float64) for k, v in given.items() if k not in drawn}
        self._setup_key = np.asarray(rng_key)
        k_pilot, k_net = jax.random.split(rng_key)
        self.programs = Programs()  # compiled programs on this guide (simulation, checks)
        fresh = stats is None  # a fresh set-up (not from a state dict)
        if fresh:
            if self.flow is None and self.groups is not None:  # the default, hierarchical
                flow_factory = functools.partial(flow_factory, learned_interval=True)
            pilot = simulate_in_blocks(self.programs, self.simulate, k_pilot,
                                       self.num_pilot_simulations, args, kwargs)
            stats = pilot_statistics(pilot)
            if self.summary_net is None and not self.time_series and not given:
                warn_unpaired_rows(pilot, self.data_layout.spec.set_features,  # pooled rows
                                   self.structure.data_plate, stacklevel=4)
        self._stats = stats
        summary_cls = self.summary_net or default_summary_net(self.data_layout.spec,
                                                              time_series=self.time_series)
        rngs = nnx.Rngs(k_net)
        summary = summary_cls(self.data_layout.spec, rngs=rngs)
        self._accepts_variable_size = bool(getattr(summary, "accepts_variable_size", False))
        self._flow_factory, self._local_flow_factory = flow_factory, None
        if self.groups is None:
            flow = flow_factory(self.latent_layout.dim, summary.summary_dim,
                                loc=stats["u_loc"], scale=stats["u_scale"], rngs=rngs)
            posterior = AmortizedPosterior(summary, flow, stats["data"])
        else:  # the local flow a state names; for a state naming none, the flow's own layers
            local = (factory_from_description(local_flow) if local_flow else local_flow_factory(
                flow_factory, len(self.groups.local_idx[0]) if fresh else None))
            self._local_flow_factory = local
            posterior = hierarchical_posterior(summary, flow_factory, self.groups, stats, rngs, local)
        self._graphdef, params, self._buffers = nnx.split(posterior, nnx.Param, ...)
        if buffers is not None:
            nnx.replace_by_pure_dict(self._buffers, buffers)
        self._param_template = params
        self.init_params = nnx.to_pure_dict(params)
        self._param_structure = jax.tree.structure(self.init_params)
        self._sample_batch_jit = jax.jit(self._sample_batch,
                                         static_argnames=("sample_shape", "chunk", "single"))
        self._log_prob_batch_jit = jax.jit(self._log_prob_batch)
        self._embed_batch_jit = jax.jit(self._embed_batch)
        self.summary_range = None  # set after training (set_summary_range)
        return self.init_params

    def _check_setup(self):
        if self.structure is None:
            raise RuntimeError("The guide has not been set up: train it with fit(guide, ...) "
                               "or SVI first, or call guide.setup(rng_key, *model_args).")

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
        check_params(params, self.init_params, self._param_structure, self.param_name)
        return params

    def set_mixture_weights(self, params, member_log_probs):
        """``params`` with a flow ensemble's mixture weights fitted to ``(K, N)`` held-out
        member log densities (EM, see :func:`~numpyro_amortized.networks.flows.mixture_log_weights`);
        a single flow's parameters come back unchanged. Host-side; ``fit`` calls it at the end."""
        if member_log_probs is None:
            return params
        outer = isinstance(params, dict) and self.param_name in params
        posterior = self.posterior(params)
        log_w = np.maximum(mixture_log_weights(np.asarray(member_log_probs)), -30.0)  # never 0
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
        given, drawn = self._covariates(args, kwargs), {}
        if self.design is not None:  # covariates drawn anew for every simulation
            k_sim, k_design = jax.random.split(k_sim)
            drawn = draw_designs(self.design, k_design, num_simulations, given)
        sims = simulate_designs(self.model, k_sim, num_simulations, args, kwargs, drawn)
        latents = {s.name: sims[s.name] for s in self.latent_layout.sites}
        observed = {s.name: sims[s.name] for s in self.structure.observed}
        if self.groups is not None:
            given = {**self.groups.layout.argument_values(self.model, args, kwargs), **given}
        design = {name: drawn[name] if name in drawn else
                  jnp.broadcast_to(v, (num_simulations,) + v.shape) for name, v in given.items()}
        if self.groups is not None and self.num_groups is not None:  # groups beyond a random
            design[GROUP_COUNT] = jax.random.randint(  # count per simulation are absent
                jax.random.fold_in(k_size, 1), (num_simulations,), self.num_groups[0],
                self.num_groups[1] + 1)
        num_obs = None
        if self.structure.data_plate is not None:
            if self.set_sizes is not None:
                lo, hi = self.set_sizes
                num_obs = jax.random.randint(k_size, (num_simulations,), lo, hi + 1)
            else:
                num_obs = jnp.full((num_simulations,), self.structure.data_plate_size)
        data = self._encode({**observed, **design}, num_obs)
        return Simulations.of(self.latent_layout, latents, observed, data, num_obs, drawn)

    def model_log_density(self, latents, observed, num_obs, *args, group_mask=None, **kwargs):
        """``log p(theta, x)`` of the model for one dataset (masked beyond ``num_obs``, and
        where a hierarchical guide's ``group_mask`` (the rows of its groups) is ``False``)."""
        model = condition(self.model, data=observed)
        if num_obs is not None:
            mask = jnp.arange(self.structure.data_plate_size) < num_obs
            model = MaskDataPlate(model, self.structure.data_plate, mask)
        if group_mask is not None:
            model = MaskDataPlate(model, self.groups.layout.row_plate, group_mask)
        return log_density(model, args, kwargs, latents)[0]

    # ------------------------------------------------------------------ data
    def observed_data(self, *args, **kwargs) -> dict:
        """The observed values in the model's arguments, checked against the trained shapes."""
        self._check_setup()
        values = {**observed_values_compiled(self.programs, self.model, args, kwargs),
                  **self._covariates(args, kwargs)}
        data = {s.name: values[s.name] for s in self.data_layout.sites if s.name in values}
        if self.groups is not None:
            data.update(self.groups.layout.argument_values(self.model, args, kwargs))
            if self.num_groups is not None and self.groups.layout.index is not None:
                data[GROUP_COUNT] = jnp.asarray(self._group_count(args, kwargs))
        self._check_data(data, 0)
        self._warn_size(self.data_layout.set_size(data))
        warn_other_design(self._design_for(data, 0), data, batch_ndim=0, stacklevel=5)
        return data

    def _covariates(self, args, kwargs) -> dict:
        """The covariates (plate-aligned array arguments) the summary network reads."""
        values = covariate_values(self.model, args, kwargs)
        return {c.name: jnp.asarray(values[c.name]) for c in self.structure.covariates
                if c.name in values}

    def _warn_size(self, n, stacklevel=3):
        if n is None or self.structure.data_plate is None or self._rows_follow_groups():
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
        if self.groups is None:
            return self.data_layout.encode(data, num_obs, pad_to=pad)
        batch = self.data_layout.encode(pad_groups(self.groups.layout, data), num_obs, pad_to=pad)
        return encode_groups(self.groups.layout, batch, data, n)

    # ------------------------------------------------------------------ core (jittable)
    def _sample_batch(self, rng_key, params, data, num_obs, sample_shape, chunk, single=False):
        """Draws for every dataset; over ``chunk`` datasets at a time (``lax.map``) when there
        are more, so the flow's intermediates stay bounded however many datasets there are.
        ``single``: ``data`` is one dataset, and the draws have no dataset axis."""
        posterior = self.posterior(params)
        data = {k: v[None] for k, v in data.items()} if single else data
        num = next(iter(data.values())).shape[0]

        def draw(key, data, num_obs):
            encoded = self._encode(data, num_obs)
            u = posterior.sample(key, encoded, sample_shape)
            # (datasets, *sample_shape, D), and the summaries for the out-of-range check
            return jnp.moveaxis(u, len(sample_shape), 0), posterior.embed(encoded)

        if num <= chunk:
            u, emb = draw(rng_key, data, num_obs)
        else:
            n_chunks = -(-num // chunk)
            pad = lambda x: jnp.pad(x, [(0, n_chunks * chunk - num)] + [(0, 0)] * (x.ndim - 1),
                                    mode="edge").reshape((n_chunks, chunk) + x.shape[1:])
            xs = (jax.random.split(rng_key, n_chunks), jax.tree.map(pad, data),
                  None if num_obs is None else pad(num_obs))
            u, emb = jax.lax.map(lambda a: draw(*a), xs)
            u = u.reshape((n_chunks * chunk,) + u.shape[2:])[:num]
            emb = emb.reshape((n_chunks * chunk,) + emb.shape[2:])[:num]
        draws, _ = self.latent_layout.constrain(u[0] if single else u)
        finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
        return draws, jnp.all(jnp.stack(finite)), jnp.all(jnp.isfinite(u)), emb

    def set_summary_range(self, params, sims: Simulations, *, out_sharding=None):
        """Record where the summaries of the held-out ``sims`` lie (:class:`SummaryRange`);
        :meth:`sample_posterior` warns on data outside. :func:`fit` calls this."""
        embed = lambda p, d: self.posterior(self.network_params(p)).embed(d)
        self.summary_range = SummaryRange.of_simulations(embed, params, sims, out_sharding)

    def _log_prob_batch(self, params, latents, data, num_obs, present=None):
        if present is not None:  # fewer groups than the maximum
            return self._log_prob_present(params, latents, data, num_obs, present)
        u, log_det = self.latent_layout.unconstrain_with_log_det(latents)
        return self.posterior(params).log_prob(u, self._encode(data, num_obs)) - log_det

    def _embed_batch(self, params, data, num_obs):
        return self.posterior(params).embed(self._encode(data, num_obs))

    def log_prob_simulations(self, params, sims: Simulations):
        """``log q(theta_i | x_i)`` for each simulation."""
        return self.posterior(params).log_prob(sims.u, sims.data) - sims.log_det

    def training_log_prob_simulations(self, params, sims: Simulations, rng_key=None):
        """What the NPE loss maximizes for each simulation (the density's ``training_log_prob``:
        a flow ensemble's members each on its own; flow matching's objective from ``rng_key``)."""
        return self.posterior(params).training_log_prob(sims.u, sims.data, rng_key) - sims.log_det

    def validation_log_prob_simulations(self, params, sims: Simulations, rng_key=None):
        """What ``fit`` tracks on held-out simulations (the density's ``validation_log_prob``)."""
        return self.posterior(params).validation_log_prob(sims.u, sims.data, rng_key) - sims.log_det

    def member_log_prob_simulations(self, params, sims: Simulations):
        """``(K, B)`` member log densities of a flow ensemble per simulation (``None`` for one)."""
        lps = self.posterior(params).member_log_probs(sims.u, sims.data)
        return None if lps is None else lps - sims.log_det
