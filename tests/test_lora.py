"""LoRA (qwix) on the tiny model: identity at init, merged export, the adapters-off reference,
adapter-only training; and a frozen vision tower that costs nothing in the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax import sharding
from atlas_jax.model import lora, vlm
from hf_model_fixture import example, jax_batch
from test_kv_cache import tiny_cfg

LORA = lora.LoraConfig(rank=4, alpha=8.0)
LORA_BF16 = lora.LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16")


def _model(mesh, seed=7):
    model = vlm.create(tiny_cfg("module"), mesh, seed=seed)
    model.visual_ops.gate[...] = jnp.full(3, 0.3)
    return model


def _inputs(cfg):
    rng = np.random.default_rng(1)
    b = jax_batch([example(rng, 3, [(1, 4, 4)], 6), example(rng, 2, [(1, 4, 6)], 5)], cfg, pad_left=False)
    from atlas_jax.data.device_batch import model_inputs

    return model_inputs({k: jnp.asarray(v) for k, v in b.items()})


def _logits(model, args, kw):
    return np.asarray(model(*args, **kw)[0])


def _with_random_b(model, seed=3):
    """Nonzero B (fresh adapters are zero), so the adapters change the function."""
    adapters = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
    nnx.update(model, adapters)
    return model


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, 2, 4), jax.devices())


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="rank=-1"):
        lora.LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="module_regex=.*vision"):
        lora.LoraConfig(rank=4, module_regex=".*")
    with pytest.raises(ValueError, match="base_dtype='fp8'"):
        lora.LoraConfig(rank=4, base_dtype="fp8")
    assert not lora.LoraConfig().enabled and LORA.scale == 2.0


def test_adapters_on_decoder_projections_only_and_zero_init_is_identity(mesh):
    base = _model(mesh)
    args, kw = _inputs(base.cfg)
    with jax.set_mesh(mesh):
        adapted = lora.apply(base, LORA, seed=0)
        paths = [p for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))]
        assert len(paths) == 2 * base.cfg.text.num_layers * 7  # A and B of q, k, v, o, gate, up, down
        assert all(p[0] == "layers" and p[-1] in ("kernel_lora_a", "kernel_lora_b") for p in paths)
        q = adapted.layers[0].attn.q_proj
        D, H, E = q.kernel.shape
        assert q.kernel_lora_a.shape == (D, 4) and q.kernel_lora_b.shape == (4, H * E)
        np.testing.assert_array_equal(np.asarray(q.kernel_lora_b[...]), 0)
        np.testing.assert_array_equal(_logits(adapted, args, kw), _logits(base, args, kw))


def test_merged_export_equals_adapter_model(mesh):
    base = _model(mesh)
    args, kw = _inputs(base.cfg)
    with jax.set_mesh(mesh):
        adapted = _with_random_b(lora.apply(base, LORA, seed=0))
        ours = _logits(adapted, args, kw)
        assert np.abs(ours - _logits(base, args, kw)).max() > 1e-3  # the adapters do act
        merged = lora.merged(adapted, LORA)
        assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
        np.testing.assert_allclose(_logits(merged, args, kw), ours, atol=1e-5, rtol=0)


def test_adapters_off_equals_the_base_model(mesh):
    base = _model(mesh)
    args, kw = _inputs(base.cfg)
    with jax.set_mesh(mesh):
        adapted = _with_random_b(lora.apply(base, LORA, seed=0))
        graphdef, params = nnx.split(adapted)
        off = jax.jit(lambda p: nnx.merge(graphdef, lora.adapters_off(p))(*args, **kw)[0])(params)
        np.testing.assert_allclose(np.asarray(off), _logits(base, args, kw), atol=1e-6, rtol=0)


def _lora_state(mesh, random_b=False, lora_cfg=LORA):
    from atlas_jax.train import optimizer, train_state

    with jax.set_mesh(mesh):
        adapted = lora.apply(_model(mesh), lora_cfg, seed=0)
    if random_b:
        _with_random_b(adapted)
    train = optimizer.trainable(freeze_vision=False, adapters_only=True)
    tx = optimizer.make_optimizer(nnx.state(adapted), lr=1e-2, warmup_steps=0, total_steps=10, train=train)
    graphdef, state, shardings = train_state.create(adapted, tx, mesh)
    return adapted.cfg, graphdef, state, shardings, tx, train


def _changed(before, after):
    """{path: whether the parameter moved}."""
    flat_b, flat_a = dict(nnx.to_flat_state(before)), dict(nnx.to_flat_state(after))
    return {p: not np.array_equal(np.asarray(v.get_value()), np.asarray(flat_a[p].get_value())) for p, v in flat_b.items()}


@pytest.mark.parametrize("base_dtype", ["param_dtype", "bfloat16"])
def test_sft_step_trains_only_the_adapters_which_alone_hold_optimizer_state(mesh, base_dtype):
    from atlas_jax.train import sft
    from test_sft_step import _batch, _put

    cfg, graphdef, state, shardings, tx, train = _lora_state(mesh, lora_cfg=LORA_BF16 if base_dtype == "bfloat16" else LORA)
    adapter_size = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state.params), nnx.LoRAParam)))
    # Adam's two moments for each adapter (and scalar counters); nothing for the base weights.
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * adapter_size
    before = jax.device_get(state.params)
    batch, bsh = _put(_batch(cfg), mesh)
    step = sft.make_train_step(graphdef, tx, state_sharding=shardings, batch_sharding=bsh, train=train)
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch)
    moved = _changed(before, jax.device_get(state.params))
    assert {p for p, m in moved.items() if m} == {p for p in moved if p[-1] == "kernel_lora_b"}  # A's gradient is 0 while B is
    assert float(metrics["grad_norm"]) > 0


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_bfloat16_base_halves_the_frozen_weights_and_keeps_the_float32_models_logits(mesh):
    base = _model(mesh)
    args, kw = _inputs(base.cfg)
    with jax.set_mesh(mesh):
        f32 = _with_random_b(lora.apply(base, LORA, seed=0))
        bf16 = _with_random_b(lora.apply(_model(mesh), LORA_BF16, seed=0))
        ours, reference = _logits(bf16, args, kw), _logits(f32, args, kw)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, frozen))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.LoRAParam))} == {jnp.dtype(jnp.float32)}
    assert _nbytes(nnx.state(bf16, frozen)) * 2 == _nbytes(nnx.state(f32, frozen))
    np.testing.assert_array_equal(  # the same adapters on both
        *(np.asarray(m.layers[0].attn.q_proj.kernel_lora_b[...]) for m in (f32, bf16)))
    # bfloat16 keeps 8 mantissa bits: weights round by <= 2^-9 relative, logits move by about that.
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, atol=2e-2 * scale, rtol=0)
    assert np.abs(ours - reference).max() > 0  # the rounding did happen


def test_bfloat16_base_shrinks_the_sft_states_bytes_by_half_the_base_weights(mesh):
    sizes = {}
    for cfg in (LORA, LORA_BF16):
        _, graphdef, state, *_ = _lora_state(mesh, lora_cfg=cfg)
        params = nnx.merge(graphdef, state.params)
        sizes[cfg.base_dtype] = (_nbytes(state), _nbytes(nnx.state(params, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))),
                                 _nbytes(state.opt_state))
    (total32, base32, opt32), (total16, base16, opt16) = sizes["param_dtype"], sizes["bfloat16"]
    assert base16 * 2 == base32 and opt16 == opt32  # the optimizer state is the adapters', float32 either way
    assert total32 - total16 == base32 // 2


def test_la_grpo_reference_by_disabling_adapters_equals_a_separate_base_copy(mesh):
    from atlas_jax.rl import losses
    from atlas_jax.train import la_grpo
    from test_la_grpo_step import G, _jax, _rollouts

    lc = losses.GRPOLossConfig(loss_type="grpo", alpha=0.0, beta=0.1, epsilon_low=0.2, epsilon_high=0.28)
    runs = {}
    for off in (True, False):
        cfg, graphdef, state, shardings, tx, train = _lora_state(mesh, random_b=True)
        before = jax.device_get(state.params)
        ref = None if off else jax.tree.map(jnp.copy, lora.adapters_off(state.params))
        step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, state_sharding=shardings, batch_sharding=None,
                                    ref_sharding=None if off else shardings.params, train=train, reference_adapters_off=off)
        with jax.set_mesh(mesh):
            state, metrics = step(state, ref, _jax(_rollouts(cfg)))
        runs[off] = jax.device_get(metrics), _changed(before, jax.device_get(state.params))
    (m_off, moved), (m_copy, _) = runs[True], runs[False]
    assert float(m_off["kl"]) > 1e-4  # the adapters do move the policy off its base
    for k in m_off:
        np.testing.assert_allclose(m_off[k], m_copy[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert {p for p, m in moved.items() if m} == {p for p in moved if p[-1].startswith("kernel_lora")}


def test_frozen_vision_tower_has_no_backward_pass():
    from atlas_jax.train import optimizer, sft, train_state
    from test_sft_step import _batch, _put

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    flops, moved = {}, {}
    for freeze in (False, True):
        model = _model(mesh)
        train = optimizer.trainable(freeze_vision=freeze)
        tx = optimizer.make_optimizer(nnx.state(model), lr=1e-2, warmup_steps=0, total_steps=10, train=train)
        graphdef, state, shardings = train_state.create(model, tx, mesh)
        batch, bsh = _put(_batch(model.cfg), mesh)
        step = sft.make_train_step(graphdef, tx, state_sharding=shardings, batch_sharding=bsh, train=train)
        with jax.set_mesh(mesh):
            flops[freeze] = step.lower(state, batch).compile().cost_analysis()["flops"]
            before = jax.device_get(state.params)
            state, _ = step(state, batch)
        moved[freeze] = _changed(before, jax.device_get(state.params))
    assert not any(m for p, m in moved[True].items() if p[0] == "vision")
    assert all(m for p, m in moved[True].items() if p[0] == "layers")
    assert any(m for p, m in moved[False].items() if p[0] == "vision")
    # The tower's backward (about twice its forward) is gone from the compiled step.
    assert flops[True] < 0.95 * flops[False]


def test_merged_export_loads_in_transformers_with_the_adapter_models_logits(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from atlas_jax import hf_checkpoint
    from hf_model_fixture import assert_logits_match, make_hf_checkpoint, one_device_mesh

    src, out = str(tmp_path / "src"), str(tmp_path / "merged")
    make_hf_checkpoint(src, seed=2)
    mesh = one_device_mesh()
    with jax.set_mesh(mesh):
        adapted = _with_random_b(lora.apply(hf_checkpoint.from_hf(src, mesh=mesh), LORA, seed=0))
    with pytest.raises(ValueError, match="lora.merged"):
        hf_checkpoint.to_hf(adapted, out)
    hf_checkpoint.to_hf(lora.merged(adapted, LORA), out)
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    assert_logits_match(adapted, torch_model, [example(rng, 3, [(1, 4, 4)], 5)], pad_left=False)


def test_sft_job_with_lora_trains_and_evaluates(tmp_path):
    from atlas_jax import main as entry
    from test_sft_job import _config

    c = _config(**{"data.data_dir": str(tmp_path / "data"), "train.steps": 2, "eval.num_per_task": 1,
                   "model.lora.rank": 4, "checkpoint.every": 2})
    out = entry.run_job(c, str(tmp_path / "run"))
    assert np.isfinite(out["loss"]) and out["loss"] > 0 and "eval/accuracy" in out


def test_la_grpo_job_with_lora_uses_the_adapters_off_reference(tmp_path):
    from atlas_jax import main as entry
    from test_la_grpo_job import _config, _rows

    c = _config(**{"data.data_dir": str(tmp_path / "data"), "train.steps": 2, "model.lora.rank": 4})
    entry.run_job(c, str(tmp_path / "run"))
    rows = [r for r in _rows(str(tmp_path / "run")).values() if "kl" in r]
    assert len(rows) == 2 and all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    assert rows[0]["kl"] < 1e-6  # fresh adapters: the policy is its reference before the first update
    # `python -m atlas_jax.generate` rebuilds the run's model (adapters included) from its workdir.
    from atlas_jax import generate

    policy, _, _ = generate.load(str(tmp_path / "run"))
    assert policy.source == str(tmp_path / "run") and policy.model_cfg.visual_ops.enabled
    adapters = [x for p, x in nnx.to_flat_state(policy.params) if p[-1] == "kernel_lora_a"]
    assert len(adapters) == 7 * policy.model_cfg.text.num_layers and {a.shape[1] for a in adapters} == {4}  # the run's model.lora
