"""Sharded initialisation on a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices: every parameter is
laid out as the rules table says, and no device ever builds a full unsharded parameter."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax import sharding
from atlas_jax.model import vlm
from test_kv_cache import tiny_cfg

# What the rules table must give for a few parameters of the tiny model (vocab 320, width 128,
# 4 heads, 2 key/value heads, MLP 384), written out so a changed rule shows up here.
PINNED = {
    ("embed", "embedding"): P("tensor", "fsdp"),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
    ("final_norm", "scale"): P(),
    ("layers", 0, "attn", "q_proj", "kernel"): P("fsdp", "tensor", None),
    ("layers", 0, "attn", "k_proj", "kernel"): P("fsdp", "tensor", None),
    ("layers", 0, "attn", "q_proj", "bias"): P("tensor", None),
    ("layers", 0, "attn", "o_proj", "kernel"): P("tensor", None, "fsdp"),
    ("layers", 0, "mlp", "gate_proj", "kernel"): P("fsdp", "tensor"),
    ("layers", 0, "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
    ("vision", "patch_embed", "kernel"): P(None, "fsdp"),
    ("vision", "blocks", 0, "attn", "qkv", "kernel"): P("fsdp", None, "tensor", None),
    ("visual_ops", "wq"): P(None, "fsdp", "tensor", None),
    ("visual_ops", "wo"): P(None, "tensor", None, "fsdp"),
    ("visual_ops", "gate"): P(),
}


def rule_spec(axes, shape, mesh) -> P:
    """The spec `sharding.RULES` gives a parameter: each logical axis goes to its mesh axes, minus a
    mesh axis an earlier dimension took, one of size 1, or a set that does not divide the dimension."""
    table, used, spec = dict(sharding.RULES), set(), []
    for name, n in zip(axes, shape):
        target = table[name] if name is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if targets and n % int(np.prod([mesh.shape[t] for t in targets])):
            targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


@pytest.fixture(scope="module")
def built():
    """(mesh, compiled init program, the model it builds, abstract state)."""
    cfg = tiny_cfg("module")
    mesh = sharding.make_mesh((2, 2, 2))
    make = lambda: vlm.VLM(cfg, rngs=nnx.Rngs(0))
    graphdef, init = sharding.init_program(make, mesh)
    with jax.set_mesh(mesh):
        compiled = init.lower().compile()
        state = compiled()
    return mesh, compiled, nnx.merge(graphdef, state), nnx.state(nnx.eval_shape(make))


def _params(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_every_parameter_is_sharded_as_the_rules_table_says(built):
    mesh, compiled, model, _ = built
    out_shardings = dict(nnx.to_flat_state(compiled.output_shardings))
    uses = {a: 0 for a in sharding.MESH_AXES}
    for path, var in _params(model):
        x = var.get_value()
        want = NamedSharding(mesh, rule_spec(var.get_metadata()["axes"], x.shape, mesh))
        for got in (x.sharding, out_shardings[path].get_value()):
            assert got.is_equivalent_to(want, x.ndim), (path, got.spec, want.spec)
        if path in PINNED:
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, PINNED[path]), x.ndim), (path, x.sharding.spec)
        for a in sharding.MESH_AXES:
            uses[a] += any(a == s or (isinstance(s, tuple) and a in s) for s in x.sharding.spec)
    assert set(PINNED) <= {p for p, _ in _params(model)}
    assert uses["data"] == 0, "parameters are replicated over the data axis"
    assert uses["fsdp"] > 40 and uses["tensor"] > 40, uses


def test_each_device_holds_only_its_fraction(built):
    mesh, compiled, model, _ = built
    per_device, n = 0, 0
    for path, var in _params(model):
        n += 1
        x = var.get_value()
        split = [int(np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())])) for s in x.sharding.spec]
        split += [1] * (x.ndim - len(split))
        want = tuple(n // k for n, k in zip(x.shape, split))
        assert len(x.addressable_shards) == mesh.size
        for shard in x.addressable_shards:
            assert shard.data.shape == want, (path, shard.data.shape, want)
        # The distinct shards tile the array exactly once.
        distinct = {tuple((i.start, i.stop) for i in s.index): s for s in x.addressable_shards}
        assert sum(s.data.size for s in distinct.values()) == x.size, path
        per_device += int(np.prod(want)) * x.dtype.itemsize
    # The program's outputs on one device are exactly these shards (plus a pointer per output in
    # the result tuple), not the full parameters (the full model is ~4x more).
    out = compiled.memory_analysis().output_size_in_bytes
    assert per_device <= out <= per_device + 16 * n, (out, per_device)


def test_the_init_program_never_builds_a_full_parameter(built):
    """In the partitioned program each device runs, no array (values or random bits) has the full
    shape of a sharded parameter; shapes that are also some parameter's shard shape, or a replicated
    parameter's shape, cannot be told apart and are not checked."""
    mesh, compiled, _, abstract = built
    hlo = compiled.as_text()
    shardings = dict(nnx.to_flat_state(compiled.output_shardings))
    flat = [(p, tuple(v.shape), shardings[p].get_value().shard_shape(v.shape)) for p, v in nnx.to_flat_state(abstract)]
    ambiguous = {s for _, _, s in flat} | {full for _, full, s in flat if s == full}
    checked = [p for p, full, s in flat if s != full and full not in ambiguous]
    for p, full, s in flat:
        if p in checked:
            dims = re.escape("[" + ",".join(map(str, full)) + "]")
            hit = re.search(r"\b(f32|u32|bf16|s32)" + dims, hlo)
            assert hit is None, f"{'/'.join(map(str, p))}: the init program holds a full {hit.group(0)}"
    names = {"/".join(map(str, p)) for p in checked}
    assert {"embed/embedding", "lm_head/kernel", "layers/0/mlp/gate_proj/kernel", "visual_ops/wq"} <= names, names


def test_constrain_rows_shards_rows_over_the_batch_axes_and_leaves_the_rest_to_xla():
    mesh = sharding.make_mesh((2, 2, 2))
    # The input sharded over 'embed' (fsdp), as the visual operations' scatter left the stream.
    x = jax.device_put(np.ones((8, 6, 4), np.float32), NamedSharding(mesh, P(None, None, "fsdp")))
    with jax.set_mesh(mesh):
        rows = jax.jit(sharding.constrain_rows)(x)
        odd = jax.jit(sharding.constrain_rows)(np.ones((3, 4), np.float32))  # 3 rows: not divisible by 4
    assert rows.sharding.spec[0] == ("data", "fsdp") and "fsdp" not in rows.sharding.spec[1:]
    assert len({s.data.shape for s in rows.addressable_shards}) == 1 and rows.addressable_shards[0].data.shape[0] == 2
    assert odd.shape == (3, 4) and sharding.constrain_rows(x) is x  # no mesh set: a no-op
