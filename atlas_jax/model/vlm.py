"""The vision-language model: ViT tower -> merged image tokens -> Qwen2 decoder -> vocabulary.

Einsum letters: B batch, T tokens, S cache slots, D model width, V vocabulary, P merged image
tokens, C flattened pixel patch, E head dim.

One forward serves training (no cache), prefill (a fresh cache: the prompt, its images and
the visual-operation memory are written) and decoding (a cache holding the prompt; new tokens
only, no images). The cache is a pure pytree passed in and returned.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax import sharding
from atlas_jax.model.config import DTYPES, ModelConfig
from atlas_jax.model.decoder import AttentionMask, DecoderLayer, KVCache
from atlas_jax.model.layer_stack import run_layers
from atlas_jax.model.layers import Dense, RMSNorm, param, tensordot_rows
from atlas_jax.model.rope import mrope_cos_sin
from atlas_jax.model.vision import VisionTower
from atlas_jax.model.visual_ops import ImageMemory, VisualOps


class Cache(NamedTuple):
    """kv: every decoder layer's keys and values [B, L, K, S, E]; key_mask: bool[B, S] slots holding real
    tokens; index: int32 next slot to write; memory: the visual-operation image memory
    (None in 'vocab' mode); functional_seen: int32[B] functional tokens written so far (the
    visual operations act on each sample's first `max_positions` only)."""

    kv: KVCache
    key_mask: jax.Array
    index: jax.Array
    memory: ImageMemory | None
    functional_seen: jax.Array


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(self.dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """Tied output head: x . embedding^T."""
        return tensordot_rows(x_btd, self.embedding[...].astype(self.dtype).T, 1)


class VLM(nnx.Module):
    """Qwen2.5-VL with functional-token visual operations.

    Parameter tree: `vision` (VisionTower), `embed.embedding` [V, D], `layers[i]`
    (DecoderLayer), `final_norm`, `lm_head` (None when tied), `visual_ops` (None in 'vocab' mode).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.text
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.vision = VisionTower(
            cfg.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, scan_layers=cfg.scan_layers
        )
        self.embed = Embed(t.vocab_size, t.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List(
            [DecoderLayer(t, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(t.num_layers)]
        )
        self.final_norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (
            None
            if t.tie_word_embeddings
            else Dense((t.hidden_size,), (t.vocab_size,), ("embed", "vocab"), use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        )
        self.visual_ops = VisualOps(cfg, rngs=rngs) if cfg.visual_ops.enabled else None

    # ------------------------------------------------------------------ pieces
    def image_features(self, pixel_values_bpc: jax.Array, vision: dict[str, jax.Array]) -> jax.Array:
        """float[B, P, D]: merged image tokens of each sample, in order of appearance."""
        return self.vision(pixel_values_bpc, vision)

    def init_cache(self, batch: int, length: int, dtype=None) -> Cache:
        """An empty cache of `length` slots (prompt + generated tokens)."""
        t = self.cfg.text
        dtype = dtype or DTYPES[self.cfg.dtype]
        shape = (batch, t.num_layers, t.num_kv_heads, length, t.head_dim)
        kv = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        return Cache(kv, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32), None, jnp.zeros((batch,), jnp.int32))

    def _image_memory(self, img_bpd, ids_bt, vision, index) -> ImageMemory:
        B, P = img_bpd.shape[:2]
        is_image = ids_bt == self.cfg.image_token_id
        # Slot of the k-th image token of each sample (image tokens are merged units in order).
        slot_bp = jnp.argsort(~is_image, axis=1, stable=True)[:, :P].astype(jnp.int32) + index
        valid_bp = vision["unit_valid"] & (jnp.arange(P)[None] < is_image.sum(axis=1, keepdims=True))
        # Rows sharded like the batch: left to propagation, the keys and values (projected over
        # the fsdp-sharded width) came out whole-batch on every chip (1.25 GiB each at 7B).
        return jax.tree.map(sharding.constrain_rows, self.visual_ops.image_memory(img_bpd, valid_bp, slot_bp))

    def _empty_memory(self, batch: int) -> ImageMemory:
        o = self.cfg.visual_ops
        z = jnp.zeros((batch, 0, o.num_ops, o.num_heads, o.head_dim), DTYPES[self.cfg.dtype])
        return ImageMemory(z, z, jnp.zeros((batch, 0), bool), jnp.zeros((batch, 0), jnp.int32))

    def output_head(self) -> jax.Array:
        """The output head float[D, V] in the compute dtype (the embedding's transpose when tied)."""
        if self.lm_head is None:
            return self.embed.embedding[...].astype(DTYPES[self.cfg.dtype]).T
        return self.lm_head.kernel[...].astype(DTYPES[self.cfg.dtype])

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids_bt: jax.Array,
        positions_b3t: jax.Array,
        attention_mask_bt: jax.Array,
        *,
        pixel_values: jax.Array | None = None,
        vision: dict[str, jax.Array] | None = None,
        cache: Cache | None = None,
        head: bool = True,
    ) -> tuple[jax.Array, Cache | None, dict]:
        """Logits float32[B, T, V] for every position, the updated cache, and aux outputs.
        With head=False the final normed hidden states float[B, T, D] instead of logits: the
        training losses apply `output_head()` a chunk at a time (`train.token_logprobs`).

        input_ids_bt: int32[B, T]; positions_b3t: int32[B, 3, T] M-RoPE ids;
        attention_mask_bt: bool[B, T] (False = padding); pixel_values: float[B, Pp, C] with
        `vision` the layout arrays from `vision_layout.batch_vision_layout` (both None for
        text-only batches and for decode steps). `device_batch.model_inputs` gives these
        arguments from a batch. aux: 'ops' (visual-op attention, see `VisualOps.__call__`).
        """
        cfg = self.cfg
        B, T = input_ids_bt.shape
        x_btd = self.embed(input_ids_bt)
        img_bpd = None
        if pixel_values is not None:
            img_bpd = self.image_features(pixel_values, vision).astype(x_btd.dtype)
            is_image = input_ids_bt == cfg.image_token_id
            idx_bt = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, img_bpd.shape[1] - 1)
            gathered_btd = jnp.take_along_axis(img_bpd, idx_bt[..., None], axis=1)
            x_btd = jnp.where(is_image[..., None], gathered_btd, x_btd)

        index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        if cache is None:
            key_mask = attention_mask_bt
        else:
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, attention_mask_bt, (0, index))
        mask = AttentionMask(index + jnp.arange(T, dtype=jnp.int32), key_mask, index)

        memory, seen = None, None
        if self.visual_ops is not None:
            op_tokens_bt = jnp.where(attention_mask_bt, input_ids_bt, -1)  # padding holds no operation
            seen = cache.functional_seen if cache is not None else None
            if cache is not None and cache.memory is not None:
                memory = cache.memory
            elif img_bpd is not None:
                memory = self._image_memory(img_bpd, input_ids_bt, vision, index)
            else:
                memory = self._empty_memory(B)

        t = cfg.text
        cos, sin = mrope_cos_sin(positions_b3t, t.head_dim, t.rope_theta, t.mrope_section)

        def decoder_layer(layer, carry, index):
            x_btd, kv = carry
            return layer(x_btd, cos, sin, mask, kv, index)

        # Remat serves a backward pass; with a cache (sampling) there is none.
        run = dict(scan=cfg.scan_layers, remat=cfg.remat if cache is None else "none")
        carry = (x_btd, cache.kv if cache is not None else None)
        aux = {}
        if self.visual_ops is None:
            x_btd, kv = run_layers(self.layers, decoder_layer, carry, **run)
        else:
            # The visual operations write into the residual stream after layer `visual_ops.layer`.
            split = cfg.visual_ops.layer + 1

            def visual_ops(x_btd):
                return self.visual_ops(x_btd, op_tokens_bt, mask.query_slot, memory, seen)

            if cfg.scan_layers:
                # One scan over every layer, the operations (a lax.cond) after layer split - 1:
                # XLA compiles one layer body, not one per stack around the operations (the 7B
                # SFT step's compile: bench/RESULTS.md). Their outputs ride in the carry (small:
                # float32[B, max_positions, image tokens]).
                def layer_then_ops(layer, carry, index):
                    x_btd, kv, ops = carry
                    x_btd, kv = decoder_layer(layer, (x_btd, kv), index)
                    x_btd, ops = jax.lax.cond(index == split - 1, visual_ops, lambda x: (x, ops), x_btd)
                    return sharding.constrain_rows(x_btd), kv, ops

                no_ops = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(visual_ops, x_btd)[1])
                x_btd, kv, aux["ops"] = run_layers(self.layers, layer_then_ops, (*carry, no_ops), **run)
            else:
                carry = run_layers(self.layers[:split], decoder_layer, carry, **run)
                x_btd, aux["ops"] = visual_ops(carry[0])
                x_btd, kv = run_layers(self.layers[split:], decoder_layer, (x_btd, carry[1]), first_index=split, **run)

        out = self.final_norm(x_btd)
        if head:
            out = (self.embed.attend(out) if self.lm_head is None else self.lm_head(out)).astype(jnp.float32)
        new_cache = None
        if cache is not None:
            seen = cache.functional_seen
            if self.visual_ops is not None:
                seen = seen + self.visual_ops.count(op_tokens_bt)
            new_cache = Cache(kv, key_mask, index + T, memory, seen)
        return out, new_cache, aux


def create(cfg: ModelConfig, mesh, *, seed: int = 0, rules=None) -> VLM:
    """A freshly initialised VLM whose parameters are created directly in their shards."""
    return sharding.sharded_init(lambda: VLM(cfg, rngs=nnx.Rngs(seed)), mesh, rules or sharding.RULES)
