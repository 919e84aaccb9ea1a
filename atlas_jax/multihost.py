"""Host-side values across JAX processes: which rows of a global batch this host filled, and
gathering host-side results (rewards, scored samples, counters) onto every process.

A global batch is assembled from per-host batches (`pipeline.to_global`), host h's rows forming
block h (`device_batch`). Host-side work on it (decoding completions, scoring them against the
host's answers) happens per host on its own block, and its results are gathered back in process
order, which is the global row order, so every process holds the same full values. With one
process every function here is the identity or a plain copy.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def own_rows(num_rows: int) -> slice:
    """This process's block of a global batch of `num_rows` rows (or of rows derived from it in
    the same order, like the sampler's G rollouts per prompt): [h * n, (h + 1) * n) for process h,
    n = num_rows / process_count. Row j of the host batch is global row h * n + j."""
    n, me = num_rows // jax.process_count(), jax.process_index()
    return slice(me * n, (me + 1) * n)


def gather(tree):
    """On every process, for each array of `tree`: the full value of a global jax.Array, or the
    concatenation along axis 0, in process order, of every process's host array (equal shapes
    on every process). Returns numpy arrays."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (e.g. after process 0 wrote files
    the others read); a no-op with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
