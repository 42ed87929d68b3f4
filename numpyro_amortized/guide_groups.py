"""What a guide does for the groups of a hierarchical model on top of the flat-vector core:
the data checks, the group count of given data, and dropping absent groups' locals.
:class:`~numpyro_amortized.guide_base.AmortizedGuideBase` inherits it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_amortized.group_data import GROUP_COUNT, group_count

__all__ = ["GroupsMixin"]


class GroupsMixin:
    """Group handling of :class:`~numpyro_amortized.AutoAmortizedFlow` (``self.groups`` is
    ``None`` for a guide that is not factorized over groups)."""

    def _check_data(self, data, batch_ndim):
        """Check ``data`` against the trained shapes; a hierarchical guide's groups may number
        fewer than at set-up (groups inside the plate), never more."""
        any_shape = ()
        if self.groups is not None:
            self.groups.layout.check_groups(data, batch_ndim)
            any_shape = [s.name for s in self.groups.layout.sites] * (
                self.groups.layout.index is None and self.num_groups is not None)
        self.data_layout.check(data, batch_ndim, allow_other_sizes=self._accepts_variable_size,
                               any_shape=any_shape)

    def _group_count(self, args, kwargs) -> int:
        return group_count(self.model, args, kwargs, self.groups.layout.plate)

    def _rows_follow_groups(self) -> bool:
        """Whether the data plate's size follows the number of groups (index-linked rows of a
        guide trained on a range of group counts)."""
        return (self.groups is not None and self.num_groups is not None
                and self.groups.layout.index is not None)

    def _design_for(self, data, batch_ndim):
        """The trained design to compare ``data``'s covariates with: for rows that follow the
        groups, the set-up rows of the groups the data have."""
        design = self._design
        index = self.groups.layout.index if self._rows_follow_groups() else None
        if index not in design or index not in data:
            return design
        n = int(np.max(np.asarray(data[index]), initial=-1)) + 1
        rows = design[index] < n
        return {k: v[rows] if np.shape(v)[:1] == rows.shape else v for k, v in design.items()}

    def _fixed_arguments(self) -> dict:
        """The covariates and group arguments given at set-up, by name."""
        args, kwargs = self.model_args
        fixed = self._covariates(args, kwargs)
        if self.groups is not None:
            fixed.update(self.groups.layout.argument_values(self.model, args, kwargs))
        return fixed

    def simulation_data(self, sims) -> dict:
        """The data of simulations ``sims`` as the batch methods take them: the observed
        values and the covariates each simulation used (drawn from a declared design, or the
        set-up values)."""
        b = sims.u.shape[0]
        fixed = {k: jnp.broadcast_to(v, (b,) + v.shape)
                 for k, v in self._fixed_arguments().items()}
        return {**fixed, **(sims.design or {}), **sims.observed}

    def _groups_given(self, data):
        """How many groups ``data`` (dict of one or more datasets) have, when fewer than the
        trained maximum (a guide trained with ``num_groups``), else ``None``."""
        if self.groups is None or self.num_groups is None:
            return None
        layout = self.groups.layout
        if layout.index is None:
            site = data[layout.sites[0].name]
            n = np.shape(site)[np.ndim(site) - len(layout.sites[0].shape) + layout.axes[0]]
        else:
            counts = np.unique(np.asarray(data.get(GROUP_COUNT, layout.num_groups)))
            n = int(counts[0]) if counts.size == 1 else layout.num_groups
        return n if n < layout.num_groups else None

    def _present_groups(self, draws, data, lead):
        """``draws`` (``lead`` leading axes) without the locals of groups the data do not have
        (fewer than the trained maximum, with ``num_groups``)."""
        return self._first_groups(draws, self._groups_given(data), lead)

    def _first_groups(self, draws, n, lead):
        """``draws`` with the locals of the first ``n`` groups only (all when ``None``)."""
        if n is None:
            return draws
        take = lambda v, axis: jax.lax.slice_in_dim(v, 0, n, axis=lead + axis)
        return {k: take(v, self.groups.local_axes[k]) if k in self.groups.local_axes else v
                for k, v in draws.items()}

    def _pad_groups(self, latents):
        """``(latents, present)``: the locals of fewer groups than the guide's maximum padded to
        it (each group axis repeats its last group, a valid value of the support) and the
        ``(num_groups,)`` mask of the groups given; ``present`` is ``None`` when all are."""
        if self.groups is None:
            return latents, None
        full = self.groups.layout.num_groups
        counts = {}
        for name, axis in self.groups.local_axes.items():
            site = next(s for s in self.latent_layout.sites if s.name == name)
            shape = np.shape(latents[name])
            at = len(shape) - len(site.shape) + axis  # the group axis, after leading dims
            counts[name] = (at, shape[at])
        sizes = {n for _, n in counts.values()}
        if len(sizes) > 1 or max(sizes) > full:
            raise ValueError(
                f"log_prob of the locals {sorted(counts)} with "
                f"{', '.join(f'{k}: {n}' for k, (_, n) in counts.items())} groups: give every local "
                f"site the same number of groups, at most the guide's {full}.")
        n = sizes.pop()
        if n == full:
            return latents, None
        pad = lambda v, axis: jnp.concatenate(
            [v, jnp.repeat(jax.lax.slice_in_dim(v, n - 1, n, axis=axis), full - n, axis)], axis)
        latents = {k: pad(jnp.asarray(v), counts[k][0]) if k in counts else v
                   for k, v in latents.items()}
        return latents, jnp.arange(full) < n

    def _group_log_det(self, u, present):
        """``log|det d theta/d u|`` of the globals and of the ``present`` groups' locals."""
        _, lds = self.latent_layout.constrain_sites(u, per_element=True)
        lead, total = u.ndim - 1, jnp.zeros(u.shape[:-1])
        for name, ld in lds.items():
            if name in self.groups.local_axes:
                axis = lead + self.groups.local_axes[name]
                mask = present.reshape((1,) * axis + (-1,) + (1,) * (ld.ndim - axis - 1))
                ld = jnp.where(mask, ld, 0.0)
            total = total + ld.reshape(u.shape[:-1] + (-1,)).sum(-1)
        return total

    def _log_prob_present(self, params, latents, data, num_obs, present):
        """``log q`` of the globals and the ``present`` groups' locals: the locals of each group
        are conditionally independent given the globals, so the marginal leaves the absent
        groups' factors out."""
        u = self.latent_layout.unconstrain(latents)
        encoded = self._encode(data, num_obs)
        return (self.posterior(params).log_prob(u, encoded, present=present)
                - self._group_log_det(u, present))
