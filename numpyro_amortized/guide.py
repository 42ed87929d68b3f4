"""AutoAmortizedFlow: an amortized NumPyro autoguide.

The guide is ``q(theta | x)``: a summary network turns the observed data ``x`` into a vector,
which conditions a normalizing flow over the model's latents in unconstrained space. It is a
:class:`numpyro.infer.autoguide.AutoGuide`, so it works in ``numpyro.infer.SVI`` and
``numpyro.infer.Predictive``; after training, the posterior of a new dataset is one forward pass.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer.autoguide import AutoGuide

from numpyro_amortized.data import DataBatch
from numpyro_amortized.design import warn_other_design
from numpyro_amortized.group_data import GROUP_COUNT
from numpyro_amortized.guide_base import AmortizedGuideBase
from numpyro_amortized.predictive import posterior_predictive
from numpyro_amortized.programs import Programs, log_joint_program, merge_static, split_static

__all__ = ["AutoAmortizedFlow"]


class _FlowPosterior(dist.Distribution):
    """The flow given one dataset, as a NumPyro distribution over the flat latent vector."""

    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior, data: DataBatch, dim):
        self._posterior, self._data = posterior, data
        super().__init__(batch_shape=(), event_shape=(dim,))

    def sample(self, key, sample_shape=()):
        return self._posterior.sample(key, self._data, tuple(sample_shape))[..., 0, :]

    rsample = sample

    def log_prob(self, value):
        return self._posterior.log_prob(value[None], self._data)[0]


class AutoAmortizedFlow(AmortizedGuideBase, AutoGuide):
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
        for training (they are simulated). Every other argument is used as given in every
        simulation. Array arguments with one row per observation of the data plate (a
        covariate matrix, group indices) are *covariates*: the summary network reads them
        next to the observations, and other values of them at sampling time give a warning.
        To amortize over covariates too, declare a ``design`` or write them as observed sites
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
        :func:`~numpyro_amortized.networks.ensemble_flow` (trained with per-member weight decay),
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
        A series observed inside ``numpyro.contrib.control_flow.scan`` (no plate) is read
        along its leading axis.
    :param design: covariates to amortize over: a function ``design(rng_key)`` returning
        values of covariate arguments by name (shapes as at set-up), drawn anew for every
        training simulation, e.g. ``lambda k: {"X": jax.random.normal(k, (100, 3))}``; or a
        dict of arrays stacked over designs you have (``{"X": Xs}``, ``Xs`` of shape
        ``(num_designs, 100, 3)``), one chosen at random per simulation. The guide then answers
        for any design such draws cover. Default: the covariates given at set-up, for every
        simulation (other values at sampling time warn). Checkpoints store a dict of arrays;
        a function is code, so :func:`~numpyro_amortized.load` then needs the guide built
        with it (``guide=``).
    :param hierarchical: factorize the posterior over the groups of a hierarchical model
        (latents inside a ``numpyro.plate``, as read by
        :func:`~numpyro_amortized.hierarchy.find_hierarchy`):
        ``q(globals | x) prod_j q(local_j | globals, x_j, x)`` with one local flow shared by
        all groups (:class:`~numpyro_amortized.networks.HierarchicalPosterior`). ``"auto"``
        (default) does so wherever it can and warns where a model has a group plate it cannot
        read; ``True`` raises there; ``False`` keeps one joint flow over all latents.
    :param num_groups: ``(min, max)`` numbers of groups to train a hierarchical guide on;
        ``max`` must be the group plate's size in the set-up arguments. Each simulation keeps
        its first ``n`` groups, ``n`` uniform in ``[min, max]`` (the others have no data: their
        locals learn the conditional prior), so one guide answers for any number of groups in
        the range.
        Default: the set-up number only.
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
                 set_sizes=None, time_series=False, design=None, hierarchical="auto",
                 num_groups=None, num_pilot_simulations=4096, prefix="auto"):
        super().__init__(model, prefix=prefix)
        self.design = design
        self.summary_net = summary_net
        self.flow = flow
        self.observed = tuple(observed or ())
        self.data_plate = data_plate
        self.set_sizes = None if set_sizes is None else (int(set_sizes[0]), int(set_sizes[1]))
        self.time_series = bool(time_series)
        self.hierarchical = hierarchical
        self.num_groups = None if num_groups is None else (int(num_groups[0]),
                                                           int(num_groups[1]))
        self.num_pilot_simulations = int(num_pilot_simulations)
        self.structure = None
        self.groups = None
        self.init_params = None
        self.programs = Programs()
        self.summary_range = None

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
        values, log_dets = self.latent_layout.constrain_sites(u, per_element=True)
        result = {}
        for site in self.latent_layout.sites:  # event dims as the model's (plates: batch dims)
            result[site.name] = numpyro.sample(
                site.name,
                dist.Delta(values[site.name], log_density=-log_dets[site.name],
                           event_dim=site.support.event_dim),
            )
        return result

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw posterior samples for the dataset in ``args``/``kwargs``.

        :param rng_key: a PRNG key.
        :param params: the trained parameters (``fit(...).params`` or ``svi.get_params``).
        :param sample_shape: leading shape of the draws.
        :return: dict from latent site name to values of shape ``sample_shape + site_shape``,
            and the model's ``numpyro.deterministic`` sites computed from them.

        This is the fast path: the guide's draws, unchecked. When the answer for this dataset
        must be right, use :func:`~numpyro_amortized.posterior`, which checks the draws
        against the model's exact density and corrects them (PSIS, refinement on the
        dataset, NUTS) only when needed. After :func:`fit`, data whose summary statistics lie
        outside every held-out training simulation's (:attr:`summary_range`) give a warning.
        """
        out = self._draw(rng_key, params, self.observed_data(*args, **kwargs), None,
                         sample_shape, single=True)  # one dataset: no batch axis to add, cut
        if self.structure.deterministic:
            out.update(self._deterministic_sites(out, tuple(sample_shape), args, kwargs))
        return out

    def sample_posterior_predictive(self, rng_key, params, *args, num_samples=1000,
                                    sites=None, **kwargs):
        """Posterior draws and replicated data for the dataset in ``args``/``kwargs``, in
        one call: :meth:`sample_posterior`, then ``numpyro.infer.Predictive`` on each draw.

        :param num_samples: posterior draws, each with one replicated dataset.
        :param sites: observed sites to replicate (default: the responses, the observed
            sites whose distribution depends on the latents; covariates keep their values).
        :return: dict of latent, deterministic and replicated sites, leading axis
            ``num_samples``.
        """
        k_post, k_rep = jax.random.split(rng_key)
        draws = self.sample_posterior(k_post, params, *args, sample_shape=(int(num_samples),),
                                      **kwargs)
        latents = {s.name: draws[s.name] for s in self.latent_layout.sites}
        return {**draws, **posterior_predictive(self.model, k_rep, latents, *args,
                                                sites=sites, **kwargs)}

    def _deterministic_sites(self, draws, sample_shape, args, kwargs):
        """The deterministic sites of the model run on each draw (vectorized, as
        ``numpyro.infer.Predictive`` does), compiled once per kind of data and draws."""
        names = self.structure.deterministic
        dynamic, spec = split_static((args, kwargs))
        n = len(sample_shape)

        def run(draws, dynamic):
            a, kw = merge_static(dynamic, spec)

            def one(values):
                model = substitute(seed(self.model, jax.random.PRNGKey(0)), data=values)
                with block():
                    tr = trace(model).get_trace(*a, **kw)
                return {name: tr[name]["value"] for name in names}

            flat = {k: jnp.reshape(v, (-1,) + v.shape[n:]) for k, v in draws.items()}
            out = jax.vmap(one)(flat)
            return {k: jnp.reshape(v, sample_shape + v.shape[1:]) for k, v in out.items()}

        key = ("deterministic", spec, tuple(sample_shape), tuple(sorted(draws)))
        return self.programs.get(key, lambda: jax.jit(run))(draws, dynamic)

    def _batch_inputs(self, data, num_obs):
        """A batch of datasets checked and as arrays: the sites the guide reads (no more, no
        fewer), a non-empty batch, and sizes within the padded size."""
        self._check_setup()
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict from observed site name to values with a "
                            f"leading dataset axis; got {type(data).__name__}.")
        fixed = self._fixed_arguments()
        names = [site.name for site in self.data_layout.sites] + sorted(set(fixed) - {
            site.name for site in self.data_layout.sites})
        extra = sorted(set(data) - set(names))
        if extra:
            raise ValueError(f"data has entries {extra} that are not observed sites or "
                             f"covariates of the model; the guide reads {names}.")
        data = {k: jnp.asarray(v) for k, v in data.items()}
        missing = sorted(set(fixed) - set(data))
        if missing:
            raise ValueError(f"No value for the covariates {missing}: a batch gives every "
                             "dataset's covariates by argument name, next to its observations "
                             "(guide.simulation_data(sims) does for simulations).")
        self._check_data(data, 1)
        warn_other_design(self._design_for(data, 1), data, batch_ndim=1, stacklevel=5)
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

    def sample_posterior_batch(self, rng_key, params, data, *, sample_shape=(), num_obs=None,
                               num_groups=None):
        """Posterior draws for a batch of datasets in one vectorized call.

        :param data: dict from observed site name to values with a leading dataset axis
            (``(num_datasets, *site_shape)``); all datasets padded to one set size; covariates
            (and a hierarchical guide's group arguments) by argument name.
        :param num_obs: optional ``(num_datasets,)`` sizes; observations beyond are padding.
        :param num_groups: for a hierarchical guide trained with ``num_groups``, optional
            ``(num_datasets,)`` numbers of groups of datasets whose observations are linked to
            groups by an index (default: the maximum); the draws have the maximum's locals,
            those beyond a dataset's count are its groups without data.
        :return: dict from latent site name to ``(num_datasets, *sample_shape, *site_shape)``.

        **Example**::

            draws = guide.sample_posterior_batch(key, params, {"y": Y}, sample_shape=(1000,))
        """
        data, num_obs = self._batch_inputs(data, num_obs)
        if num_groups is not None:
            data[GROUP_COUNT] = jnp.asarray(num_groups, jnp.int32)
        return self._draw(rng_key, params, data, num_obs, sample_shape)

    def _draw(self, rng_key, params, data, num_obs, sample_shape, single=False):
        # datasets per chunk: about 2^18 draws at a time bounds the flow's intermediates (a
        # few hundred MB) while keeping each chunk large enough to run at full speed
        per_dataset = max(1, math.prod(sample_shape))
        chunk = max(1, 2**18 // per_dataset)
        draws, params_ok, draws_ok, summaries = self._sample_batch_jit(
            rng_key, self.network_params(params), data, num_obs,
            sample_shape=tuple(sample_shape), chunk=chunk, single=single)
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
        if self.summary_range is not None:
            self.summary_range.warn_outside(summaries, stacklevel=4)
        return self._present_groups(draws, data, (not single) + len(sample_shape))

    def log_prob(self, params, latents, *args, **kwargs):
        """``log q(theta | x)``: the density of constrained latent values given the data in
        ``args``/``kwargs``; ``latents`` may have leading sample dims."""
        data = self.observed_data(*args, **kwargs)
        latents = {k: jnp.asarray(v)[None] for k, v in latents.items()}
        data = {k: jnp.asarray(v)[None] for k, v in data.items()}
        latents, present = self._pad_groups(latents)
        return self._log_prob_batch_jit(self.network_params(params), latents, data, None,
                                        present)[0]

    def log_joint(self, latents, *args, **kwargs):
        """``log p(theta, x)``: the model's exact joint density of constrained latent values
        (leading axis: draws) and the data in ``args``/``kwargs``, in one vectorized call,
        compiled once per kind of data and kept in :attr:`programs`."""
        self._check_setup()
        dynamic, spec = split_static((args, kwargs))
        program = self.programs.get(("log_joint", spec),
                                    lambda: log_joint_program(self.model, spec))
        return program({k: jnp.asarray(v) for k, v in latents.items()}, dynamic)

    def log_prob_batch(self, params, latents, data, num_obs=None, num_groups=None):
        """``log q(theta | x)`` for a batch of datasets; ``latents`` shaped
        ``(num_datasets, *sample_shape, *site_shape)``; ``num_groups`` as in
        :meth:`sample_posterior_batch` (locals of fewer groups: their marginal density)."""
        data, num_obs = self._batch_inputs(data, num_obs)
        if num_groups is not None:
            data[GROUP_COUNT] = jnp.asarray(num_groups, jnp.int32)
        latents = {k: jnp.asarray(v) for k, v in latents.items()}
        latents, present = self._pad_groups(latents)
        return self._log_prob_batch_jit(self.network_params(params), latents, data, num_obs,
                                        present)

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
