"""Building blocks shared by summary networks and flows."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["MLP", "Buffer", "compress_tails", "host_lecun_normal", "least_squares",
           "map_sets", "masked_moments", "stack_modules", "stack_on_host",
           "summarize_sets"]

TAIL = 5.0
CHUNK_VALUES = 2**18  # one activation of a chunk: 1 MB in float32


def compress_tails(z, tail=TAIL):
    """``z`` where ``|z| <= tail``, ``sign(z) (tail + log1p(|z| - tail))`` beyond: continuous
    with a continuous derivative, monotone, so no information is lost."""
    excess = jnp.maximum(jnp.abs(z) - tail, 0.0)
    return jnp.where(excess > 0, jnp.sign(z) * (tail + jnp.log1p(excess)), z)


def host_lecun_normal():
    """LeCun-normal kernel initializer (a normal truncated at two sds, variance
    ``1 / fan_in``, as ``nnx.initializers.lecun_normal``) drawn by numpy from the given key.

    Building a network eagerly with JAX's initializer compiles a sampling program for every
    distinct kernel shape (about 0.2 s each on a CPU); drawn on the host, set-up compiles
    nothing for it.
    """

    def init(key, shape, dtype=jnp.float32):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        rng = np.random.default_rng(np.asarray(key, np.uint32).ravel())
        draws = rng.standard_normal(shape)
        while np.any(out := np.abs(draws) > 2.0):  # resample outside two sds
            draws[out] = rng.standard_normal(int(out.sum()))
        fan_in = int(np.prod(shape[:-1])) or 1
        return jnp.asarray(draws * (np.sqrt(1.0 / fan_in) / 0.87962566103423978), dtype)

    return init


def stack_on_host(states):
    """Stack a list of equally shaped pytrees on a new leading axis, through numpy (eager
    ``jnp.stack`` compiles a program per shape and count)."""
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *states)


def stack_modules(modules, owner):
    """One module whose variables are those of ``modules`` (of one structure: same classes,
    sizes and variables) stacked on a leading axis; ``owner`` names the caller in errors."""
    graphdef, states = None, []
    for m in modules:
        g, state = nnx.split(m)
        if graphdef is not None and g != graphdef:
            raise ValueError(f"{owner} needs modules of one structure (same classes, sizes and "
                             "variables).")
        graphdef = g
        states.append(state)
    if graphdef is None:
        raise ValueError(f"{owner} needs at least one module.")
    return nnx.merge(graphdef, stack_on_host(states))


class Buffer(nnx.Variable):
    """A non-trainable array (standardization statistics): kept out of the optimizer."""


class MLP(nnx.Module):
    """A multilayer perceptron with SiLU activations and a linear skip path.

    ``MLP(x) = out(hidden(x)) + skip(x)``: the linear path lets the network represent the
    linear part of a map exactly (posterior locations are often close to linear in the data's
    summaries), the hidden layers learn the rest.

    :param in_features: input width.
    :param hidden: widths of the hidden layers.
    :param out_features: output width.
    :param zero_init: initialize the output and skip layers to zero (so couplings start as the
        identity).
    :param rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features, hidden, out_features, *, zero_init=False, rngs):
        sizes = [in_features, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, kernel_init=host_lecun_normal(), rngs=rngs)
             for a, b in itertools.pairwise(sizes)]
        )
        init = nnx.initializers.zeros_init() if zero_init else host_lecun_normal()
        self.out = nnx.Linear(sizes[-1], out_features, kernel_init=init, rngs=rngs)
        self.skip = nnx.Linear(in_features, out_features, use_bias=False,
                               kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x):
        h = x
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return self.out(h) + self.skip(x)


