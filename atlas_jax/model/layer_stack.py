"""Running a run of identical layers: unrolled or as one `lax.scan`, with a rematerialisation policy.

The parameters stay one module per layer (`layers[i]`, the Hugging Face layout that checkpoints,
LoRA and the sharding rules address). For a scan, each forward stacks the layers' parameters along
a new leading axis and scans one layer body over them: XLA compiles the body once instead of once
per layer (a 28-layer 7B step compiles in the time of one layer), and the backward pass holds only
each layer's input, not every layer's activations. The stacked copy is one more (sharded) copy of
the layers' parameters and gradients per step; MaxText keeps them stacked instead, at the price of
a checkpoint layout of its own.

Rematerialisation policies (`ModelConfig.remat`), what the backward pass keeps of each layer:
- 'none': everything the forward computed (fastest, most memory);
- 'full': only the layer's input; the whole layer is recomputed (least memory);
- 'save_projections': the outputs of the weight matmuls (q/k/v/o and MLP projections), so only the
  cheap elementwise work and the attention itself are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no jax.checkpoint at all
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(
    layers: Sequence[nnx.Module],
    body: Callable[[nnx.Module, Any, jax.Array], Any],
    carry: Any,
    *,
    scan: bool,
    remat: str,
    first_index: int = 0,
) -> Any:
    """carry after `body(layer, carry, index)` for each layer in order; returns the final carry.

    body: (layer, carry, index int32 scalar) -> carry; `index` counts from `first_index` (the
    layer's position in the whole model, e.g. its slot in a stacked KV cache). It must only read
    the layer's variables. scan=True needs layers of one structure (same parameter shapes);
    remat: a key of REMAT_POLICIES ('none' for forwards without a backward pass).
    """
    if not layers:
        return carry
    scan = scan and len(layers) > 1
    if remat == "none" and not scan:
        # The modules themselves run (not copies), so a first call may create variables in them
        # (qwix creates LoRA adapters in such a forward: `lora.apply`).
        for i, layer in enumerate(layers):
            carry = body(layer, carry, jnp.asarray(first_index + i, jnp.int32))
        return carry

    # Otherwise each layer runs as a pure function of its parameters, on a copy merged from them:
    # jax.checkpoint and lax.scan need one (and nnx.remat fails inside other traces, e.g. the SFT
    # step's eval_shape of a micro-batch).
    def pure(graphdef):
        def run(state, carry, index):
            return body(nnx.merge(graphdef, state), carry, index)

        # Inside a scan, common-subexpression elimination cannot merge the recomputation away.
        return run if remat == "none" else jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=not scan)

    if not scan:
        for i, layer in enumerate(layers):
            graphdef, state = nnx.split(layer)
            carry = pure(graphdef)(state, carry, jnp.asarray(first_index + i, jnp.int32))
        return carry
    states = [nnx.state(layer) for layer in layers]
    structures = {jax.tree.structure(s) for s in states}
    shapes = {tuple(x.shape for x in jax.tree.leaves(s)) for s in states}
    if len(structures) != 1 or len(shapes) != 1:
        raise ValueError("model.scan_layers: the layers differ in their parameters (e.g. adapters on only some "
                         "layers); scan needs identical layers: set model.scan_layers=False")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    indices = first_index + jnp.arange(len(layers), dtype=jnp.int32)

    layer_fn = pure(nnx.graphdef(layers[0]))

    def step(carry, xs):
        state, index = xs
        return layer_fn(state, carry, index), None

    carry, _ = jax.lax.scan(step, carry, (stacked, indices))
    return carry
