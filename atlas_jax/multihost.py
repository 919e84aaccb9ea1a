"""Host-side values across JAX processes: which rows of a global batch this host filled, and
gathering host-side results (rewards, scored samples, counters) onto every process.

A global batch is assembled from per-host batches (`pipeline.to_global`); host-side work on it
(decoding completions, scoring them against the host's answers) happens per host, and its
results are gathered back so every process holds the same full, globally ordered values. With
one process every function here is the identity or a plain copy.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_rows(x: jax.Array) -> np.ndarray:
    """int[n]: the global indices, along axis 0, of the rows this process holds of `x`, in the
    order `jax.make_array_from_process_local_data` places a host's local rows (its shards'
    row blocks, sorted). So row j of the host batch that built `x` is global row host_rows(x)[j]."""
    index_map = x.sharding.addressable_devices_indices_map(x.shape)
    blocks = {(s[0].start or 0, x.shape[0] if s[0].stop is None else s[0].stop) for s in index_map.values()}
    return np.concatenate([np.arange(a, b) for a, b in sorted(blocks)])


def gather(tree):
    """On every process, for each array of `tree`: the full value of a global jax.Array, or the
    concatenation along axis 0, in process order, of every process's host array (equal shapes
    on every process). Returns numpy arrays."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_rows(values: np.ndarray, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """Each process's `values[i]` for global row `rows[i]` -> the full [num_rows, ...] array, on
    every process. The processes' rows must cover 0..num_rows-1 exactly once."""
    all_values, all_rows = gather(np.asarray(values)), gather(np.asarray(rows, np.int32))
    if sorted(all_rows.tolist()) != list(range(num_rows)):
        raise ValueError(f"gather_rows: the processes' rows do not cover 0..{num_rows - 1} exactly once")
    out = np.empty((num_rows,) + all_values.shape[1:], all_values.dtype)
    out[all_rows] = all_values
    return out


def gather_objects(obj) -> list:
    """[process 0's obj, process 1's obj, ...] on every process (JSON-serialisable objects)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = gather(np.array([data.size], np.int32))
    padded = np.zeros((1, int(sizes.max())), np.uint8)
    padded[0, : data.size] = data
    everyone = gather(padded)
    return [json.loads(everyone[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


def sum_over_hosts(count: int) -> int:
    """The sum of an integer count (e.g. skipped records) over all processes."""
    return int(gather(np.array([count], np.int32)).sum())
