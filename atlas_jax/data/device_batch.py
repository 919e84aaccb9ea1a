"""The one batch contract between the input pipeline, the sampler and the train steps.

A batch is a flat dict. Every array in it has the batch axis first (`positions` is
int32[B, 3, T]), and the vision layout arrays (`LAYOUT_KEYS`) sit next to `pixel_values`.
Host-side metadata (answers, task names, uids) are lists and never go to devices. On several
hosts, host h holds rows [h * b, (h + 1) * b) of every global batch of B = n * b rows
(`pipeline.to_global`), so a global batch's rows follow the global record stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from atlas_jax import sharding
from atlas_jax.model.vision_layout import LAYOUT_KEYS

# The positional arguments of `VLM.__call__`, in order.
MODEL_ARGS = ("input_ids", "positions", "attention_mask")


def model_inputs(batch: Mapping) -> tuple[tuple, dict]:
    """(args, kwargs) of `VLM.__call__` from a batch.

    args: input_ids int32[B, T], positions int32[B, 3, T], attention_mask bool[B, T];
    kwargs: `pixel_values` float[B, P, C] and `vision` {LAYOUT_KEYS arrays} when the batch
    has images, else {}. Other keys (targets, rewards, metadata) are not read.
    """
    missing = [k for k in MODEL_ARGS if k not in batch]
    if missing:
        raise KeyError(f"batch has no {missing}; expected {MODEL_ARGS} (+ pixel_values and {LAYOUT_KEYS} with images)")
    args = tuple(batch[k] for k in MODEL_ARGS)
    if batch.get("pixel_values") is None:
        return args, {}
    missing = [k for k in LAYOUT_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch has pixel_values but no layout arrays {missing}")
    return args, {"pixel_values": batch["pixel_values"], "vision": {k: batch[k] for k in LAYOUT_KEYS}}


def batch_shardings(batch: Mapping, mesh) -> dict:
    """NamedSharding of each array of `batch` (numpy or jax): axis 0 over the mesh's batch axes
    ('data', 'fsdp'), the other axes replicated. Metadata (lists, ints) gets no entry."""
    return {k: sharding.batch_sharding(mesh, x.ndim) for k, x in batch.items() if isinstance(x, (np.ndarray, jax.Array))}
