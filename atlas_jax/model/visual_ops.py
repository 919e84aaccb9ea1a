"""Visual-operation modules: one gated cross-attention per functional token.

At a position t whose input token is operation o's functional token, after decoder layer
`cfg.layer`, the residual stream gains

    h_t += gate_o * Wo_o . softmax(q_o(norm_o(h_t)) . k_o(norm'_o(img))^T / sqrt(E)) . v_o(img)

where `img` are the sample's merged image tokens (the vision tower's output, in the LM width)
that precede t. Gates start at zero, so a pretrained checkpoint is unchanged until training
opens them; the modules learn only from the language-model / RL losses.

All operations' weights are stacked on a leading 'ops' axis (O) and run as one batched
computation: queries and keys are computed for every operation and the one belonging to each
position is selected with a one-hot contraction. Only the first `max_positions` (M)
functional positions of each sample are processed, which keeps the cost independent of the
sequence length. The count runs over the whole sequence: a cached forward passes how many
functional tokens the cache already holds, so decoding token by token acts on exactly the
positions a full forward over the same tokens acts on (a completion that spams functional
tokens gets the same log-probs from the sampler and from the trainer).

Einsum letters: B batch, T positions, M selected functional positions, P image tokens,
O operations, D model width, H heads, E head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from atlas_jax.model.config import DTYPES, ModelConfig
from atlas_jax.model.layers import param, rms_norm


class ImageMemory(NamedTuple):
    """Per-operation keys / values of a batch's image tokens, computed once (prefill) and cached.

    k, v: [B, P, O, H, E]; valid: bool[B, P]; slot: int32[B, P] sequence slot of each image token.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    slot: jax.Array


