"""The training state (step, params, optimizer state, rng) and its sharded creation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax import sharding as shd


class TrainState(NamedTuple):
    """step: int32[]; params: nnx.State of the model's parameters; opt_state: optax state
    (Adam moments carry the parameters' logical axes, so they shard the same way);
    rng: uint32[2] raw PRNG key (checkpointable as a plain array)."""

    step: jax.Array
    params: nnx.State
    opt_state: Any
    rng: jax.Array


def state_shardings(abstract: TrainState, mesh, rules=shd.RULES) -> TrainState:
    replicated = NamedSharding(mesh, P())
    return TrainState(
        replicated,
        shd.state_shardings(abstract.params, mesh, rules),
        shd.state_shardings(abstract.opt_state, mesh, rules),
        replicated,
    )


def create(model: nnx.Module, tx: optax.GradientTransformation, mesh, *, seed: int, rules=shd.RULES):
    """(graphdef, TrainState, shardings) for an already-sharded model; the optimizer state is
    created by a jitted init directly in its shards."""
    graphdef, params = nnx.split(model)
    abstract = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.eval_shape(lambda: params),
        jax.eval_shape(tx.init, params),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = state_shardings(abstract, mesh, rules)

    def init(params):
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params)
    return graphdef, state, shardings


def abstract_state(state_shapes: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target of a checkpoint."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )
