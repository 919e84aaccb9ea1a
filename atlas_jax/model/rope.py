"""Multimodal rotary position embedding (M-RoPE) of the Qwen2.5-VL decoder.

Every token has three position indices (temporal, height, width). Text tokens use the same
index in all three rows, counting up by one. An image's merged tokens take
`start + (t, h, w)` over its merged grid, and the text after the image resumes at
`start + max(h, w)` (the rule of `transformers`' `Qwen2_5_VLModel.get_rope_index`). The
rotary frequencies are split into `mrope_section` chunks; chunk i rotates by row i % 3.

`mrope_positions` runs on the host (numpy): positions depend on the data, and computing them
in the input pipeline keeps the jitted model free of data-dependent shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mrope_positions(
    input_ids: np.ndarray,
    grid_thw: Sequence[Sequence[int]],
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> np.ndarray:
    """M-RoPE position ids of one sequence.

    input_ids: int[T]; grid_thw: the (t, h, w) patch grid of each image, in order of
    appearance; attention_mask: bool[T] (False = padding, which gets position 0).
    Returns int32[3, T].
    """
    input_ids = np.asarray(input_ids)
    valid = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    ids = input_ids[valid]
    is_image = ids == image_token_id
    out = np.zeros((3, ids.shape[0]), np.int64)
    grids = iter(grid_thw)
    pos, i, n = 0, 0, ids.shape[0]
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out[:, i:j] = np.arange(j - i) + pos
            pos += j - i
        else:
            try:
                t, h, w = (int(x) for x in next(grids))
            except StopIteration:
                raise ValueError(f"more runs of image tokens than images ({len(grid_thw)} grids given)") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != j - i:
                raise ValueError(
                    f"image run of {j - i} tokens at valid position {i} does not match grid {(t, h, w)} "
                    f"({t * gh * gw} merged tokens expected)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i:j] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
            pos += max(gh, gw)
        i = j
    if next(grids, None) is not None:
        raise ValueError(f"{len(grid_thw)} image grids given but fewer runs of image tokens in the sequence")
    full = np.zeros((3,) + input_ids.shape, np.int32)
    full[:, valid] = out
    return full


def next_position(positions_b3t: np.ndarray | jax.Array, attention_mask_bt=None):
    """The position index of the first token generated after each prompt: max over valid + 1.

    positions: int[..., 3, T] (one sequence or a batch); attention_mask: bool[..., T].
    Returns int[...]."""
    xp = jnp if isinstance(positions_b3t, jax.Array) else np
    p = positions_b3t if attention_mask_bt is None else xp.where(attention_mask_bt[..., None, :], positions_b3t, 0)
    return p.max(axis=(-2, -1)) + 1


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
    """float32[head_dim // 2]: theta ** (-2i / head_dim)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_cos_sin(
    positions_b3t: jax.Array, head_dim: int, theta: float, section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32[B, T, head_dim] for M-RoPE position ids int[B, 3, T]."""
    freqs = positions_b3t[..., None].astype(jnp.float32) * inv_frequencies(head_dim, theta)  # [B, 3, T, Dh/2]
    bounds = np.cumsum((0,) + tuple(section))
    chunks = [freqs[:, i % 3, :, bounds[i] : bounds[i + 1]] for i in range(len(section))]
    freqs = jnp.concatenate(chunks, axis=-1)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
