"""The optimizer covers the trained parameters alone: the SFT step with a frozen vision tower and
with LoRA moves the trained parameters as plain optax AdamW on that subset does, leaves the frozen
ones bit-identical, holds no state for them, and refuses by name a checkpoint of the earlier form
(frozen parameters in the state tree, given zero updates by `optax.set_to_zero`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atlas_jax import sharding
from atlas_jax import checkpoint
from atlas_jax.checkpoint import CheckpointError, Checkpoints
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import lora, vlm
from atlas_jax.train import optimizer, sft, train_state
from test_kv_cache import tiny_cfg
from test_sft_step import _batch, _put

# eps well above the gradients' rounding noise: Adam's first steps move each parameter by about
# lr * sign(gradient), which would turn last-bit differences in near-zero gradients (two programs'
# summation orders) into lr-sized ones.
HYPER = dict(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-3, clip_norm=0.05)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, 2, 2), jax.devices()[:4])


def _model(mesh, adapters: bool):
    with jax.set_mesh(mesh):
        model = vlm.create(tiny_cfg("module"), mesh, seed=7)
        model.visual_ops.gate[...] = jnp.full(3, 0.3)
        if adapters:
            model = lora.apply(model, lora.LoraConfig(rank=4, alpha=8.0), seed=0)
            b = nnx.state(model, nnx.LoRAParam)
            keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(b))))
            nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), b))
    return model


def _reference_adamw():
    """AdamW with clipping written out from optax, on the trained subset only."""
    h = HYPER
    rate = optimizer.schedule(h["lr"], h["warmup_steps"], h["total_steps"])
    return optax.chain(optax.clip_by_global_norm(h["clip_norm"]),
                       optax.adamw(rate, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"]))


def _previous_form(params, train):
    """The optimizer as it was before the frozen parameters left it: every parameter in the state
    tree, the frozen ones given zero updates by `optax.set_to_zero` in a 'freeze' group."""
    h = HYPER
    rate = optimizer.schedule(h["lr"], h["warmup_steps"], h["total_steps"])
    adamw = optax.adamw(rate, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"])
    trained, frozen = nnx.split_state(params, train, ...)
    labels = nnx.merge_state(jax.tree.map(lambda _: "train", trained), jax.tree.map(lambda _: "freeze", frozen))
    groups = {"train": adamw, "vision": adamw, "freeze": optax.set_to_zero()}
    return optax.chain(optax.clip_by_global_norm(h["clip_norm"]), optax.multi_transform(groups, labels))


@pytest.mark.parametrize("kind", ["freeze_vision", "lora"])
def test_step_updates_the_trained_subset_as_optax_does_and_leaves_the_frozen_bit_identical(mesh, kind):
    model = _model(mesh, adapters=kind == "lora")
    train = optimizer.trainable(freeze_vision=kind == "freeze_vision", adapters_only=kind == "lora")
    tx = optimizer.make_optimizer(nnx.state(model), train=train, **HYPER)
    graphdef, state, shardings = train_state.create(model, tx, mesh)
    start = jax.device_get(state.params)
    trained0, frozen0 = nnx.split_state(start, train, ...)
    assert len(jax.tree.leaves(frozen0)) > 0 and len(jax.tree.leaves(trained0)) > 0

    # Adam's two moments per trained parameter, scalar counters, nothing for the frozen ones.
    trained_size = sum(x.size for x in jax.tree.leaves(trained0))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * trained_size

    batch, bsh = _put(_batch(model.cfg), mesh)
    step = sft.make_train_step(graphdef, tx, state_sharding=shardings, batch_sharding=bsh, train=train)
    metrics = []
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
    got_trained, got_frozen = nnx.split_state(jax.device_get(state.params), train, ...)
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(got_frozen), strict=True):
        np.testing.assert_array_equal(a, b)

    # The reference: gradients of the token-mean loss w.r.t. the trained subset, plain optax on it.
    host_batch = jax.device_get(batch)

    def loss(trained, frozen):
        m = nnx.merge(graphdef, trained, frozen)
        args, kw = model_inputs(host_batch)
        hidden, _, _ = m(*args, head=False, **kw)
        ce_sum, sums = sft.sft_loss(hidden, m.output_head(), host_batch)
        return ce_sum / sums["tokens"]

    ref = _reference_adamw()
    params, opt_state = trained0, ref.init(trained0)
    with jax.set_mesh(mesh):
        for m in metrics:
            grads = jax.jit(jax.grad(loss))(params, frozen0)
            updates, opt_state = ref.update(grads, opt_state, params)
            np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
            np.testing.assert_allclose(m["update_norm"], optax.tree.norm(updates), rtol=1e-5)
            params = optax.apply_updates(params, updates)
            np.testing.assert_allclose(m["param_norm"], optax.tree.norm(nnx.merge_state(params, frozen0)), rtol=1e-6)
    moved = 0
    for a, b, s in zip(jax.tree.leaves(got_trained), jax.tree.leaves(params), jax.tree.leaves(trained0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        moved += not np.array_equal(np.asarray(a), np.asarray(s))
    assert moved > 0


def test_checkpoint_of_the_previous_form_is_refused_by_name(tmp_path, mesh):
    """Optimizer state written by the form with a 'freeze' group (its layout differs) does not
    restore into the current one: the restore names the missing entry instead of loading."""
    model = _model(mesh, adapters=False)
    train = optimizer.trainable(freeze_vision=True)
    params = nnx.state(model)
    old_tx = _previous_form(params, train)
    with jax.set_mesh(mesh):
        written = train_state.TrainState(jnp.int32(1), params, old_tx.init(params))
        with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
            assert ckpt.save(1, written, config={})
            tx = optimizer.make_optimizer(params, train=train, **HYPER)
            abstract, _ = train_state.abstract_create(params, tx, mesh)
            with pytest.raises(CheckpointError, match="has no opt_state/"):
                ckpt.restore(1, abstract)
            # The parameters alone (what `init_from` reads for a new run) still load.
            restored = checkpoint.init_from(tmp_path, abstract.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
