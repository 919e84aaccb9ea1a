"""The training state (step, params, optimizer state) and its sharded creation. It holds no PRNG
key: steps that sample derive theirs from the config's seed and the step (`jax.random.fold_in`)."""

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
    (Adam moments carry the parameters' logical axes, so they shard the same way)."""

    step: jax.Array
    params: nnx.State
    opt_state: Any


def state_shardings(abstract: TrainState, mesh, rules=shd.RULES) -> TrainState:
    replicated = NamedSharding(mesh, P())
    return TrainState(
        replicated,
        shd.state_shardings(abstract.params, mesh, rules),
        shd.state_shardings(abstract.opt_state, mesh, rules),
    )


def create(model: nnx.Module, tx: optax.GradientTransformation, mesh, *, rules=shd.RULES):
    """(graphdef, TrainState, shardings) for an already-sharded model; the optimizer state is
    created by a jitted init directly in its shards."""
    graphdef, params = nnx.split(model)
    shardings = abstract_create(params, tx, mesh, rules)[1]

    def init(params):
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params)
    return graphdef, state, shardings


def abstract_create(params: nnx.State, tx: optax.GradientTransformation, mesh, rules=shd.RULES) -> tuple[TrainState, TrainState]:
    """(abstract TrainState carrying its shardings, the shardings) of `create`'s state for these
    (real or abstract) params; nothing is created (the compile check lowers steps with it)."""
    shapes = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        jax.eval_shape(tx.init, params),
    )
    shardings = state_shardings(shapes, mesh, rules)
    return abstract_state(shapes, shardings), shardings


def abstract_state(state_shapes: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings (what `jit(...).lower` takes without arrays)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )
