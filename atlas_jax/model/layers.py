"""Building blocks shared by the vision tower, the decoder and the visual-operation modules.

Every parameter is an `nnx.Param` whose `axes` metadata holds one logical axis name per
dimension; `atlas_jax.sharding` maps those names onto the mesh with one rules table.

Logical axis names: 'vocab', 'embed' (model width), 'mlp' (SwiGLU hidden), 'heads',
'kv_heads', 'head_dim', 'qkv' (the fused q/k/v axis of the ViT), 'patch' (a flattened pixel
patch), 'ops' (the functional-token operation axis), 'norm' (a normalisation scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    """A parameter initialised by `init(key, shape, dtype)` and tagged with logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Dense(nnx.Module):
    """y = x . W (+ b), contracting the trailing `len(in_shape)` dims of x with W's leading dims.

    kernel: [*in_shape, *out_shape]; bias: [*out_shape]. Computation runs in `dtype`.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Axes,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, in_shape + out_shape, axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, out_shape, axes[self.n_in :], param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = tensordot_rows(x.astype(self.dtype), kernel, self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def tensordot_rows(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """`tensordot(x, kernel, n_in)` with x's leading axes flattened into one row axis first.

    x: [*lead, *in_shape]; kernel: [*in_shape, *out_shape] -> [*lead, *out_shape].
    Why: over [B, T, D] the weight gradient contracts two axes (B and T), which XLA:CPU sends
    to a slow path with layout copies; over [B*T, D] every product, forward and backward, is a
    plain GEMM (1.2x on the tiny model's train step, bench/RESULTS.md). Only the leading axes
    are merged (batch-sharded, the major one), so the kernel's axes keep their shardings.
    """
    lead = x.shape[: x.ndim - n_in]
    y = jnp.tensordot(x.reshape(-1, *x.shape[x.ndim - n_in :]), kernel, axes=n_in)
    return y.reshape(*lead, *y.shape[1:])


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """scale * (x / rms(x)) over the last axis, as `transformers`' Qwen2 RMSNorm: computed in
    float32, the normalised value cast back to x's dtype before the scale (the reference
    rounding in bfloat16). scale broadcasts against x."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


class RMSNorm(nnx.Module):
    """`rms_norm` with a learned scale float[dim]."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class SwiGLU(nnx.Module):
    """down(act(gate(x)) * up(x)); `use_bias` for the ViT's MLP, none for the decoder's."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str,
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={act!r}: expected one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Dense((dim,), (hidden,), ("embed", "mlp"), **kw)
        self.up_proj = Dense((dim,), (hidden,), ("embed", "mlp"), **kw)
        self.down_proj = Dense((hidden,), (dim,), ("mlp", "embed"), **kw)

    def __call__(self, x_bd: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x_bd)) * self.up_proj(x_bd))


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (the rotary convention of the reference)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, computed in float32 and cast back to x's dtype.

    x: [..., H, Dh]; cos, sin: broadcastable to x without the head axis, i.e. [..., Dh].
    """
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :].astype(jnp.float32), sin[..., None, :].astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def masked_softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """Multi-head attention with grouped key/value heads and an explicit boolean mask.

    q: [B, T, K, G, Dh] (K key/value heads, G query heads per key head); k, v: [B, S, K, Dh];
    mask: bool, broadcastable to [B, K, G, T, S]. Softmax in float32. Rows with no allowed key
    (padding queries) produce zeros rather than NaN. Returns [B, T, K, G, Dh].
    """
    out = head_major_attention(
        jnp.transpose(q, (0, 2, 3, 1, 4)), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, scale
    )
    return jnp.transpose(out, (0, 3, 1, 2, 4))


def head_major_attention(q_bkgte, k_bkse, v_bkse, mask, scale: float) -> jax.Array:
    """`masked_softmax_attention` on head-major operands, the KV cache's layout.

    q: [B, K, G, T, E]; k, v: [B, K, S, E]; mask: bool, broadcastable to [B, K, G, T, S].
    Returns [B, K, G, T, E]. Decoding reads the whole cache every step: kept head-major, it is
    read as it lies, where the [B, S, K, E] layout costs a transpose of the cache per layer
    and step (tiny decode about 1.3x, bench/RESULTS.md).
    """
    logits = jnp.einsum("bkgte,bkse->bkgts", q_bkgte, k_bkse, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0).astype(v_bkse.dtype)
    return jnp.einsum("bkgts,bkse->bkgte", probs, v_bkse)
