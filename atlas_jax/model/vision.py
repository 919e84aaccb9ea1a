"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2D rotary, 2x2 merger.

Numerically the `transformers` `Qwen2_5_VisionTransformerPretrainedModel`, rearranged for fixed
shapes: every sample holds a row of P patches (its images' patches in processor order, then
zero padding) and the data-dependent structure (window permutation, rotary positions, frame and
window boundaries) arrives as the integer tables of `vision_layout.py`. HF's variable-length
`cu_seqlens` attention becomes attention within segment ids (`attention.SEGMENT`).

Einsum letters: B batch, P patches per sample, U merged units (P // M), M patches per unit
(spatial_merge_size**2), C flattened patch (patch_dim), D width, H heads, E head dim,
F rotary frequencies per axis (E // 4), O output width (the LLM width).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax.model import attention
from atlas_jax.model.config import VisionConfig
from atlas_jax.model.layer_stack import run_layers
from atlas_jax.model.layers import Dense, RMSNorm, SwiGLU, apply_rotary
from atlas_jax.model.vision_layout import LAYOUT_KEYS


class VisionAttention(nnx.Module):
    """Fused-qkv multi-head self-attention restricted to equal, positive segment ids.

    band (a call argument, so that window and full-attention blocks are one module structure and
    scan together): None in full-attention blocks; in window blocks the most patches one window
    holds, so attention runs over bands of the row (`attention.segment_xla`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, H, E = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Dense((D,), (3, H, E), ("embed", "qkv", "heads", "head_dim"), **kw)
        self.proj = Dense((H, E), (D,), ("heads", "head_dim", "embed"), **kw)
        self.scale = E**-0.5
        self.implementation = cfg.attention

    def __call__(self, x_bpd, cos_bpe, sin_bpe, seg_bp, band: int | None):
        qkv_bp3he = self.qkv(x_bpd)
        q_bphe = apply_rotary(qkv_bp3he[:, :, 0], cos_bpe, sin_bpe)
        k_bphe = apply_rotary(qkv_bp3he[:, :, 1], cos_bpe, sin_bpe)
        v_bphe = qkv_bp3he[:, :, 2]
        segment = attention.SEGMENT[self.implementation]
        return self.proj(segment(q_bphe, k_bphe, v_bphe, seg_bp, self.scale, band))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.attn = VisionAttention(cfg, dtype=dtype, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True, dtype=dtype, **kw
        )

    def __call__(self, x_bpd, cos_bpe, sin_bpe, seg_bp, band: int | None):
        x_bpd = x_bpd + self.attn(self.norm1(x_bpd), cos_bpe, sin_bpe, seg_bp, band)
        return x_bpd + self.mlp(self.norm2(x_bpd))


class PatchMerger(nnx.Module):
    """RMSNorm each patch, concatenate a unit's M patches, then Linear-GELU-Linear to O."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        D4 = cfg.hidden_size * cfg.merge_unit
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, rngs=rngs, param_dtype=param_dtype)
        self.fc1 = Dense((D4,), (D4,), ("embed", "mlp"), **kw)
        self.fc2 = Dense((D4,), (cfg.out_hidden_size,), ("mlp", "embed"), **kw)
        self.merge_unit = cfg.merge_unit

    def __call__(self, x_bpd):
        B, P, D = x_bpd.shape
        x_bu_md = self.ln_q(x_bpd).reshape(B, P // self.merge_unit, self.merge_unit * D)
        # torch nn.GELU() is the exact (erf) form.
        return self.fc2(jax.nn.gelu(self.fc1(x_bu_md), approximate=False))


def _unit_gather(x_bp_, index_bu):
    """Reorders whole units (M consecutive patches) of x[B, P, ...] by index[B, U]."""
    B, P = x_bp_.shape[:2]
    U = index_bu.shape[1]
    x_bum_ = x_bp_.reshape(B, U, P // U, *x_bp_.shape[2:])
    idx = index_bu.reshape(B, U, *([1] * (x_bum_.ndim - 2)))
    return jnp.take_along_axis(x_bum_, idx, axis=1).reshape(x_bp_.shape)


class VisionTower(nnx.Module):
    """Pixels of padded patch rows -> merged image tokens for the decoder.

    __call__(pixel_values float[B, P, C], layout from `batch_vision_layout` (as arrays))
      -> float[B, U, O] in HF (input) order; rows of padding units are 0.
    """

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        scan_layers: bool = False,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat  # a layer_stack.REMAT_POLICIES key
        self.scan_layers = scan_layers
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = Dense((cfg.patch_dim,), (cfg.hidden_size,), ("patch", "embed"), use_bias=False, **kw)
        # The most patches one attention window holds (fewer at image edges), as in vision_layout.
        self.window_band = (cfg.window_size // cfg.spatial_merge_size // cfg.patch_size) ** 2 * cfg.merge_unit
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def rotary(self, rope_hw_bp2):
        """cos, sin float32[B, P, E]: HF's axial layout [h-freqs, w-freqs] repeated twice."""
        half = self.cfg.head_dim // 2
        inv_freq_f = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
        freqs_bp2f = rope_hw_bp2.astype(jnp.float32)[..., None] * inv_freq_f
        freqs_bpe2 = freqs_bp2f.reshape(*freqs_bp2f.shape[:2], -1)  # [h-freqs, w-freqs]
        emb_bpe = jnp.concatenate([freqs_bpe2, freqs_bpe2], axis=-1)
        return jnp.cos(emb_bpe), jnp.sin(emb_bpe)

    def __call__(self, pixel_values_bpc: jax.Array, layout: Mapping[str, jax.Array]) -> jax.Array:
        cfg = self.cfg
        B, P, C = pixel_values_bpc.shape
        if C != cfg.patch_dim or P % cfg.merge_unit:
            raise ValueError(
                f"pixel_values shape {pixel_values_bpc.shape}: expected [B, P, {cfg.patch_dim}] with P a "
                f"multiple of merge_unit={cfg.merge_unit}"
            )
        missing = [k for k in LAYOUT_KEYS if k not in layout]
        if missing:
            raise KeyError(f"vision layout lacks {missing}; build it with vision_layout.batch_vision_layout")
        window_index_bu = layout["window_index"].astype(jnp.int32)

        # Everything runs in window order (units of one window contiguous), as in HF.
        x_bpd = _unit_gather(self.patch_embed(pixel_values_bpc), window_index_bu)
        cos_bpe, sin_bpe = self.rotary(layout["rope_hw"])
        cos_bpe, sin_bpe = _unit_gather(cos_bpe, window_index_bu), _unit_gather(sin_bpe, window_index_bu)
        full_bp, window_bp = layout["full_segments"], layout["window_segments"]

        full_blocks = set(cfg.fullatt_block_indexes)
        if self.scan_layers and 0 < len(full_blocks) < cfg.depth:
            # One scan over every block, each picking its attention with a lax.cond: XLA compiles
            # one block body (with both attentions) instead of one per run of a kind (7B: 4 runs
            # of window blocks, 4 single full-attention blocks).
            is_full_k = jnp.asarray([i in full_blocks for i in range(cfg.depth)])

            def block_fn(block, x_bpd, index):
                return jax.lax.cond(
                    is_full_k[index],
                    lambda x: block(x, cos_bpe, sin_bpe, full_bp, None),
                    lambda x: block(x, cos_bpe, sin_bpe, window_bp, self.window_band),
                    x_bpd,
                )

            x_bpd = run_layers(self.blocks, block_fn, x_bpd, scan=True, remat=self.remat)
        else:
            # Consecutive blocks of one kind (window or full attention) run as one stack.
            for full, indexes in itertools.groupby(range(cfg.depth), key=lambda i: i in full_blocks):
                seg_bp, band = (full_bp, None) if full else (window_bp, self.window_band)
                x_bpd = run_layers(
                    [self.blocks[i] for i in indexes], lambda block, x, _: block(x, cos_bpe, sin_bpe, seg_bp, band),
                    x_bpd, scan=self.scan_layers, remat=self.remat,
                )

        y_buo = self.merger(x_bpd)
        # Back to HF (input) order: row u of the output is window-order row inverse[u].
        inverse_bu = jnp.argsort(window_index_bu, axis=1)
        y_buo = jnp.take_along_axis(y_buo, inverse_bu[:, :, None], axis=1)
        return jnp.where(layout["unit_valid"][:, :, None], y_buo, 0).astype(self.dtype)
