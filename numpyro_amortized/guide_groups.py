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

    def _present_groups(self, draws, data, lead):
        """``draws`` (``lead`` leading axes) without the locals of groups the data do not have
        (fewer than the trained maximum, with ``num_groups``)."""
        if self.groups is None or self.num_groups is None:
            return draws
        layout = self.groups.layout
        if layout.index is None:
            n = data[layout.sites[0].name].shape[1 + layout.axes[0]]
        else:
            counts = np.unique(np.asarray(data.get(GROUP_COUNT, layout.num_groups)))
            n = int(counts[0]) if counts.size == 1 else layout.num_groups
        take = lambda v, axis: jax.lax.slice_in_dim(v, 0, n, axis=lead + axis)
        return {k: take(v, self.groups.local_axes[k]) if k in self.groups.local_axes else v
                for k, v in draws.items()}

    def _check_all_groups(self, latents):
        """Raise a clear error for latents of fewer groups than the guide's density covers."""
        if self.groups is None:
            return
        for name, axis in self.groups.local_axes.items():
            site = next(s for s in self.latent_layout.sites if s.name == name)
            shape = np.shape(latents[name])
            if shape[len(shape) - len(site.shape) + axis] != self.groups.layout.num_groups:
                raise ValueError(
                    f"log_prob of '{name}' for {shape[len(shape) - len(site.shape) + axis]} "
                    f"groups: the guide's density is for all {self.groups.layout.num_groups} "
                    "groups it was built for (fewer are not supported yet).")
