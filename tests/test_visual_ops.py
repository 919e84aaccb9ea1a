"""Visual-operation modules: inert at gate 0, causal when open, trainable, interpretable."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atlas_jax import sharding
from atlas_jax.data.device_batch import batch_shardings, model_inputs
from atlas_jax.model import vlm
from hf_model_fixture import IMAGE, VEND, VSTART, Example, example, jax_batch
from test_kv_cache import FUNC, tiny_cfg

def _mesh1():
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    a = example(rng, 3, [(1, 4, 6)], 2)
    a.ids += [5, 6, FUNC[1], 7, 8, FUNC[0], 9]
    b = example(rng, 2, [(1, 4, 4), (1, 4, 4)], 4)
    b.ids += [FUNC[2], 7, 8]
    cfg = tiny_cfg("module")
    return jax_batch([a, b], cfg, pad_left=False)


def _run(model, batch):
    args, kw = model_inputs(jax.tree.map(jnp.asarray, batch))
    return model(*args, **kw)


def test_gate_zero_changes_nothing(batch):
    plain = vlm.create(tiny_cfg("vocab"), _mesh1(), seed=3)
    ops = vlm.create(tiny_cfg("module"), _mesh1(), seed=3)
    assert plain.visual_ops is None and ops.visual_ops is not None
    a, _, aux_a = _run(plain, batch)
    b, _, aux_b = _run(ops, batch)
    assert "ops" not in aux_a and "ops" in aux_b
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_open_gate_changes_only_positions_from_a_functional_token(batch):
    model = vlm.create(tiny_cfg("module"), _mesh1(), seed=3)
    closed, _, _ = _run(model, batch)
    model.visual_ops.gate[...] = jnp.ones(3)
    opened, _, _ = _run(model, batch)
    diff = np.abs(np.asarray(opened) - np.asarray(closed)).max(-1)  # [B, T]
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        first = np.flatnonzero(np.isin(ids[b], FUNC))[0]
        n = batch["attention_mask"][b].sum()
        assert diff[b, :first].max() == 0.0, "positions before the first functional token must not change"
        assert (diff[b, first:n] > 1e-6).all(), "positions at and after a functional token must change"


def _image(rng, t, h, w):
    """Token ids and patch rows of one image (t*h*w patches, t*h*w/4 merged units)."""
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND], rng.standard_normal((t * h * w, 1176)).astype(np.float32)


def test_a_functional_token_never_sees_a_later_image():
    """The module at a functional token attends only to image tokens before it: a later image (moved,
    altered or absent) leaves every logit at and before the token unchanged, while an earlier image
    changes what the open module writes there."""
    rng = np.random.default_rng(7)
    ids_a, rows_a = _image(rng, 1, 4, 6)
    ids_b, rows_b = _image(rng, 1, 4, 4)
    prefix = [1, 2, 3] + ids_a + [4, 5, 6, FUNC[0]]
    f = len(prefix) - 1
    after = [7, 8]
    noise = lambda r: r + rng.standard_normal(r.shape).astype(np.float32)
    samples = {  # name: (ids, patch rows, grids)
        "base": (prefix + ids_b + after, [rows_a, rows_b], [(1, 4, 6), (1, 4, 4)]),
        "later_altered": (prefix + ids_b + after, [rows_a, noise(rows_b)], [(1, 4, 6), (1, 4, 4)]),
        "later_moved": (prefix + [9, 10, 11] + _image(rng, 1, 4, 8)[0] + after, [rows_a, rng.standard_normal((32, 1176)).astype(np.float32)], [(1, 4, 6), (1, 4, 8)]),
        "no_later": (prefix + after, [rows_a], [(1, 4, 6)]),
        "earlier_altered": (prefix + ids_b + after, [noise(rows_a), rows_b], [(1, 4, 6), (1, 4, 4)]),
    }
    names = list(samples)
    examples = [Example(list(ids), rows, grids) for ids, rows, grids in samples.values()]
    batch = jax_batch(examples, tiny_cfg("module"), pad_left=False)
    model = vlm.create(tiny_cfg("module"), _mesh1(), seed=3)
    closed = np.asarray(_run(model, batch)[0])
    model.visual_ops.gate[...] = jnp.ones(3)
    opened, _, aux = _run(model, batch)
    opened = np.asarray(opened)
    row = {n: i for i, n in enumerate(names)}

    # The attention map of the token: all its mass on the earlier image's 6 units, none on the later one's.
    attn, pos = np.asarray(aux["ops"]["attn"]), np.asarray(aux["ops"]["position"])
    for n in ("base", "later_altered", "later_moved"):
        assert pos[row[n], 0] == f
        np.testing.assert_allclose(attn[row[n], 0, :6].sum(), 1.0, atol=1e-6)
        assert (attn[row[n], 0, 6:] == 0).all(), f"{n}: attention on an image after the functional token"

    base = opened[row["base"], : f + 1]
    for n in ("later_altered", "later_moved", "no_later"):
        np.testing.assert_allclose(opened[row[n], : f + 1], base, atol=1e-6, rtol=0, err_msg=n)
    # The later image did change what follows it (the comparison above is not vacuous).
    n_b = len(prefix) + len(ids_b)
    assert np.abs(opened[row["later_altered"], n_b:] - opened[row["base"], n_b:]).max() > 1e-3

    # What the open module writes at the token depends on the earlier image.
    written = opened[:, f] - closed[:, f]
    assert np.abs(written[row["base"]]).max() > 1e-3
    assert np.abs(written[row["earlier_altered"]] - written[row["base"]]).max() > 1e-3
    np.testing.assert_allclose(closed[row["earlier_altered"], :4], closed[row["base"], :4], atol=1e-6, rtol=0)


def _loss(model, batch):
    logits, _, _ = _run(model, batch)
    ids = jnp.asarray(batch["input_ids"])
    m = jnp.asarray(batch["attention_mask"])[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return (ce * m).sum() / m.sum()


def test_lm_loss_trains_the_modules(batch):
    model = vlm.create(tiny_cfg("module"), _mesh1(), seed=3)
    g = nnx.grad(_loss)(model, batch).visual_ops
    # Closed gates: only the gates receive gradient (the modules' output is multiplied by 0).
    assert (np.abs(np.asarray(g.gate[...])) > 0).all()
    model.visual_ops.gate[...] = jnp.full(3, 0.5)
    g = nnx.grad(_loss)(model, batch).visual_ops
    for name in ("wq", "wk", "wv", "wo", "gate", "query_norm", "image_norm"):
        per_op = np.abs(np.asarray(getattr(g, name)[...])).reshape(3, -1).sum(-1)
        assert (per_op > 0).all(), f"{name}: every operation used in the batch gets gradient"


def test_attention_maps_cover_the_samples_own_earlier_image_tokens(batch):
    model = vlm.create(tiny_cfg("module"), _mesh1(), seed=3)
    model.visual_ops.gate[...] = jnp.ones(3)
    _, _, aux = _run(model, batch)
    attn, pos, op = (np.asarray(aux["ops"][k]) for k in ("attn", "position", "op"))
    ids = batch["input_ids"]
    n_units = [6, 8]  # sample 0: one 4x6 image; sample 1: two 4x4 images
    for b in range(2):
        used = op[b] >= 0
        np.testing.assert_array_equal(pos[b][used], np.flatnonzero(np.isin(ids[b], FUNC)))
        np.testing.assert_array_equal(op[b][used], [FUNC.index(t) for t in ids[b][np.isin(ids[b], FUNC)]])
        np.testing.assert_allclose(attn[b][used].sum(-1), 1.0, atol=1e-5)
        assert (attn[b][used][:, n_units[b]:] == 0).all(), "no mass on padding patches"
        assert (attn[b][used][:, : n_units[b]] > 0).all()
        assert (attn[b][~used] == 0).all()


def test_sharded_forward_equals_single_device():
    rng = np.random.default_rng(1)
    examples = [example(rng, 2 + i, [(1, 4, 4 + 2 * (i % 2))], 3) for i in range(4)]
    for i, e in enumerate(examples):
        e.ids += [5, FUNC[i % 3], 7]
    cfg = tiny_cfg("module")
    batch = jax_batch(examples, cfg, pad_left=False)
    single = vlm.create(cfg, _mesh1(), seed=5)
    single.visual_ops.gate[...] = jnp.ones(3)
    ref, _, _ = _run(single, batch)

    mesh = sharding.make_mesh((2, 2, 2))
    model = vlm.create(cfg, mesh, seed=5)
    model.visual_ops.gate[...] = jnp.ones(3)
    # Every parameter's exact layout is checked in test_sharded_init.py.
    assert model.layers[0].mlp.gate_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert model.visual_ops.wq[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

    sharded = jax.device_put(batch, batch_shardings(batch, mesh))

    @nnx.jit
    def fwd(m, b):
        args, kw = model_inputs(b)
        return m(*args, **kw)[0]

    with jax.set_mesh(mesh):
        out = fwd(model, sharded)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_remat_and_bfloat16(batch):
    """Rematerialised layers give the same loss and gradients; bf16 compute stays close to f32."""
    import dataclasses

    cfg = tiny_cfg("module")
    base = vlm.create(cfg, _mesh1(), seed=3)
    base.visual_ops.gate[...] = jnp.full(3, 0.5)
    state = nnx.state(base)
    remat = vlm.create(dataclasses.replace(cfg, remat="full"), _mesh1(), seed=3)
    nnx.update(remat, state)
    la, ga = nnx.value_and_grad(_loss)(base, batch)
    lb, gb = nnx.value_and_grad(_loss)(remat, batch)
    assert abs(float(la) - float(lb)) < 1e-6
    for a, b in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)

    bf16 = vlm.create(dataclasses.replace(cfg, dtype="bfloat16"), _mesh1(), seed=3)
    nnx.update(bf16, state)
    lc = _loss(bf16, batch)
    assert abs(float(lc) - float(la)) < 0.02 * float(la)