class VisualOps(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        ops = cfg.visual_ops
        O, D, H, E = ops.num_ops, cfg.text.hidden_size, ops.num_heads, ops.head_dim
        param_dtype = DTYPES[cfg.param_dtype]
        self.dtype = DTYPES[cfg.dtype]
        self.token_ids = tuple(ops.token_ids)
        self.max_positions = ops.max_positions
        init = nnx.initializers.normal(D**-0.5)
        self.query_norm = param(rngs, nnx.initializers.ones, (O, D), ("ops", "norm"), param_dtype)
        self.image_norm = param(rngs, nnx.initializers.ones, (O, D), ("ops", "norm"), param_dtype)
        self.wq = param(rngs, init, (O, D, H, E), ("ops", "embed", "heads", "head_dim"), param_dtype)
        self.wk = param(rngs, init, (O, D, H, E), ("ops", "embed", "heads", "head_dim"), param_dtype)
        self.wv = param(rngs, init, (O, D, H, E), ("ops", "embed", "heads", "head_dim"), param_dtype)
        self.wo = param(rngs, nnx.initializers.normal((H * E) ** -0.5), (O, H, E, D), ("ops", "heads", "head_dim", "embed"), param_dtype)
        self.gate = param(rngs, nnx.initializers.zeros, (O,), ("ops",), param_dtype)

    def op_index(self, tokens_bt: jax.Array) -> jax.Array:
        """int32[B, T]: the operation of each token, -1 for ordinary tokens."""
        op = jnp.full(tokens_bt.shape, -1, jnp.int32)
        for o, tid in enumerate(self.token_ids):
            op = jnp.where(tokens_bt == tid, o, op)
        return op

    def count(self, tokens_bt: jax.Array) -> jax.Array:
        """int32[B]: functional tokens among `tokens_bt`."""
        return jnp.sum(self.op_index(tokens_bt) >= 0, axis=1).astype(jnp.int32)

    def image_memory(self, img_bpd: jax.Array, valid_bp: jax.Array, slot_bp: jax.Array) -> ImageMemory:
        x = img_bpd.astype(self.dtype)
        xn_bpod = rms_norm(x[:, :, None, :], self.image_norm[...], 1e-6)
        k = jnp.einsum("bpod,odhe->bpohe", xn_bpod, self.wk[...].astype(self.dtype))
        v = jnp.einsum("bpod,odhe->bpohe", xn_bpod, self.wv[...].astype(self.dtype))
        return ImageMemory(k, v, valid_bp, slot_bp)

    def __call__(
        self,
        h_btd: jax.Array,
        tokens_bt: jax.Array,
        query_slot_t: jax.Array,
        memory: ImageMemory,
        seen_b: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the operations at functional positions.

        h_btd: residual stream after layer `cfg.layer`; tokens_bt: input token ids;
        query_slot_t: int32[T] sequence slot of each position (causality w.r.t. image tokens);
        seen_b: int32[B] functional tokens before these T positions (a cache's; None = 0): only
        the sequence's first `max_positions` functional positions are processed.
        Returns the updated stream and {'attn': float32[B, M, P] head-averaged attention over
        image tokens, 'position': int32[B, M] position of each selected op, 'op': int32[B, M]
        (-1 where the slot is unused)}.
        """
        B, T, _ = h_btd.shape
        O = len(self.token_ids)
        M = min(self.max_positions, T)
        op_bt = self.op_index(tokens_bt)
        # The first M functional positions of each sample, in order (stable sort of "not functional").
        pos_bm = jnp.argsort(op_bt < 0, axis=1, stable=True)[:, :M].astype(jnp.int32)
        op_bm = jnp.take_along_axis(op_bt, pos_bm, axis=1)
        rank_bm = jnp.arange(M, dtype=jnp.int32)[None] + (0 if seen_b is None else seen_b[:, None])
        used_bm = (op_bm >= 0) & (rank_bm < self.max_positions)
        op_bm = jnp.where(used_bm, op_bm, -1)
        onehot_bmo = jax.nn.one_hot(op_bm, O, dtype=self.dtype)  # all-zero rows where unused

        x_bmd = jnp.take_along_axis(h_btd, pos_bm[..., None], axis=1).astype(self.dtype)
        xn_bmod = rms_norm(x_bmd[:, :, None, :], self.query_norm[...], 1e-6)
        q_bmohe = jnp.einsum("bmod,odhe->bmohe", xn_bmod, self.wq[...].astype(self.dtype))
        q_bmhe = jnp.einsum("bmohe,bmo->bmhe", q_bmohe, onehot_bmo)
        # Scores against every operation's keys, then keep the position's own operation.
        s_bmohp = jnp.einsum("bmhe,bpohe->bmohp", q_bmhe, memory.k, preferred_element_type=jnp.float32)
        s_bmhp = jnp.einsum("bmohp,bmo->bmhp", s_bmohp, onehot_bmo.astype(jnp.float32))
        s_bmhp = s_bmhp * q_bmhe.shape[-1] ** -0.5

        qslot_bm = query_slot_t[pos_bm]
        allowed_bmp = memory.valid[:, None, :] & (memory.slot[:, None, :] < qslot_bm[..., None])
        allowed_bmp &= used_bm[..., None]
        s_bmhp = jnp.where(allowed_bmp[:, :, None, :], s_bmhp, jnp.finfo(jnp.float32).min)
        p_bmhp = jax.nn.softmax(s_bmhp, axis=-1)
        p_bmhp = jnp.where(allowed_bmp[:, :, None, :], p_bmhp, 0.0)

        o_bmohe = jnp.einsum("bmhp,bpohe->bmohe", p_bmhp.astype(self.dtype), memory.v)
        y_bmod = jnp.einsum("bmohe,ohed->bmod", o_bmohe, self.wo[...].astype(self.dtype))
        gate_o = self.gate[...].astype(self.dtype)
        delta_bmd = jnp.einsum("bmod,bmo,o->bmd", y_bmod, onehot_bmo, gate_o)

        b_idx = jnp.arange(B)[:, None]
        h_btd = h_btd.at[b_idx, pos_bm].add(delta_bmd.astype(h_btd.dtype))
        aux = {"attn": p_bmhp.mean(axis=2), "position": pos_bm, "op": op_bm}
        return h_btd, aux
