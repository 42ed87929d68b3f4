"""Data parallelism: a one-axis device mesh, and reading replicated arrays on the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

__all__ = ["data_mesh", "host_tree", "host_value", "key_data", "replicate"]


def data_mesh(devices=None):
    """A one-axis mesh (``"data"``) over ``devices``: ``None`` for all devices (of all
    processes, under ``jax.distributed``), an int for the first ``n``, or a list of devices."""
    all_devices = jax.devices()
    if devices is None:
        devs = all_devices
    elif isinstance(devices, int):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices={devices}, but JAX sees {len(all_devices)} devices.")
        devs = all_devices[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), ("data",))


def host_value(x):
    """A replicated array as numpy, also when its devices span several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


def replicate(tree, sharding):
    """Arrays holding the same values in every process, placed on all devices of
    ``sharding`` (also when they span several processes)."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def host_tree(tree):
    return jax.tree.map(host_value, tree)


def key_data(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key
