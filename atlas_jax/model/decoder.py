"""The Qwen2 decoder layer (GQA self-attention with M-RoPE, SwiGLU) and its key/value cache.

Einsum letters: B batch, T query positions, S key positions (cache slots), D model width,
H query heads, K key/value heads, G query heads per key/value head (H = K * G), E head dim.

The cache is a pure pytree (`KVCache`, all layers in one array) passed in and returned, so the
jitted sampler owns it and can donate it, and a scan over the layers updates it in place. Slots are
filled left to right for the whole batch at once (prompts are left-padded); `key_mask` marks slots
holding real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax.model import attention
from atlas_jax.model.config import TextConfig
from atlas_jax.model.layers import Dense, RMSNorm, SwiGLU, apply_rotary, head_major_attention


class KVCache(NamedTuple):
    """k, v: [B, L, K, S, E] for all L decoder layers; layer l's [B, K, S, E] slice is head-major as
    `head_major_attention` reads it. Batch first, like every other cache array (the sampler
    shards and repeats rows on axis 0)."""

    k: jax.Array
    v: jax.Array


class AttentionMask(NamedTuple):
    """Which keys each query may see, built once per forward and shared by all layers.

    query_slot: int32[T] slot index of each query (its causal limit);
    key_mask: bool[B, S] real (non-padding) keys; index: int32 slot where the T new tokens are
    written (0 without a cache).
    """

    query_slot: jax.Array
    key_mask: jax.Array
    index: jax.Array

    def dense(self) -> jax.Array:
        """bool[B, 1, 1, T, S], broadcastable to the attention logits [B, K, G, T, S]."""
        s = jnp.arange(self.key_mask.shape[1])
        causal = s[None, :] <= self.query_slot[:, None]  # [T, S]
        return (causal[None] & self.key_mask[:, None, :])[:, None, None]


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_groups = H // K
        self.q_proj = Dense((D,), (H, E), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = Dense((D,), (K, E), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = Dense((D,), (K, E), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.o_proj = Dense((H, E), (D,), ("heads", "head_dim", "embed"), use_bias=False, **kw)
        self.scale = E**-0.5
        self.implementation = cfg.attention  # of the cache-free forward; decoding stays on XLA

    def __call__(
        self,
        x_btd: jax.Array,
        cos_bte: jax.Array,
        sin_bte: jax.Array,
        mask: AttentionMask,
        cache: KVCache | None,
        layer: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """layer: this layer's slot in the cache (a traced index under a scan over the layers)."""
        B, T, _ = x_btd.shape
        q_bthe = apply_rotary(self.q_proj(x_btd), cos_bte, sin_bte)
        k_btke = apply_rotary(self.k_proj(x_btd), cos_bte, sin_bte)
        v_btke = self.v_proj(x_btd)
        K = k_btke.shape[2]
        q_btkge = q_bthe.reshape(B, T, K, self.num_groups, -1)
        if cache is None:
            # Without a cache, query t sits at slot t and the mask is causal over real keys.
            causal = attention.CAUSAL[self.implementation]
            out_btkge = causal(q_btkge, k_btke, v_btke, mask.key_mask, self.scale)
        else:
            # Write only the T new tokens into the whole cache (in place under donation and in a
            # scan's loop), then read this layer's slice.
            zero = jnp.zeros((), jnp.int32)
            at = (zero, jnp.asarray(layer, jnp.int32), zero, mask.index, zero)
            new_k = jnp.swapaxes(k_btke, 1, 2)[:, None].astype(cache.k.dtype)
            new_v = jnp.swapaxes(v_btke, 1, 2)[:, None].astype(cache.v.dtype)
            cache = KVCache(jax.lax.dynamic_update_slice(cache.k, new_k, at), jax.lax.dynamic_update_slice(cache.v, new_v, at))
            k_bkse = jax.lax.dynamic_index_in_dim(cache.k, layer, axis=1, keepdims=False)
            v_bkse = jax.lax.dynamic_index_in_dim(cache.v, layer, axis=1, keepdims=False)
            out_bkgte = head_major_attention(
                jnp.transpose(q_btkge, (0, 2, 3, 1, 4)),
                k_bkse.astype(q_btkge.dtype),
                v_bkse.astype(q_btkge.dtype),
                mask.dense(),
                self.scale,
            )
            out_btkge = jnp.transpose(out_bkgte, (0, 3, 1, 2, 4))
        return self.o_proj(out_btkge.reshape(B, T, K * self.num_groups, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False, dtype=dtype, **kw
        )

    def __call__(self, x_btd, cos_bte, sin_bte, mask: AttentionMask, cache: KVCache | None, layer: jax.Array | int = 0):
        h_btd, cache = self.attn(self.input_norm(x_btd), cos_bte, sin_bte, mask, cache, layer)
        x_btd = x_btd + h_btd
        x_btd = x_btd + self.mlp(self.post_attn_norm(x_btd))
        return x_btd, cache
