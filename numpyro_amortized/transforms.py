"""Constrained latents <-> one flat unconstrained vector, with the log-det Jacobian.

The flow lives in R^D. Each latent site is mapped to the reals by
``numpyro.distributions.biject_to(site.support)`` (positive, interval, simplex, ordered,
Cholesky factors, ... anything NumPyro can biject), flattened, and concatenated.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to
from numpyro.distributions.util import sum_rightmost

__all__ = ["LatentLayout", "flatten_draws"]


class LatentLayout:
    """Packs latent sites into a flat unconstrained vector and back.

    :param latents: a sequence of :class:`~numpyro_amortized.simulation.LatentSite`.

    **Example**::

        layout = LatentLayout(inspect_model(model, y=y).latents)
        u = layout.unconstrain({"sigma": jnp.array([1.0, 2.0])})   # shape (2, 1)
        values, log_det = layout.constrain(u)
    """

    def __init__(self, latents):
        self.sites = tuple(latents)
        self.transforms = tuple(biject_to(s.support) for s in self.sites)
        self.sizes = tuple(math.prod(s.unconstrained_shape) for s in self.sites)
        self.dim = sum(self.sizes)

    def unconstrain(self, latents: dict):
        """Map constrained latent values (leading batch dims allowed) to ``(..., dim)``."""
        parts = []
        for site, t in zip(self.sites, self.transforms):
            value = jnp.asarray(latents[site.name])
            batch = value.shape[: value.ndim - len(site.shape)]
            parts.append(jnp.reshape(t.inv(value), batch + (-1,)))
        return jnp.concatenate(parts, axis=-1)

    def constrain_sites(self, u, per_element=False):
        """Map ``u`` of shape ``(..., dim)`` to constrained values and per-site log-dets.

        :param per_element: keep each site's batch dimensions (those of its plates) in its
            log-det, as a NumPyro guide site inside plates needs.
        :return: ``(latents, log_dets)``, dicts by site name; each log-det has shape
            ``u.shape[:-1]`` (with ``per_element``, followed by the site's batch shape).
        """
        batch = u.shape[:-1]
        values, log_dets, start = {}, {}, 0
        for site, t, size in zip(self.sites, self.transforms, self.sizes):
            x = jnp.reshape(u[..., start : start + size], batch + site.unconstrained_shape)
            y = t(x)
            ld = t.log_abs_det_jacobian(x, y)
            keep = len(site.shape) - site.support.event_dim if per_element else 0
            log_dets[site.name] = sum_rightmost(ld, jnp.ndim(ld) - len(batch) - keep)
            values[site.name] = y
            start += size
        return values, log_dets

    def constrain(self, u):
        """Map ``u`` of shape ``(..., dim)`` to constrained values and ``log|det d theta/d u|``.

        :return: ``(latents, log_det)`` where ``log_det`` has shape ``u.shape[:-1]``.
        """
        values, log_dets = self.constrain_sites(u)
        return values, sum(log_dets.values(), jnp.zeros(u.shape[:-1]))

    def unconstrain_with_log_det(self, latents: dict):
        """``u`` for the given latents and ``log|det d theta/d u|`` at ``u``."""
        u = self.unconstrain(latents)
        _, log_det = self.constrain(u)
        return u, log_det


def flatten_draws(draws: dict, names=None):
    """Draws by site, ``(num_draws, *site_shape)``, as one ``(num_draws, columns)`` matrix.

    :param names: the site order (default: the dict's order).
    :return: ``(matrix, column_names)``, e.g. ``["beta[0]", "beta[1]", "sigma"]``.
    """
    names = list(draws) if names is None else list(names)
    cols, labels = [], []
    for name in names:
        v = np.asarray(draws[name], dtype=np.float64)
        shape = v.shape[1:]
        cols.append(v.reshape(v.shape[0], -1))
        if shape == ():
            labels.append(name)
        else:
            labels += [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]
    return np.concatenate(cols, axis=1), labels
