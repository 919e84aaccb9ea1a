"""The XLA attention of the cache-free forwards (`model/attention.py`), computed per query block
or band, equals the dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import attention, decoder
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
        return jnp.sum(attention.causal_xla(q, k, v, key_mask, 0.3) * cot)

    def dense(q, k, v):
        return jnp.sum(masked_softmax_attention(q, k, v, mask.dense(), 0.3) * cot)

    np.testing.assert_allclose(
        attention.causal_xla(q, k, v, key_mask, 0.3), masked_softmax_attention(q, k, v, mask.dense(), 0.3),
        atol=2e-6, rtol=0,
    )
    for gb, gd in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=0)
    # The padded queries of sample 1 see no key: zeros, not NaN.
    assert not np.any(np.asarray(attention.causal_xla(q, k, v, key_mask, 0.3))[1, : T // 3])


def test_block_count():
    # 64-query blocks at least, 8 at most; short sequences stay one block.
    seen = []
    orig = attention.masked_softmax_attention
    try:
        attention.masked_softmax_attention = lambda q, *a: seen.append(q.shape[1]) or orig(q, *a)
        for T in (100, 256, 4096):
            seen.clear()
            x = jnp.zeros((1, T, 1, 1, 4))
            attention.causal_xla(x, x[:, :, :, 0], x[:, :, :, 0], jnp.ones((1, T), bool), 1.0)
            assert sum(seen) == T
            assert len(seen) == {100: 1, 256: 4, 4096: 8}[T], (T, seen)
    finally:
        attention.masked_softmax_attention = orig


def test_head_major_attention_equals_masked_softmax_attention():
    """The KV cache's head-major form against the [B, T, K, G, E] form: a decode-like step
    (2 new queries over 40 cache slots), a left-padded row and a padding query that sees nothing."""
    from atlas_jax.model.layers import head_major_attention

    B, T, S, K, G, E = 2, 2, 40, 2, 3, 8
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (B, T, K, G, E))
    k = jax.random.normal(kk, (B, S, K, E))
    v = jax.random.normal(kv, (B, S, K, E))
    key_mask = jnp.arange(S)[None] >= jnp.array([[0], [S // 2]])
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
    mask = (causal[None] & key_mask[:, None])[:, None, None]  # [B, 1, 1, T, S]
    mask = mask.at[1, :, :, 0].set(False)  # a query row with no key
    want = masked_softmax_attention(q, k, v, mask, 0.4)
    got = head_major_attention(
        jnp.transpose(q, (0, 2, 3, 1, 4)), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, 0.4
    )
    np.testing.assert_allclose(jnp.transpose(got, (0, 3, 1, 2, 4)), want, atol=1e-6, rtol=0)
    assert np.abs(np.asarray(want)).max() > 0.1 and not np.any(np.asarray(got)[1, :, :, 0])


@pytest.mark.parametrize("grids", [[(1, 16, 24), (1, 6, 4), (2, 10, 8)], [(1, 4, 4)]], ids=["three_images", "small"])
def test_vision_window_bands_equal_dense_segment_attention(grids):
    """Window blocks attend over bands of the window-order row: same values and gradients as
    the dense block-diagonal mask, on a real layout (partial edge windows, two frames, padding)."""
    from atlas_jax.model.config import VisionConfig
    from atlas_jax.model.vision_layout import batch_vision_layout

    cfg = VisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16, window_size=56)
    band = 16  # 56 px windows: 2x2 merged units of 4 patches
    P = sum(t * h * w for t, h, w in grids) + 8  # room for every patch, plus padding
    layout = batch_vision_layout([grids, grids[:1]], cfg, P)
    seg = jnp.asarray(layout["window_segments"])
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    q, k, v, cot = (jax.random.normal(key, (2, P, 2, 8)) for key in (kq, kk, kv, kc))

    def loss(q, k, v, band):
        return jnp.sum(attention.segment_xla(q, k, v, seg, 0.35, band) * cot)

    banded, dense = attention.segment_xla(q, k, v, seg, 0.35, band), attention.segment_xla(q, k, v, seg, 0.35, None)
    np.testing.assert_allclose(banded, dense, atol=2e-6, rtol=0)
    assert np.all(np.asarray(dense)[np.asarray(seg) == 0] == 0)  # padding sees nothing
    for gb, gd in zip(jax.grad(loss, (0, 1, 2))(q, k, v, band), jax.grad(loss, (0, 1, 2))(q, k, v, None)):
        np.testing.assert_allclose(gb, gd, atol=2e-5, rtol=0)
    # Every window is a contiguous run no longer than the band (what the banding relies on).
    for row in np.asarray(seg):
        for w in set(row[row > 0].tolist()):
            at = np.flatnonzero(row == w)
            assert at[-1] - at[0] + 1 == len(at) <= band
