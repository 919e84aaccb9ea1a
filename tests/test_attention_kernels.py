"""The fused attention kernels against the XLA reference (`model/attention.py`), float32.

Splash runs in Pallas interpret mode on CPU (the same kernel code as on a TPU); cuDNN cannot run
here, so its arguments (mask, causal flag, head layout) go through `jax.nn.dot_product_attention`'s
XLA backend instead, and a GPU-only test runs the kernel itself. Values are compared on the rows
that matter (real queries); padding rows must be finite (see the module docstring).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import run_config, sharding
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import attention, vlm
from atlas_jax.model.config import ConfigError, VisionConfig
from atlas_jax.model.vision_layout import batch_vision_layout
from hf_model_fixture import example, jax_batch
from test_kv_cache import tiny_cfg

SCALE = 0.3


def causal_case(T=300, K=2, G=2, E=32):
    """GQA operands and a key mask: sample 0 right-padded, sample 1 left-padded. T = 300 pads to
    384 = 3 kernel tiles of 128, so tile skipping and the tile padding are both exercised."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, T, K, G, E))
    k, v = jax.random.normal(kk, (2, T, K, E)), jax.random.normal(kv, (2, T, K, E))
    pos = jnp.arange(T)[None]
    key_mask = (pos < jnp.array([[T - 40], [T]])) & (pos >= jnp.array([[0], [T // 3]]))
    cot = jax.random.normal(kc, q.shape) * key_mask[:, :, None, None, None]  # only real rows matter
    return (q, k, v, key_mask), cot, np.asarray(key_mask)


def segment_case():
    """A real vision layout: two samples, several images (one of two frames), partial edge
    windows, padding. Returns q, k, v [B, P, H, E], the window and full segment ids, the band."""
    cfg = VisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16, window_size=56)
    grids = [(1, 16, 24), (1, 6, 4), (2, 4, 4)]
    P = sum(t * h * w for t, h, w in grids) + 24  # 504: the kernel pads it to 512
    layout = batch_vision_layout([grids, grids[1:]], cfg, P)
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    q, k, v, cot = (jax.random.normal(key, (2, P, 2, 8)) for key in (kq, kk, kv, kc))
    return (q, k, v), cot, layout["window_segments"], layout["full_segments"], 16


def assert_same_on(rows, got, want, atol):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[rows], want[rows], atol=atol, rtol=0)


def run(fn, args):
    """fn(*args) compiled as one program (op-by-op, the blocked reference compiles dozens)."""
    q, k, v, mask, *static = args
    return jax.jit(lambda q, k, v, mask: fn(q, k, v, mask, *static))(q, k, v, mask)


def grads(fn, args, cot):
    q, k, v, mask, *static = args
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask, *static) * cot)  # noqa: E731
    return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)


