"""The checkpoint file: a header, a SHA-256 checksum and a msgpack body, read and written
safely (atomic writes, no pickle, every malformed file a :class:`CheckpointError`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile

import jax
import msgpack
import numpy as np
from flax import serialization

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_writable",
    "decode_model_args",
    "decode_value",
    "encode_model_args",
    "flatten_tree",
    "read_file",
    "unflatten_tree",
    "write_file",
]

MAGIC = b"numpyro_amortized checkpoint\n"
FORMAT_VERSION = 3  # 2: the guide's state (flow chosen at set-up, best parameters as trained);
# 3: a coupling flow's layers stacked (Repeated), its permutations stored as buffers
_DIGEST = 64  # hex characters of the SHA-256 checksum, followed by a newline


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model or guide it is loaded for."""


# ---------------------------------------------------------------------------- trees <-> flat
def flatten_tree(tree) -> dict:
    """``{path: numpy array}`` for the leaves of a pytree (paths as ``jax.tree_util.keystr``)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def unflatten_tree(template, flat: dict, what: str, path, hint=None):
    """Fill ``template``'s structure with ``flat``'s arrays, checking names, shapes and dtypes.
    ``hint`` replaces the advice given when they do not fit."""
    hint = hint or ("The checkpoint was written for another architecture or by another "
                    "numpyro_amortized version: build the guide with the summary_net and flow it "
                    "was trained with and pass it as guide=, or load it with the version that "
                    "wrote it.")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing = [n for n in names if n not in flat]
    extra = [n for n in flat if n not in set(names)]
    if missing or extra:
        raise CheckpointError(
            f"{path}: the {what} in the checkpoint do not fit this guide's networks "
            f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}; unexpected: "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''}). {hint}"
        )
    out = []
    for name, (_, leaf) in zip(names, leaves, strict=True):
        value = np.asarray(flat[name])
        leaf = np.asarray(leaf)
        if value.shape != leaf.shape:
            raise CheckpointError(
                f"{path}: {what} {name} has shape {value.shape} in the checkpoint but "
                f"{leaf.shape} in this guide. {hint}"
            )
        out.append(value.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------- model arguments
def _encode_value(v):
    if v is None:
        return {"kind": "none"}
    if isinstance(v, bool):
        return {"kind": "bool", "value": v}
    if isinstance(v, int | float):
        return {"kind": type(v).__name__, "value": v}
    if isinstance(v, str):
        return {"kind": "str", "value": v}
    if isinstance(v, np.ndarray | jax.Array | np.generic):
        return {"kind": "array", "value": np.asarray(v)}
    raise TypeError(type(v).__name__)


def decode_value(d):
    kind = d["kind"]
    if kind == "none":
        return None
    if kind == "array":
        return np.asarray(d["value"])
    if kind in ("bool", "int", "float", "str"):
        return {"bool": bool, "int": int, "float": float, "str": str}[kind](d["value"])
    raise CheckpointError(f"unknown model argument kind {kind!r}")


def encode_model_args(args, kwargs):
    """The model's example arguments as plain data, or ``(None, reason)``."""
    try:
        enc = {
            "args": {str(i): _encode_value(a) for i, a in enumerate(args)},
            "kwargs": {k: _encode_value(v) for k, v in kwargs.items()},
        }
    except TypeError as e:
        return None, f"a model argument is a {e}, which a checkpoint does not store"
    return enc, None


def decode_model_args(enc):
    args = tuple(decode_value(enc["args"][str(i)]) for i in range(len(enc["args"])))
    kwargs = {k: decode_value(v) for k, v in enc["kwargs"].items()}
    return args, kwargs


# ---------------------------------------------------------------------------- file format
def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary(path):
    """A temporary file beside ``path``, named after it, this host and this process."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.{socket.gethostname()}.{os.getpid()}."
    return tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")


def _remove_orphans(path):
    """Remove temporary files of ``path`` left by writers on this host that no longer run (a
    process killed while saving); other processes' files in progress are left alone."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.{socket.gethostname()}."
    for entry in os.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_writable(path):
    """Refuse, before any training, a checkpoint path whose folder cannot be written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _temporary(path)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise CheckpointError(f"{path}: the checkpoint cannot be written there ({e}); choose a "
                              "folder you can write to.") from None
    if os.path.exists(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file; choose a file path for the "
                              "checkpoint.")


def write_file(path, body: dict):
    """Write ``body`` atomically: a temporary file in the same folder, then a rename, so an
    interruption leaves the previous checkpoint intact."""
    payload = serialization.msgpack_serialize(body)
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + digest + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a file opened for writing would be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_file(path) -> dict:
    """Read and verify a checkpoint file; every failure is a :class:`CheckpointError`."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file (a folder, device or pipe); a "
                              "checkpoint is a file written by numpyro_amortized.save.")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file.") from None
    if not raw.startswith(MAGIC):
        raise CheckpointError(
            f"{path}: not a numpyro_amortized checkpoint (it does not start with the checkpoint "
            "header). Write checkpoints with numpyro_amortized.save or fit(..., checkpoint=...)."
        )
    head = len(MAGIC)
    digest = raw[head:head + _DIGEST]
    payload = raw[head + _DIGEST + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(
            f"{path}: the checkpoint is truncated or corrupted (its checksum does not match its "
            f"contents; {len(raw)} bytes). Use an intact copy, or the periodic checkpoint "
            "written before it."
        )
    try:
        body = serialization.msgpack_restore(payload)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:  # a forged file
        raise CheckpointError(f"{path}: the checkpoint body cannot be decoded ({e}).") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{path}: the checkpoint body is not a checkpoint record.")
    try:
        version = int(body.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise CheckpointError(
            f"{path}: checkpoint format {version}, written by numpyro_amortized "
            f"{body.get('package_version', '?')}; this numpyro_amortized reads format "
            f"{FORMAT_VERSION} only. "
            + ("Upgrade numpyro_amortized to load it." if newer else
               "Load it with the numpyro_amortized version that wrote it, or retrain.")
        )
    return body
