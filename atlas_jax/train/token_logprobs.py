"""Log-probabilities of given tokens from the final hidden states, never holding [B, T, V] logits.

A training step needs per position only log p(target) (and, for SFT's accuracy, whether the
target is the argmax). The dense head's float32 logits [B, T, V] are the largest buffers of a 7B
step (8 x 4096 x 152064 x 4 bytes = 18.6 GiB per chip, several copies in the backward pass).
`target_logprobs` applies the output head to `chunk` positions at a time in a loop, each chunk
under `jax.checkpoint`: the forward keeps two numbers per position, and the backward pass
recomputes one chunk's logits at a time. Values and gradients are the dense form's
(tests/test_token_logprobs.py).

Einsum letters: B batch, T positions, C positions of one chunk, N chunks, D model width,
V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atlas_jax.model.layers import tensordot_rows

CHUNK = 512  # positions per chunk: [B, 512, V] float32 logits live at once (8 rows, 7B: 2.3 GiB)


def _over_chunks(per_chunk, h_btd: jax.Array, targets_bt: jax.Array, chunk: int) -> tuple[jax.Array, ...]:
    """per_chunk(h_bcd, t_bc) -> tuple of [B, C] arrays, applied `chunk` positions at a time, each
    chunk under `jax.checkpoint`; returns the tuple as [B, T] arrays."""
    B, T, D = h_btd.shape
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    h_nbcd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0))).reshape(B, N, C, D).swapaxes(0, 1)
    t_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(B, N, C).swapaxes(0, 1)
    outs_nbc = jax.lax.map(lambda x: jax.checkpoint(per_chunk)(*x), (h_nbcd, t_nbc))
    return tuple(x.swapaxes(0, 1).reshape(B, N * C)[:, :T] for x in outs_nbc)


def target_logprobs(h_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, *, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """(float32[B, T] log_softmax(h . head)[target], bool[B, T] argmax(h . head) == target).

    h_btd: float[B, T, D] final normed hidden states (`VLM(..., head=False)`); head_dv: float[D, V]
    (`VLM.output_head()`), the logits being `h . head` in its dtype, then float32, exactly as the
    model's head computes them; targets_bt: int32[B, T]. T need not be a multiple of `chunk`.
    """

    def one_chunk(h_bcd, t_bc):
        logits_bcv = tensordot_rows(h_bcd, head_dv, 1).astype(jnp.float32)
        picked_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
        hit_bc = jnp.argmax(logits_bcv, axis=-1) == t_bc
        return picked_bc - jax.nn.logsumexp(logits_bcv, axis=-1), hit_bc

    return _over_chunks(one_chunk, h_btd, targets_bt, chunk)


def tempered_logprobs_entropy(h_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, temperature: float = 1.0,
                              *, chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """(float32[B, T] log p(target), float32[B, T] entropy of p) for p = softmax(h . head / temperature).

    The RL policy's distribution: the sampler draws from the same tempered softmax (before its
    top-k / top-p filters), so these are the log-probs it records. Arguments as `target_logprobs`.
    """

    def one_chunk(h_bcd, t_bc):
        logits_bcv = tensordot_rows(h_bcd, head_dv, 1).astype(jnp.float32) / temperature
        logp_bcv = jax.nn.log_softmax(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logp_bcv, t_bc[..., None], axis=-1)[..., 0]
        return picked_bc, -jnp.sum(jnp.exp(logp_bcv) * logp_bcv, axis=-1)

    return _over_chunks(one_chunk, h_btd, targets_bt, chunk)
