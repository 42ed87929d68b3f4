"""A bounded store of compiled programs, owned by the object that uses them.

Checks that run on many datasets (the model's log density, refinement, NUTS) compile one
program per data shape. The object that runs them (a guide, a
:class:`~numpyro_amortized.compare.NUTSRunner`) keeps them in a :class:`Programs`, so that a
second dataset of the same shapes reuses the program and nothing outlives its owner.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import log_density

from numpyro_amortized.compile_options import jit_once
from numpyro_amortized.simulation import observed_values

__all__ = [
    "SIMULATION_BLOCK",
    "Programs",
    "abstract_key",
    "log_joint_program",
    "log_joints",
    "merge_static",
    "observed_values_compiled",
    "simulate_in_blocks",
    "split_static",
    "take_rows",
]

SIMULATION_BLOCK = 1024  # simulations per call of the one compiled simulation program


class Programs:
    """At most ``max_programs`` compiled programs by key, the least recently used dropped first.

    :param max_programs: how many to keep.

    **Example**::

        programs = Programs(4)
        f = programs.get(("log_joint", spec), lambda: jax.jit(log_joint))
    """

    def __init__(self, max_programs=16):
        if int(max_programs) < 1:
            raise ValueError(f"max_programs={max_programs}: keep at least one program.")
        self.max_programs = int(max_programs)
        self._store: OrderedDict = OrderedDict()

    def get(self, key, build):
        """The program under ``key``, built by ``build()`` (and kept) when missing."""
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        program = build()
        self._store[key] = program
        while len(self._store) > self.max_programs:
            self._store.popitem(last=False)
        return program

    def put(self, key, program):
        """Keep ``program`` under ``key`` (replacing what was there)."""
        self._store.pop(key, None)
        self.get(key, lambda: program)

    def __contains__(self, key):
        return key in self._store

    def __len__(self):
        return len(self._store)

    def clear(self):
        """Drop every program."""
        self._store.clear()


def split_static(tree):
    """Split a pytree into its array leaves (traced) and a hashable spec of everything else."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
    dynamic = [jnp.asarray(x) for x, a in zip(leaves, is_array) if a]
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    return dynamic, (treedef, tuple(is_array), static)


def merge_static(dynamic, spec):
    treedef, is_array, static = spec
    it = iter(dynamic)
    return jax.tree.unflatten(treedef, [next(it) if a else s for a, s in zip(is_array, static)])


def abstract_key(dynamic) -> tuple:
    """Shapes and dtypes of the traced leaves: one compilation serves all data like these."""
    return tuple((tuple(x.shape), str(x.dtype)) for x in dynamic)


def log_joints(model, args, kwargs, latents):
    """``log p(theta, x)`` of ``model`` for each draw of ``latents`` (a leading draw axis), to
    be traced inside a program."""
    return jax.vmap(lambda z: log_density(model, args, kwargs, z)[0])(latents)


def log_joint_program(model, spec):
    """The jitted ``(latents, dynamic) -> log p(theta, x)`` of ``model`` for data with the
    static parts ``spec`` (see :func:`split_static`), vectorized over the draws."""
    def log_joint(latents, dynamic):
        return log_joints(model, *merge_static(dynamic, spec), latents)

    return jax.jit(log_joint)


def observed_values_compiled(programs, model, args, kwargs) -> dict:
    """The model's observed values in ``args``/``kwargs`` (as
    :func:`~numpyro_amortized.simulation.observed_values`) through a program compiled once per
    kind of data and kept in ``programs``: a model with ``scan`` costs ~0.1 s to trace eagerly.
    A model that cannot be traced (one that converts its arguments with numpy, say) is run
    eagerly, and remembered as such."""
    dynamic, spec = split_static((args, kwargs))

    def values(dyn):
        a, kw = merge_static(dyn, spec)
        return observed_values(model, *a, **kw)

    program = programs.get(("observed_values", spec), lambda: jax.jit(values))
    if program is not None:
        try:
            return program(dynamic)
        except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
            programs.put(("observed_values", spec), None)
    return observed_values(model, *args, **kwargs)


def simulate_in_blocks(programs, simulate, rng_key, num_simulations, args, kwargs):
    """``simulate(key, block, *args, **kwargs)`` called ``ceil(n / block)`` times, joined and
    cut to ``n = num_simulations``, where ``block`` is :data:`SIMULATION_BLOCK`: one program,
    compiled once per kind of data and kept in ``programs``, draws the pilot, the validation set
    and a simulation bank of any size (compiling the model's simulation costs about as much as a
    training step's). Fewer than ``SIMULATION_BLOCK / 8`` simulations (a pilot kept small on
    purpose, for large datasets) use ``n`` rounded up to a power of two instead, so that no
    more than eight times the asked memory is used. Block ``i`` uses ``fold_in(rng_key, i)``;
    the result is on the default device."""
    dynamic, spec = split_static((args, kwargs))
    n = int(num_simulations)
    size = SIMULATION_BLOCK if 8 * n >= SIMULATION_BLOCK else 1 << max(n - 1, 0).bit_length()

    def block(key, dyn):
        a, kw = merge_static(dyn, spec)
        return simulate(key, size, *a, **kw)

    def constants(key, _):  # a model that reads its arguments with numpy: they stay constants
        return simulate(key, size, *args, **kwargs)

    try:
        program = programs.get(("simulate_block", size, spec), lambda: jit_once(block))
    except TypeError:  # an argument that cannot be a cache key: compile for this call only
        program = jit_once(block)
    if program is None:
        program = jit_once(constants)
    keys = [jax.random.fold_in(rng_key, i) for i in range(-(-int(num_simulations) // size))]
    try:
        blocks = [program(keys[0], dynamic)]
    except (jax.errors.JAXTypeError, jax.errors.JAXIndexError):
        programs.put(("simulate_block", size, spec), None)
        program = jit_once(constants)
        blocks = [program(keys[0], dynamic)]
    blocks += [program(k, dynamic) for k in keys[1:]]
    if len(blocks) == 1:
        return take_rows(blocks[0], 0, n)
    return take_rows(jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks), 0, n)


@functools.partial(jax.jit, static_argnums=(1, 2))
def take_rows(tree, start, stop):
    """``x[start:stop]`` for every leaf of ``tree``, in one compiled program (eager slices
    compile one small program per leaf)."""
    return jax.tree.map(lambda x: x[start:stop], tree)
