"""A conditional normalizing flow: a stack of bijections on a standard-normal base.

Direction convention (as in flowjax): ``transform_and_log_det`` goes from the base (z) to the
data side (the unconstrained latents u); ``inverse_and_log_det`` goes back. A flow factory has
the signature ``factory(dim, context_dim, *, loc, scale, rngs) -> ConditionalFlow``, where
``loc``/``scale`` standardize the latents; pass a factory (or a ``functools.partial`` of
:func:`coupling_flow`) as ``flow=`` to :class:`~numpyro_amortized.AutoAmortizedFlow`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from numpyro_amortized.networks.flows.actnorm import ActNorm
from numpyro_amortized.networks.flows.affine_coupling import AffineCoupling
from numpyro_amortized.networks.flows.conditional_affine import ConditionalAffine
from numpyro_amortized.networks.flows.permutation import Permutation
from numpyro_amortized.networks.flows.repeated import (
    Chain,
    Repeated,
    chain_inverse,
    chain_transform,
)
from numpyro_amortized.networks.flows.spline_coupling import SplineCoupling
from numpyro_amortized.networks.flows.standardize import Standardize

__all__ = ["ConditionalFlow", "affine_flow", "coupling_flow", "flatten_batch", "spline_flow",
           "standard_normal_log_prob"]

_LOG_2PI = math.log(2 * math.pi)


def flatten_batch(x, condition):
    """Broadcast leading dims of ``x (..., D)`` and ``condition (..., C)`` and flatten them:
    ``(x (N, D), condition (N, C), the broadcast batch shape)``."""
    batch = jnp.broadcast_shapes(x.shape[:-1], condition.shape[:-1])
    x = jnp.broadcast_to(x, batch + x.shape[-1:]).reshape(-1, x.shape[-1])
    c = jnp.broadcast_to(condition, batch + condition.shape[-1:]).reshape(-1, condition.shape[-1])
    return x, c, batch


def standard_normal_log_prob(z):
    """``log N(z; 0, I)`` over the last axis."""
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * z.shape[-1] * _LOG_2PI


class ConditionalFlow(nnx.Module):
    """A normalizing flow ``q(u | condition)`` with a standard-normal base.

    :param bijections: bijections from base to data side, each with
        ``transform_and_log_det(x, condition)`` and ``inverse_and_log_det(y, condition)``.
    :param dim: dimension of ``u``.

    **Example**::

        flow = coupling_flow(2, 3, rngs=nnx.Rngs(0))
        u, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(0), jnp.zeros((5, 3)), (100,))
        u.shape  # (100, 5, 2)
    """

    def __init__(self, bijections, dim):
        self.bijections = nnx.List(bijections)
        self.dim = dim

    def _forward(self, z, c):
        return chain_transform(self.bijections, z, c)

    def _inverse(self, x, c):
        return chain_inverse(self.bijections, x, c)

    def layers(self):
        """The bijections one by one, with :class:`Repeated` blocks unstacked (copies: for
        inspection)."""
        out = []
        for b in self.bijections:
            for block in (b.unstacked() if isinstance(b, Repeated) else [b]):
                out += list(block.bijections) if isinstance(block, Chain) else [block]
        return out

    def layer_types(self):
        """The classes of :meth:`layers`, in order, read from the structure (no copies)."""
        out = []
        for b in self.bijections:
            for block in ([b.stacked] * b.length if isinstance(b, Repeated) else [b]):
                out += [type(x) for x in (block.bijections if isinstance(block, Chain)
                                          else [block])]
        return out

    def log_prob(self, u, condition):
        """``log q(u | condition)``; leading dims of ``u`` and ``condition`` broadcast."""
        x, c, batch = flatten_batch(u, condition)
        z, ld = self._inverse(x, c)
        return jnp.reshape(standard_normal_log_prob(z) + ld, batch)

    def sample_and_log_prob(self, rng_key, condition, sample_shape=()):
        """Draw ``sample_shape`` samples per condition row: shape ``sample_shape + cond_batch + (dim,)``."""
        batch = tuple(sample_shape) + condition.shape[:-1]
        z = jax.random.normal(rng_key, batch + (self.dim,))
        zf, c, _ = flatten_batch(z, condition)
        u, ld = self._forward(zf, c)
        log_q = standard_normal_log_prob(zf) - ld
        return jnp.reshape(u, batch + (self.dim,)), jnp.reshape(log_q, batch)

    def sample(self, rng_key, condition, sample_shape=()):
        """Samples only (see :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(rng_key, condition, sample_shape)[0]

    def validation_log_prob(self, u, condition, rng_key=None):
        """What :func:`~numpyro_amortized.fit` tracks on held-out simulations: ``log q``."""
        return self.log_prob(u, condition)

    def training_log_prob(self, u, condition, rng_key=None):
        """What NPE maximizes: for one flow, its ``log q(u | condition)``, plus the Gaussian
        likelihood of a fitted :class:`ConditionalAffine` end (``rng_key`` is not used; a
        density trained by a stochastic objective draws from it)."""
        end = self.fitted_end()
        if end is None:
            return self.log_prob(u, condition)
        x, c, batch = flatten_batch(u, condition)
        z, ld = self._inverse(x, c)
        for b in self.bijections[end + 1:][::-1]:  # fixed standardizations behind the layer
            x = b.inverse_and_log_det(x)[0]
        fit = self.bijections[end].gaussian_log_prob(x, c)
        return jnp.reshape(standard_normal_log_prob(z) + ld + fit, batch)

    def fitted_end(self):
        """The position of a fitted :class:`ConditionalAffine` at the data end of the flow
        (behind fixed standardizations), or ``None``."""
        for i in range(len(self.bijections) - 1, -1, -1):
            b = self.bijections[i]
            if isinstance(b, ConditionalAffine) and b.fitted:
                return i
            if not isinstance(b, Standardize):
                return None
        return None

    def member_log_probs(self, u, condition):
        """One flow has no members to weight on held-out data: ``None``."""
        return


def coupling_flow(dim, context_dim, *, transformer="spline", num_layers=None, hidden=(64, 64),
                  num_bins=8, bound=5.0, learned_interval=False, conditional_affine=False,
                  loc=None, scale=None, rngs: nnx.Rngs):
    """Stack ``num_layers`` of [coupling, ActNorm, permutation], then a fixed standardization.

    The layers are one :class:`~numpyro_amortized.networks.flows.Repeated` block (their
    parameters stacked, applied by one ``lax.scan``), so a deep flow compiles as fast as one
    layer; ``ConditionalFlow.layers()`` lists them one by one.

    :param dim: dimension of the latents.
    :param context_dim: length of the summary vector.
    :param transformer: ``"spline"`` (rational-quadratic, the default), ``"affine"``, or
        ``"mixed"`` (affine and spline couplings alternating).
    :param num_layers: coupling layers (default 5 for splines, 6 for affine).
    :param hidden: conditioner widths.
    :param num_bins: spline bins; :param bound: spline interval ``[-bound, bound]``.
    :param learned_interval: splines whose output interval and tail slopes the conditioner
        sets (see :class:`~numpyro_amortized.networks.flows.SplineCoupling`).
    :param conditional_affine: end with a :class:`ConditionalAffine` layer (a per-dataset
        location and scale), so the flow's tails contract with the posterior; ``"fitted"``:
        one whose location and scale also fit the latents' mean and sd (see
        :class:`ConditionalAffine`).
    :param loc: prior mean of the unconstrained latents; :param scale: their sd.

    **Example**::

        flow = coupling_flow(3, 8, transformer="affine", num_layers=4, rngs=nnx.Rngs(0))
    """
    spline = lambda: SplineCoupling(dim, context_dim, num_bins=num_bins, bound=bound,
                                    hidden=hidden, learned_interval=learned_interval, rngs=rngs)
    affine = lambda: AffineCoupling(dim, context_dim, hidden=hidden, rngs=rngs)
    if transformer == "spline":
        makers, default_layers = [spline], 5
    elif transformer == "affine":
        makers, default_layers = [affine], 6
    elif transformer == "mixed":
        makers, default_layers = [affine, spline], 6
    else:
        raise ValueError(
            f"transformer must be 'spline', 'affine' or 'mixed', got {transformer!r}."
        )
    num_layers = default_layers if num_layers is None else num_layers
    period = len(makers)  # blocks of one structure repeat with this period
    blocks = [[] for _ in range(-(-num_layers // period))]
    for i in range(num_layers):
        blocks[i // period] += [makers[i % period](), ActNorm(dim),
                                Permutation(dim, num_transformed=dim - dim // 2, rngs=rngs)]
    full = [Chain(b) for b in blocks if len(b) == 3 * period]
    layers = [Repeated(full)] if full else []  # compiled once, applied num_layers times
    for rest in blocks[len(full):]:  # an incomplete last period
        layers += rest
    if conditional_affine:
        layers.append(ConditionalAffine(dim, context_dim, hidden=hidden,
                                        fitted=conditional_affine == "fitted", rngs=rngs))
    loc = jnp.zeros(dim) if loc is None else loc
    scale = jnp.ones(dim) if scale is None else scale
    layers.append(Standardize(loc, scale))
    return ConditionalFlow(layers, dim)


def spline_flow(dim, context_dim, **kwargs):
    """:func:`coupling_flow` with rational-quadratic spline couplings (the default flow)."""
    return coupling_flow(dim, context_dim, transformer="spline", **kwargs)


def affine_flow(dim, context_dim, **kwargs):
    """:func:`coupling_flow` with affine (Real NVP) couplings."""
    return coupling_flow(dim, context_dim, transformer="affine", **kwargs)
