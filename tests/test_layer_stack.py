"""Layers under a scan and the rematerialisation policies: same values and gradients as the
unrolled model, and remat bounds the live activations in the compiler's own memory report."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax import sharding
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import presets, vlm
from atlas_jax.model.config import ConfigError
from hf_model_fixture import IMAGE, VEND, VSTART, example, jax_batch

FUNC = (310, 311, 312)


def _cfg(**kw):
    cfg = presets.tiny(vocab_size=320, image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND, video_token_id=301)
    # Vision: blocks 0-1 window, 2 full, 3 window (unrolled: three runs; scanned: one scan with a
    # lax.cond between the two attentions); decoder: layers 0-1, ops, 2-3.
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, depth=4, fullatt_block_indexes=(2,)))
    return presets.with_visual_ops(cfg, FUNC, mode="module", layer=1, num_heads=2, head_dim=16).replace(**kw)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    examples = [example(rng, 3, [(1, 4, 6)], 2), example(rng, 6, [(1, 8, 8), (1, 4, 4)], 2)]
    for e in examples:
        e.ids += [FUNC[0], 5, 6, FUNC[2], 7]
    return jax.tree.map(jnp.asarray, jax_batch(examples, _cfg(), pad_left=False))


def _loss_and_grads(cfg, batch):
    model = vlm.create(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), seed=1)
    model.visual_ops.gate[...] = jnp.array([0.7, -0.5, 1.1])  # open, so the modules matter
    (ids, pos, mask), images = model_inputs(batch)
    weights = jax.random.normal(jax.random.key(0), (*ids.shape, cfg.text.vocab_size))

    def loss(m):
        logits, _, _ = m(ids, pos, mask, **images)
        return jnp.sum(logits * weights) / ids.size

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def unrolled(batch):
    return _loss_and_grads(_cfg(), batch)


# Unrolled with remat: tests/test_visual_ops.py::test_remat_and_bfloat16.
@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "full"), (True, "save_projections")])
def test_same_values_and_gradients_as_unrolled(batch, unrolled, scan, remat):
    ref_value, ref_grads = unrolled
    value, grads = _loss_and_grads(_cfg(scan_layers=scan, remat=remat), batch)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    flat_ref, flat = jax.tree.leaves_with_path(ref_grads), dict(jax.tree.leaves_with_path(grads))
    assert len(flat_ref) == len(flat)
    for path, g_ref in flat_ref:
        np.testing.assert_allclose(flat[path], g_ref, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_scanned_visual_ops_outputs_equal_unrolled(batch):
    """Scanned, the operations run inside the layer scan (a lax.cond after their layer); their
    outputs (attention over the image tokens, positions, ops) are the unrolled model's."""
    (ids, pos, mask), images = model_inputs(batch)
    outs = []
    for scan in (False, True):
        model = vlm.create(_cfg(scan_layers=scan), sharding.make_mesh((1, 1, 1), jax.devices()[:1]), seed=1)
        model.visual_ops.gate[...] = jnp.array([0.7, -0.5, 1.1])
        outs.append(nnx.jit(lambda m: m(ids, pos, mask, **images)[2]["ops"])(model))
    assert int((outs[0]["op"] >= 0).sum()) == 4  # both samples' functional tokens ran
    for key in ("attn", "position", "op"):
        np.testing.assert_allclose(outs[1][key], outs[0][key], atol=1e-6, err_msg=key)


def test_unknown_remat_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.remat='some'.*'full'"):
        _cfg(remat="some")


B, T = 16, 256


def _temp_bytes(num_layers: int, remat: str) -> tuple[int, int]:
    """XLA's temporaries for the gradient of a text-only forward (B x T tokens) with
    `num_layers` scanned decoder layers, and the bytes of one layer's parameters."""
    cfg = presets.tiny(vocab_size=256).replace(scan_layers=True, remat=remat)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=num_layers))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vlm.VLM(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    pos = jax.ShapeDtypeStruct((B, 3, T), jnp.int32)

    def loss(state, ids, pos):
        hidden, _, _ = nnx.merge(graphdef, state)(ids, pos, jnp.ones(ids.shape, bool), head=False)
        return jnp.mean(hidden.astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(state, ids, pos).compile()
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["layers"][0]))
    return compiled.memory_analysis().temp_size_in_bytes, layer_bytes


def test_remat_bounds_live_activations():
    """Each extra scanned layer costs the backward pass its whole activation set without remat,
    but with remat='full' only its input ([B, T, D] float32) plus its stacked parameters and
    their gradient."""
    per_layer = {}
    for remat in ("none", "full"):
        (deep, layer_bytes), (shallow, _) = _temp_bytes(6, remat), _temp_bytes(2, remat)
        per_layer[remat] = (deep - shallow) / 4
    bound = B * T * 128 * 4 + 2 * layer_bytes
    assert per_layer["full"] <= 1.05 * bound
    assert per_layer["none"] > 3 * bound


def test_lora_adapters_apply_under_a_scan():
    """qwix creates the adapters in an unrolled forward and intercepts the scanned copies too."""
    from atlas_jax.model import lora

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    ids = jnp.arange(24).reshape(2, 12) % 256
    pos = jnp.broadcast_to(jnp.arange(12)[None, None], (2, 3, 12))
    logits = {}
    for scan in (False, True):
        with jax.set_mesh(mesh):
            model = lora.apply(vlm.create(presets.tiny(vocab_size=256).replace(scan_layers=scan), mesh, seed=1),
                               lora.LoraConfig(rank=4), seed=0)
        assert model.cfg.scan_layers == scan
        adapters = nnx.state(model, nnx.LoRAParam)
        nnx.update(model, jax.tree.map(lambda x: x + 0.05, adapters))  # B != 0: the adapters matter
        logits[scan] = model(ids, pos, jnp.ones(ids.shape, bool))[0]
        nnx.update(model, lora.adapters_off(nnx.state(model, nnx.LoRAParam)))
        assert np.abs(model(ids, pos, jnp.ones(ids.shape, bool))[0] - logits[scan]).max() > 1e-2
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-5)
