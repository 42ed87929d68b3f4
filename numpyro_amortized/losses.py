"""Training objectives for the amortized guide, usable as ``numpyro.infer.SVI(loss=...)``.

Both draw fresh datasets from the model's prior predictive at every evaluation:

- :class:`NPE`, the forward KL: ``E_{p(theta, x)}[-log q(theta | x)]``;
- :class:`AmortizedELBO`, the reverse KL averaged over datasets:
  ``E_{p(x)} E_{q(theta|x)}[log q(theta | x) - log p(theta, x)]``, which uses the model's own
  log density (a simulator-only tool cannot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro.infer.elbo import ELBO

from numpyro_amortized.design import with_arguments

__all__ = ["NPE", "AmortizedELBO", "AmortizedLoss", "masked_mean"]


DEFAULT_BATCH_SIZE = 256


def resolve_batch_size(loss, batch_size):
    """The batch size of a run: ``batch_size`` if given, else the loss's, else 256; a
    ``ValueError`` when both are given and differ."""
    own = getattr(loss, "batch_size", None)
    if batch_size is not None and own is not None and int(batch_size) != own:
        raise ValueError(f"batch_size={batch_size} and {type(loss).__name__}(batch_size={own}) "
                         "disagree: give the batch size once.")
    return batch_size if batch_size is not None else (own or DEFAULT_BATCH_SIZE)


def masked_mean(values, valid):
    """Mean of ``values`` over entries where ``valid`` (0 if none are)."""
    values = jnp.where(valid, values, 0.0)
    return jnp.sum(values) / jnp.maximum(jnp.sum(valid), 1)


class AmortizedLoss(ELBO):
    """Base class: a loss per simulated dataset, averaged over a fresh batch of simulations.

    :param batch_size: datasets simulated per evaluation under ``SVI`` (default 256);
        :func:`~numpyro_amortized.fit` trains with it when its own ``batch_size`` is not given
        (both given must agree).
    """

    def __init__(self, batch_size=None):
        super().__init__(num_particles=1)
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size={batch_size}: need a positive integer.")
        self.batch_size = None if batch_size is None else int(batch_size)

    def simulation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        """Loss of each simulation in ``sims`` (shape ``(B,)``); subclasses implement this."""
        raise TypeError(f"{type(self).__name__} does not define simulation_losses.")

    def validation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        """Held-out loss of each simulation (default: :meth:`simulation_losses`)."""
        return self.simulation_losses(guide, params, rng_key, sims, *args, **kwargs)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        if getattr(guide, "structure", None) is None:
            raise RuntimeError(f"{type(self).__name__} needs an AutoAmortizedFlow guide.")
        k_sim, k_loss = jax.random.split(rng_key)
        sims = guide.simulate(k_sim, self.batch_size or DEFAULT_BATCH_SIZE, *args, **kwargs)
        losses = self.simulation_losses(
            guide, param_map[guide.param_name], k_loss, sims, *args, **kwargs
        )
        return {"loss": masked_mean(losses, sims.valid), "mutable_state": None}


class NPE(AmortizedLoss):
    """Neural posterior estimation: ``-log q(theta | x)`` for ``(theta, x)`` from the model.

    Mass-covering, needs no model density, and its value is the negative log posterior density
    of the true latents: lower is better and comparable across guides. With a flow ensemble it
    is the mean over the members (each member is trained as if alone), an upper bound on the
    mixture's.

    **Example**::

        svi = SVI(model, guide, numpyro.optim.Adam(1e-3), loss=NPE(batch_size=256))

    **References:** Papamakarios & Murray (2016); Radev et al. (2020), *BayesFlow*.
    """

    def simulation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        return -guide.training_log_prob_simulations(params, sims, rng_key)

    def validation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        """``-log q(theta | x)`` of the posterior itself (a flow ensemble's mixture, not the
        mean over its members; a flow-matching density's flow-matching loss, drawn from
        ``rng_key``): what :func:`~numpyro_amortized.fit` tracks on held-out simulations to
        keep the best parameters."""
        return -guide.validation_log_prob_simulations(params, sims, rng_key)


class AmortizedELBO(AmortizedLoss):
    """The ELBO averaged over datasets from the prior predictive (reverse KL).

    :param batch_size: datasets per evaluation (see :class:`AmortizedLoss`).
    :param num_particles: posterior draws per dataset.

    **Example**::

        result = fit(guide, key, *args, loss=AmortizedELBO(num_particles=4))

    **References:** Ambrogioni et al. (2019), *Forward amortized inference for
    likelihood-free variational marginalization*; the amortized VI of Kingma & Welling (2014).
    """

    def __init__(self, batch_size=None, num_particles=1):
        super().__init__(batch_size)
        self.num_particles = int(num_particles)

    def simulation_losses(self, guide, params, rng_key, sims, *args, **kwargs):
        log_w = importance_log_weights(guide, params, rng_key, sims, self.num_particles, args,
                                       kwargs)
        return -jnp.mean(log_w, axis=0)


def importance_log_weights(guide, params, rng_key, sims, num_draws, args, kwargs,
                           return_draws=False):
    """``(num_draws, B)``: ``log p(theta, x_i) - log q(theta | x_i)`` for ``num_draws`` guide
    draws per simulation (reparameterized), with the model's exact density evaluated at each
    simulation's data (and covariates, under a declared design); with ``return_draws``, also
    the draws, unconstrained, ``(num_draws, B, D)``."""
    posterior = guide.posterior(params)
    u, log_q_u = posterior.sample_and_log_prob(rng_key, sims.data, (num_draws,))
    latents, log_det = guide.latent_layout.constrain(u)

    def one_dataset(theta, observed, num_obs, design, group_mask):  # design: per-simulation
        a, kw = with_arguments(guide.model, args, kwargs, design) if design else (args, kwargs)
        return guide.model_log_density(theta, observed, num_obs, *a, group_mask=group_mask, **kw)

    group_mask = sims.data.group_mask  # a hierarchical guide's groups without data
    if group_mask is not None:
        group_mask = group_mask[:, :guide.groups.layout.row_plate_size]
    batched = lambda x: 0 if x is not None else None
    per_draw = jax.vmap(one_dataset, in_axes=(0, 0, batched(sims.num_obs), 0,
                                              batched(group_mask)))
    log_p = jax.vmap(lambda th: per_draw(th, sims.observed, sims.num_obs, sims.design or {},
                                         group_mask))(latents)
    log_w = log_p - (log_q_u - log_det)
    return (log_w, u) if return_draws else log_w