# ---------------------------------------------------------------------------- splash
def test_causal_splash_equals_xla_values_and_gradients():
    args, cot, rows = causal_case()
    args = (*args, SCALE)
    assert_same_on(rows, run(attention.causal_splash, args), run(attention.causal_xla, args), 1e-5)
    for got, want in zip(grads(attention.causal_splash, args, cot), grads(attention.causal_xla, args, cot)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("blocks", ["window", "full"])
def test_segment_splash_equals_xla_values_and_gradients(blocks):
    (q, k, v), cot, window_seg, full_seg, band = segment_case()
    seg, band = (jnp.asarray(window_seg), band) if blocks == "window" else (jnp.asarray(full_seg), None)
    rows = np.asarray(seg) > 0
    cot = cot * rows[:, :, None, None]
    args = (q, k, v, seg, SCALE, band)
    assert_same_on(rows, run(attention.segment_splash, args), run(attention.segment_xla, args), 1e-5)
    for got, want in zip(grads(attention.segment_splash, args, cot), grads(attention.segment_xla, args, cot)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_model_on_splash_equals_xla_under_a_mesh():
    """The whole tiny VLM (decoder GQA + both vision block kinds) with splash, sharded over a
    (2, 2, 2) mesh (the kernel runs per shard: batch over data x fsdp, heads over tensor)."""
    mesh = sharding.make_mesh((2, 2, 2))
    cfg = tiny_cfg("module")
    rng = np.random.default_rng(0)
    examples = [example(rng, n, grids, 3) for n, grids in ((3, [(1, 4, 6)]), (6, [(1, 8, 8), (1, 4, 4)]), (2, []), (4, [(2, 4, 4)]))]
    batch = jax.tree.map(jnp.asarray, jax_batch(examples, cfg, pad_left=True))
    (ids, pos, mask), images = model_inputs(batch)
    logits = {}
    for impl in ("xla", "splash"):
        model = vlm.create(dataclasses.replace(cfg, attention=impl), mesh, seed=1)
        assert model.layers[0].attn.implementation == model.vision.blocks[0].attn.implementation == impl
        with jax.set_mesh(mesh):
            logits[impl] = jax.jit(lambda m, *a, **kw: m(*a, **kw)[0])(model, ids, pos, mask, **images)
    assert_same_on(np.asarray(mask), logits["splash"], logits["xla"], 2e-4)


# ---------------------------------------------------------------------------- cuDNN
def test_cudnn_arguments_give_the_reference_values():
    """cuDNN's inputs (causal flag + key-padding mask; equal-segment mask) through JAX's XLA
    backend of the same call: the reference values on real rows, finite padding rows."""
    args, _, rows = causal_case(T=70)
    args = (*args, SCALE)
    causal_cudnn_args = functools.partial(attention.causal_cudnn, implementation="xla")
    assert_same_on(rows, run(causal_cudnn_args, args), run(attention.causal_xla, args), 1e-5)
    (q, k, v), _, window_seg, full_seg, band = segment_case()
    segment_cudnn_args = functools.partial(attention.segment_cudnn, implementation="xla")
    for seg, b in ((window_seg, band), (full_seg, None)):
        args = (q, k, v, jnp.asarray(seg), SCALE, b)
        assert_same_on(seg > 0, run(segment_cudnn_args, args), run(attention.segment_xla, args), 1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_kernel_equals_xla_in_bfloat16():
    args, _, rows = causal_case(T=256, E=64)
    q, k, v, key_mask = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in args)
    got = attention.causal_cudnn(q, k, v, key_mask, SCALE).astype(jnp.float32)
    assert_same_on(rows, got, attention.causal_xla(q, k, v, key_mask, SCALE).astype(jnp.float32), 3e-2)
    (q, k, v), _, _, full_seg, _ = segment_case()
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    seg = jnp.asarray(full_seg)
    got = attention.segment_cudnn(q, k, v, seg, SCALE).astype(jnp.float32)
    assert_same_on(full_seg > 0, got, attention.segment_xla(q, k, v, seg, SCALE).astype(jnp.float32), 3e-2)


# ---------------------------------------------------------------------------- the setting
def test_auto_resolves_per_platform_and_bad_settings_are_named():
    assert attention.resolve("auto", "tpu", "float32") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "xla"  # cuDNN has no float32 kernel
    assert attention.resolve("auto", "cpu", "bfloat16") == "xla"
    assert attention.resolve("splash", "cpu", "float32") == "splash"  # interpreted (tests)
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs GPU devices"):
        attention.resolve("cudnn", "tpu", "bfloat16")
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        attention.resolve("flash", "tpu", "bfloat16")
    with pytest.raises(ConfigError, match="model.attention='cudnn' needs a 16-bit model.dtype"):
        tiny_cfg("vocab").replace(attention="cudnn")
    c = run_config.base()
    c.model.attention = "flash"
    with pytest.raises(ConfigError, match="model.attention"):
        run_config.validate(c, 8, paths=False)
