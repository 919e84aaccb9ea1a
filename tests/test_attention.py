"""The decoder's cache-free causal attention, computed per query block, equals the dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import decoder
from atlas_jax.model.layers import masked_softmax_attention


@pytest.mark.parametrize("T", [64, 200, 384])
def test_causal_blocks_equal_dense_attention_values_and_gradients(T):
    B, K, G, E = 2, 2, 3, 8
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, K, G, E))
    k = jax.random.normal(kk, (B, T, K, E))
    v = jax.random.normal(kv, (B, T, K, E))
    cot = jax.random.normal(kc, (B, T, K, G, E))
    # Sample 0 unpadded, sample 1 left-padded by a third of the sequence.
    key_mask = jnp.arange(T)[None] >= jnp.array([[0], [T // 3]])
    mask = decoder.AttentionMask(jnp.arange(T, dtype=jnp.int32), key_mask, jnp.zeros((), jnp.int32))

    def blocked(q, k, v):
        return jnp.sum(decoder.causal_block_attention(q, k, v, mask, 0.3) * cot)

    def dense(q, k, v):
        return jnp.sum(masked_softmax_attention(q, k, v, mask.dense(), 0.3) * cot)

    np.testing.assert_allclose(
        decoder.causal_block_attention(q, k, v, mask, 0.3), masked_softmax_attention(q, k, v, mask.dense(), 0.3),
        atol=2e-6, rtol=0,
    )
    for gb, gd in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=0)
    # The padded queries of sample 1 see no key: zeros, not NaN.
    assert not np.any(np.asarray(decoder.causal_block_attention(q, k, v, mask, 0.3))[1, : T // 3])


def test_block_count():
    # 64-query blocks at least, 8 at most; short sequences stay one block.
    seen = []
    dense, blocks = decoder.masked_softmax_attention, decoder.head_major_attention
    try:
        decoder.masked_softmax_attention = lambda q, *a: seen.append(q.shape[1]) or dense(q, *a)  # [B, T, K, G, E]
        decoder.head_major_attention = lambda q, *a: seen.append(q.shape[3]) or blocks(q, *a)  # [B, K, G, T, E]
        for T in (100, 256, 4096):
            seen.clear()
            x = jnp.zeros((1, T, 1, 1, 4))
            m = decoder.AttentionMask(jnp.arange(T, dtype=jnp.int32), jnp.ones((1, T), bool), jnp.zeros((), jnp.int32))
            decoder.causal_block_attention(x, x[:, :, :, 0], x[:, :, :, 0], m, 1.0)
            assert sum(seen) == T
            assert len(seen) == {100: 1, 256: 4, 4096: 8}[T], (T, seen)
    finally:
        decoder.masked_softmax_attention, decoder.head_major_attention = dense, blocks


def reference_attention(q, k, v, mask, scale):
    """The textbook form, differentiated by JAX: q [B, T, K, G, E], k, v [B, S, K, E]."""
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hand_written_attention_backward_equals_autodiff(dtype):
    """`head_major_attention`'s custom VJP against autodiff of the textbook form: a padded
    batch (fully masked query rows included), grouped heads, a non-square mask."""
    B, T, S, K, G, E = 2, 24, 40, 2, 3, 8
    kq, kk, kv, kc = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (B, T, K, G, E)).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, E)).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, E)).astype(dtype)
    cot = jax.random.normal(kc, (B, T, K, G, E)).astype(dtype)
    key_mask = jnp.arange(S)[None] >= jnp.array([[0], [S // 2]])  # sample 1 left-padded
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
    mask = (causal[None] & key_mask[:, None])[:, None, None]  # [B, 1, 1, T, S]
    assert not np.any(np.asarray(mask)[1, 0, 0, : S // 2 - (S - T)].any(-1))  # some rows see nothing

    def loss(fn):
        return lambda q, k, v: jnp.sum((fn(q, k, v, mask, 0.4) * cot).astype(jnp.float32))

    out, ref = masked_softmax_attention(q, k, v, mask, 0.4), reference_attention(q, k, v, mask, 0.4)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)
    grads = jax.grad(loss(masked_softmax_attention), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(reference_attention), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, atol=(2e-5 if dtype == jnp.float32 else 0.05 * np.abs(r).max()), rtol=0, err_msg=name)
        assert np.abs(r).max() > 0.1, name  # the comparison is not between zeros


@pytest.mark.parametrize("grids", [[(1, 16, 24), (1, 6, 4), (2, 10, 8)], [(1, 4, 4)]], ids=["three_images", "small"])
def test_vision_window_bands_equal_dense_segment_attention(grids):
    """Window blocks attend over bands of the window-order row: same values and gradients as
    the dense block-diagonal mask, on a real layout (partial edge windows, two frames, padding)."""
    from atlas_jax.model.config import VisionConfig
    from atlas_jax.model.vision import segment_attention
    from atlas_jax.model.vision_layout import batch_vision_layout

    cfg = VisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16, window_size=56)
    band = 16  # 56 px windows: 2x2 merged units of 4 patches
    P = sum(t * h * w for t, h, w in grids) + 8  # room for every patch, plus padding
    layout = batch_vision_layout([grids, grids[:1]], cfg, P)
    seg = jnp.asarray(layout["window_segments"])
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    q, k, v, cot = (jax.random.normal(key, (2, P, 2, 8)) for key in (kq, kk, kv, kc))

    def loss(q, k, v, band):
        return jnp.sum(segment_attention(q, k, v, seg, 0.35, band) * cot)

    banded, dense = segment_attention(q, k, v, seg, 0.35, band), segment_attention(q, k, v, seg, 0.35, None)
    np.testing.assert_allclose(banded, dense, atol=2e-6, rtol=0)
    assert np.all(np.asarray(dense)[np.asarray(seg) == 0] == 0)  # padding sees nothing
    for gb, gd in zip(jax.grad(loss, (0, 1, 2))(q, k, v, band), jax.grad(loss, (0, 1, 2))(q, k, v, None)):
        np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=0)
    # Every window is a contiguous run no longer than the band (what the banding relies on).
    for row in np.asarray(seg):
        for w in set(row[row > 0].tolist()):
            at = np.flatnonzero(row == w)
            assert at[-1] - at[0] + 1 == len(at) <= band
