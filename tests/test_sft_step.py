"""The SFT step: loss equals transformers' masked LM loss, exact gradient accumulation, sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax import hf_checkpoint, sharding
from atlas_jax.data.device_batch import batch_shardings, model_inputs
from atlas_jax.model import vlm
from atlas_jax.train import optimizer, sft, train_state
from hf_model_fixture import example, jax_batch, make_hf_checkpoint
from test_kv_cache import FUNC, tiny_cfg


def _sft_batch(examples, cfg, rng):
    b = jax_batch(examples, cfg, pad_left=False)
    B, T = b["input_ids"].shape
    loss_mask = np.zeros((B, T), bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        loss_mask[i, n - 6 : n] = True  # the "response": the last 6 tokens
    b["loss_mask"] = loss_mask
    b["functional_mask"] = np.isin(b["input_ids"], FUNC)
    return b


def test_loss_equals_transformers_masked_lm_loss(tmp_path):
    torch_model = make_hf_checkpoint(str(tmp_path), seed=4)
    model = hf_checkpoint.from_hf(str(tmp_path), mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    rng = np.random.default_rng(0)
    e = example(rng, 4, [(1, 4, 6)], 12)
    batch = _sft_batch([e], model.cfg, rng)
    args, kw = model_inputs({k: jnp.asarray(v) for k, v in batch.items()})
    hidden, _, _ = model(*args, head=False, **kw)
    ce_sum, sums = sft.sft_loss(hidden, model.output_head(), {k: jnp.asarray(v) for k, v in batch.items()})
    ours = float(ce_sum / sums["tokens"])

    ids = torch.tensor([e.ids])
    labels = ids.clone()
    labels[~torch.from_numpy(batch["loss_mask"][:, : ids.shape[1]])] = -100
    with torch.no_grad():
        out = torch_model(
            input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
            pixel_values=torch.from_numpy(np.concatenate(e.pixel_rows)), image_grid_thw=torch.tensor(e.grids),
            mm_token_type_ids=(ids == torch_model.config.image_token_id).int(),
        )
    assert abs(ours - out.loss.item()) < 1e-5
    assert int(sums["tokens"]) == 6  # every response token is a target (predicted from the token before it)


def _setup(mesh, accum, sgd=False, **model_kw):
    cfg = tiny_cfg("module").replace(**model_kw)
    model = vlm.create(cfg, mesh, seed=7)
    model.visual_ops.gate[...] = jnp.full(3, 0.3)
    if sgd:  # updates linear in the gradient, so parameters compare as tightly as gradients
        import optax

        tx = optax.sgd(0.5)
    else:
        tx = optimizer.make_optimizer(nnx_params(model), lr=1e-2, warmup_steps=0, total_steps=10, train=optimizer.trainable(freeze_vision=True))
    graphdef, state, shardings = train_state.create(model, tx, mesh)
    return cfg, graphdef, state, shardings, tx


def nnx_params(model):
    from flax import nnx

    return nnx.state(model)


def _batch(cfg, n=4):
    rng = np.random.default_rng(1)
    examples = []
    for i in range(n):
        e = example(rng, 2 + i, [(1, 4, 4 + 2 * (i % 2))], 4)
        e.ids += [5, FUNC[i % 3], 7, 8, 9, 10]
        examples.append(e)
    return _sft_batch(examples, cfg, rng)


def _put(batch, mesh):
    sh = batch_shardings(batch, mesh)
    return {k: jax.device_put(v, sh[k]) for k, v in batch.items()}, sh


@pytest.mark.parametrize("mesh_shape,model_kw", [((1, 1, 1), {}), ((2, 2, 2), {"remat": "full", "scan_layers": True})])
def test_grad_accumulation_is_exact_and_sharding_changes_nothing(mesh_shape, model_kw):
    """Two accumulated micro-batches equal one pass; neither sharding nor rematerialised,
    scanned layers with a frozen tower (the 7B configs' form) change the result."""
    results = {}
    for shape, accum, kw in (((1, 1, 1), 1, {}), (mesh_shape, 2, model_kw)):
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = sharding.make_mesh(shape, devices)
        cfg, graphdef, state, shardings, tx = _setup(mesh, accum, sgd=True, **kw)
        batch, bsh = _put(_batch(cfg), mesh)
        step = sft.make_train_step(graphdef, tx, state_sharding=shardings, batch_sharding=bsh, grad_accum=accum,
                                   train=optimizer.trainable(freeze_vision=True))
        with jax.set_mesh(mesh):
            state, m1 = step(state, batch)
            state, m2 = step(state, batch)
        results[(shape, accum)] = (jax.device_get(state.params), jax.device_get(m1), jax.device_get(m2))
    (pa, m1a, m2a), (pb, m1b, m2b) = results.values()
    assert abs(float(m1a["loss"]) - float(m1b["loss"])) < 1e-5
    assert abs(float(m1a["grad_norm"]) - float(m1b["grad_norm"])) < 1e-5
    assert float(m2a["loss"]) < float(m1a["loss"])  # it learns
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


def test_frozen_vision_tower_does_not_move():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg, graphdef, state, shardings, tx = _setup(mesh, 1)
    before = jax.device_get(state.params["vision"])
    batch, bsh = _put(_batch(cfg), mesh)
    step = sft.make_train_step(graphdef, tx, state_sharding=shardings, batch_sharding=bsh,
                               train=optimizer.trainable(freeze_vision=True))
    state, metrics = step(state, batch)
    after = jax.device_get(state.params["vision"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert float(metrics["update_norm"]) > 0
    assert 0 <= float(metrics["accuracy_functional"]) <= 1 and int(metrics["functional_tokens"]) == 4