def map_sets(fn, *sets, width=64, chunk_values=None):
    """``fn(*sets)`` for a function that treats each set on its own, with the sets on the
    leading axis of every array (``(B, N, ...)``: ``B`` sets of ``N`` rows) and of its output.

    :param width: the widest per-row activation of ``fn`` (a per-row network's width).
    :param chunk_values: the size of one such activation in a chunk, in values (default
        ``CHUNK_VALUES``, 2**18).

    When the per-row activations of all sets (``B N width`` values) are four chunks or more,
    the sets go through ``fn`` in chunks of about ``chunk_values / width`` rows (at least one
    set), one after the other, and the backward pass recomputes each chunk's forward pass
    instead of storing it: the activations then stay in the processor's cache instead of going
    out to memory whole. On a CPU the gradient of a DeepSet of width 64 on 256 sets of 200
    rows is then about twice as fast; on smaller activations, which fit in the cache anyway,
    chunks only add work. A chunk takes every ``count``-th set (the leading axis is split as
    ``(B / count, count)`` and the loop runs over ``count``), so a batch sharded over devices
    stays sharded. On accelerators (JAX's default backend not the CPU), whose many cores a
    loop of chunks would leave idle, always one pass.

    **Example** (a per-row network's mean over each set's unmasked rows)::

        pooled = map_sets(lambda x, m: (net(x) * m[..., None]).sum(1) / m.sum(1, keepdims=True),
                          x, mask.astype(x.dtype), width=64)
    """
    b, n = sets[0].shape[:2]
    want = -(-b * n * width // (chunk_values or CHUNK_VALUES))  # the number of chunks
    count = next((c for c in range(min(want, b), 4 * want + 1) if b % c == 0), None)
    if want < 4 or count is None or jax.default_backend() != "cpu":
        return fn(*sets)
    split = lambda a: jnp.swapaxes(jnp.reshape(a, (b // count, count) + a.shape[1:]), 0, 1)
    out = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(map(split, sets)))
    return jax.tree.map(lambda o: jnp.reshape(jnp.swapaxes(o, 0, 1), (b,) + o.shape[2:]), out)


def summarize_sets(set_features, outer, data, width):
    """``outer`` of each set's features (``set_features(x, mask)``, by :func:`map_sets`: in
    chunks of sets on many rows) and the fixed-size data of a ``DataBatch``: a set summary
    network's call."""
    features = map_sets(set_features, data.set, data.mask, width=width)
    if data.flat is not None:
        features = jnp.concatenate([features, data.flat], axis=-1)
    return outer(features)


def buffer_value(b: Buffer):
    """The value of a buffer, with gradients stopped."""
    return jax.lax.stop_gradient(jnp.asarray(b[...]))


def masked_moments(x, mask, *, max_corr_features=16):
    """Standardize each dataset of a masked set by its own mean and sd per feature.

    :param x: ``(..., N, F)`` observations; ``mask``: ``(..., N)``.
    :return: the standardized set (zero where masked) and ``[mean, log sd]`` (``(..., F)``
        each), plus the feature correlations (upper triangle) when ``F <= max_corr_features``.
    """
    m = mask[..., None].astype(x.dtype)
    n_safe = jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    mean = jnp.sum(x * m, axis=-2) / n_safe
    var = jnp.sum(((x - mean[..., None, :]) * m) ** 2, axis=-2) / n_safe
    sd = jnp.sqrt(var + 1e-6)
    z = (x - mean[..., None, :]) / sd[..., None, :] * m
    stats = [mean, jnp.log(sd)]
    f = x.shape[-1]
    if 1 < f <= max_corr_features:
        corr = jnp.einsum("...ni,...nj->...ij", z, z) / n_safe[..., None]
        i, j = np.triu_indices(f, k=1)
        stats.append(corr[..., i, j])
    return z, stats


def spd_solve(a, b):
    """``(a^-1 b, diag(a^-1))`` for small symmetric positive definite matrices ``a (..., K, K)``
    by Gauss-Jordan elimination unrolled over ``K`` (no pivoting needed), in elementwise array
    operations: jaxlib's batched LAPACK solvers wait on XLA's CPU thread pool from inside it,
    which deadlocks a training step on large batches of groups."""
    k, r = a.shape[-1], b.shape[-1]
    m = jnp.concatenate([a, b, jnp.broadcast_to(jnp.eye(k, dtype=a.dtype), a.shape)], axis=-1)
    for i in range(k):
        row = m[..., i, :] / m[..., i, i:i + 1]
        m = (m - m[..., :, i:i + 1] * row[..., None, :]).at[..., i, :].set(row)
    return m[..., k:k + r], jnp.diagonal(m[..., k + r:], axis1=-2, axis2=-1)


def least_squares(y, x, total, n, *, ridge=1e-3):
    """Each response's least-squares fit on ``[1, x]`` within each set of rows: the
    coefficients (tails compressed), the log residual sd and the log standard errors
    (``(..., R * (K + 1))``, ``(..., R)``, ``(..., K + 1)`` for ``K`` covariates).

    :param y: ``(..., N, R)`` responses; :param x: ``(..., N, K)`` covariates.
    :param total: sums a ``(..., N, *rest)`` array over the (unmasked) rows of each set.
    :param n: ``(..., 1)`` number of rows of each set (at least 1).
    :param ridge: added to the normal equations' diagonal, so that sets with fewer rows than
        coefficients stay finite.

    A network approximates a division poorly; where the data are informative, the posterior's
    location is a regression fit known to a small fraction of the prior's scale, which pooled
    moments and correlations encode too coarsely.
    """
    x = jnp.concatenate([jnp.ones_like(x[..., :1]), x], axis=-1)
    xtx = total(x[..., :, None] * x[..., None, :]) / n[..., None]
    xty = total(x[..., :, None] * y[..., None, :]) / n[..., None]
    yty = total(y**2) / n
    a = xtx + ridge * jnp.eye(x.shape[-1], dtype=x.dtype)
    beta, inv_diag = spd_solve(a, xty)  # (..., K, R), (..., K)
    rss = yty - 2 * (beta * xty).sum(-2) + jnp.einsum("...ir,...ik,...kr->...r", beta, xtx, beta)
    return [compress_tails(jnp.reshape(beta, beta.shape[:-2] + (-1,))),
            0.5 * jnp.log(jnp.maximum(rss, 0.0) + 1e-4),
            0.5 * (jnp.log(inv_diag) - jnp.log(n))]
