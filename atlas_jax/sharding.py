"""The device mesh, the logical-axis rules table, and sharded initialisation.

Parameters carry logical axis names (`nnx.Param(..., axes=(...))`, see `model/layers.py`);
`RULES` maps each name onto mesh axes. The mesh always has the axes ('data', 'fsdp',
'tensor'); a size-1 axis costs nothing, so the same rules serve 1 CPU, 8 fake devices and a pod.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("patch", None),
    ("ops", None),
    ("norm", None),
    ("length", None),
)

log = logging.getLogger(__name__)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one -1 entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape {shape}: expected 3 sizes for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, {len(devices)} are available")
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=RULES
) -> P:
    """Maps logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a dimension not divisible by its mesh axes is replicated instead
    (e.g. 2 key/value heads on a tensor axis of 4), and a mesh axis is used at most once.
    """
    table = dict(rules)
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
            if shape is not None and targets and shape[i] % int(np.prod([mesh.shape[t] for t in targets])):
                targets = ()
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return P(*spec)


def constrain_rows(x: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """`x` with its leading (row) axis sharded over the mesh's batch axes, like the inputs, the
    others left to XLA; under `mesh`, else the current one (`jax.set_mesh`); a no-op without a
    mesh or where the rows do not divide over the batch axes (left to XLA, not replicated). Pins an
    activation's layout where propagation could pick another: e.g. the residual stream in the
    layer scan after the visual operations' scatter, whose update arrives sharded over 'embed'
    (XLA then kept the whole batch's activations on every chip: bench/RESULTS.md)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim == 0:
        return x
    rows = logical_to_spec(("batch",), x.shape[:1], mesh)[0]
    if rows is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(rows, *([P.UNCONSTRAINED] * (x.ndim - 1)))))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """NamedSharding for every array in an (abstract) NNX state, from each Variable's `axes`."""

    def one(v):
        if not _is_var(v):  # bare array leaves (e.g. optimizer counters)
            return NamedSharding(mesh, P())
        if not hasattr(v.get_value(), "shape"):  # e.g. optax.MaskedNode of a frozen parameter: no leaves
            return v
        axes = v.get_metadata().get("axes")
        shape = v.shape
        spec = P() if axes is None else logical_to_spec(axes, shape, mesh, rules)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def init_program(make: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> tuple[nnx.GraphDef, Callable[[], nnx.State]]:
    """(graphdef, init): `init()` is the jitted constructor whose outputs are laid out in their shards.

    Shapes come first (`nnx.eval_shape`), then the shardings from the logical axes; `init` has
    them as out_shardings, so XLA partitions the constructor itself (random bits included, with
    JAX's partitionable RNG) and each device computes only its own shards. Call it (or `.lower()`
    it) under `jax.set_mesh(mesh)`.
    """
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    return graphdef, jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)


def sharded_init(make: Callable[[], nnx.Module], mesh: Mesh, rules=RULES) -> nnx.Module:
    """Builds a module with every parameter created directly in its shards (see `init_program`):
    no device ever holds the full unsharded model."""
    graphdef, init = init_program(make, mesh, rules)
    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def describe(state: nnx.State, shardings: nnx.State | None = None) -> str:
    """One line per parameter: path, shape, dtype, logical axes and (optionally) its spec."""
    lines, total = [], 0
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    sflat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for path, v in flat:
        n = int(np.prod(v.shape))
        total += n
        name = "/".join(map(str, path))
        axes = v.get_metadata().get("axes") if _is_var(v) else None
        spec = sflat.get(path)
        spec = getattr(getattr(spec, "value", spec), "spec", "")
        lines.append(f"{name:70s} {str(tuple(v.shape)):22s} {str(v.dtype):9s} {axes} {spec}")
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)
