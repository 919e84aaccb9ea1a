"""Self-attention of the cache-free forwards, one function per implementation.

Two masks cover the model: the decoder's causal attention over key padding (`causal_*`) and the
vision tower's attention within segments, query i seeing key j iff seg[i] == seg[j] > 0
(`segment_*`: one image frame in full-attention blocks, one window in window blocks). Each has
three implementations with the same signature and, on every row that matters, the same values:

- 'xla': plain einsums and a dense mask, blocked so masked-out score blocks are skipped. The
  CPU default and the reference the kernels are tested against.
- 'splash': the Pallas splash-attention kernel (TPU; interpreted elsewhere, for tests).
- 'cudnn': cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU, 16-bit).

Padding rows. The reference gives zeros where a query sees no key (a left-padded decoder query,
a vision padding patch). The kernels cannot: a softmax needs one allowed key per row. They give
padding its own segment (id 0), so padding queries attend to padding keys: finite values that
no real position reads (real queries never see padding keys) and the model never uses (padding
positions carry no loss; the tower zeroes padding units).

Einsum letters: B batch, T query positions, S key positions, K key/value heads, G query heads
per key/value head (H = K * G), P patches, E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from atlas_jax import sharding as shd
from atlas_jax.model.config import ATTENTION, ConfigError
from atlas_jax.model.layers import masked_softmax_attention


def resolve(setting: str, platform: str, dtype: str) -> str:
    """The implementation `model.attention` = `setting` names for devices of `platform` ('tpu',
    'gpu', 'cpu': the mesh's, not the host's) and compute dtype `dtype`. 'auto': splash on TPU,
    cuDNN on GPU in 16-bit (cuDNN has no float32 kernel), XLA otherwise."""
    if setting == "auto":
        if platform == "tpu":
            return "splash"
        return "cudnn" if platform == "gpu" and dtype in ("bfloat16", "float16") else "xla"
    if setting not in ATTENTION:
        raise ConfigError(f"model.attention={setting!r}: expected 'auto' or one of {list(ATTENTION)}")
    if setting == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs GPU devices; the mesh's are {platform!r}: use 'auto'")
    if setting == "splash" and platform not in ("tpu", "cpu"):
        raise ConfigError(f"model.attention='splash' is a TPU kernel; the mesh's devices are {platform!r}: use 'auto'")
    return setting


# ---------------------------------------------------------------------------- xla (reference)
# Causal: query block i needs only the keys up to its own end, so splitting the queries into n
# blocks skips (n - 1) / 2n of the score matrix in both passes. Blocks are at least
# MIN_CAUSAL_BLOCK queries; at most MAX_CAUSAL_BLOCKS keep the program small for long sequences.
MIN_CAUSAL_BLOCK = 64
MAX_CAUSAL_BLOCKS = 8


def causal_xla(q_btkge, k_bske, v_bske, key_mask_bs, scale: float) -> jax.Array:
    """Causal attention of a cache-free forward (S == T) over real keys, per query block.

    q: [B, T, K, G, E]; k, v: [B, S, K, E]; key_mask: bool[B, S] (False = padding).
    Returns [B, T, K, G, E]; a query that sees no real key gives zeros.
    """
    T = q_btkge.shape[1]
    causal_ts = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    dense = (causal_ts[None] & key_mask_bs[:, None, :])[:, None, None]  # [B, 1, 1, T, S]
    n = max(1, min(MAX_CAUSAL_BLOCKS, T // MIN_CAUSAL_BLOCK))
    bounds = [T * i // n for i in range(n + 1)]
    out = [
        masked_softmax_attention(q_btkge[:, lo:hi], k_bske[:, :hi], v_bske[:, :hi], dense[..., lo:hi, :hi], scale)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    return jnp.concatenate(out, axis=1)


def segment_xla(q_bphe, k_bphe, v_bphe, seg_bp, scale: float, band: int | None = None) -> jax.Array:
    """Attention where query i sees key j iff seg[i] == seg[j] > 0.

    q, k, v: [B, P, H, E]; seg: int[B, P] (0 = padding, which sees nothing: zeros). With `band`,
    every segment must be a contiguous run of at most `band` positions (the windows of a
    window-order row, see `vision_layout`): then query block [lo, hi) can only see keys in
    [lo - band + 1, hi + band - 1), and blocks of 4 * band queries attend to those alone; the
    work falls from P^2 to about 1.5 * band * P. Returns [B, P, H, E].
    """

    def attend(lo, hi, k_lo, k_hi):
        seg_q, seg_k = seg_bp[:, lo:hi, None], seg_bp[:, None, k_lo:k_hi]
        mask_bqk = (seg_q == seg_k) & (seg_q > 0)
        out = masked_softmax_attention(
            q_bphe[:, lo:hi, :, None], k_bphe[:, k_lo:k_hi], v_bphe[:, k_lo:k_hi], mask_bqk[:, None, None], scale
        )
        return out[:, :, :, 0]

    P = q_bphe.shape[1]
    n = P // (4 * band) if band else 1
    if n <= 1:
        return attend(0, P, 0, P)
    bounds = [P * i // n for i in range(n + 1)]
    blocks = [attend(lo, hi, max(0, lo - band + 1), min(P, hi + band - 1)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return jnp.concatenate(blocks, axis=1)


# ---------------------------------------------------------------------------- splash (TPU)
LANES = 128  # the kernel tiles both sequence axes in multiples of the TPU's 128 lanes


def causal_splash(q_btkge, k_bske, v_bske, key_mask_bs, scale: float) -> jax.Array:
    """`causal_xla` on the splash kernel: its causal mask (upper-triangle blocks skipped) and
    segment ids real = 1, padding = 0; grouped heads natively (kernel head h reads key/value
    head h // G, the order of [K, G])."""
    B, T, K, G, E = q_btkge.shape
    q_bhte = jnp.transpose((q_btkge * scale).reshape(B, T, K * G, E), (0, 2, 1, 3))
    out_bhte = _splash(
        q_bhte, jnp.swapaxes(k_bske, 1, 2), jnp.swapaxes(v_bske, 1, 2), key_mask_bs.astype(jnp.int32), "causal", 0
    )
    return jnp.transpose(out_bhte, (0, 2, 1, 3)).reshape(B, T, K, G, E)


def segment_splash(q_bphe, k_bphe, v_bphe, seg_bp, scale: float, band: int | None = None) -> jax.Array:
    """`segment_xla` on the splash kernel: segment ids as given; with `band`, a local mask of
    +-(band - 1) positions lets the kernel skip every key block outside the band."""
    to_bhpe = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out_bhpe = _splash(to_bhpe(q_bphe * scale), to_bhpe(k_bphe), to_bhpe(v_bphe), seg_bp.astype(jnp.int32),
                       "local" if band else "full", band or 0)
    return to_bhpe(out_bhpe)


def _splash(q_bhte, k_bkte, v_bkte, seg_bt, kind: str, band: int) -> jax.Array:
    """The kernel over a batch, sequences padded to a whole number of tiles (the padding is
    segment 0, like any padding, and cut off again). Under a mesh it runs per shard (a Pallas
    call is opaque to XLA's partitioner): batch over the batch axes, heads over 'tensor' when
    both head counts divide it. q: [B, H, T, E]; k, v: [B, K, T, E]; seg: int32[B, T]."""
    T = q_bhte.shape[2]
    padded = -(-T // LANES) * LANES
    if padded != T:
        pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padded - T), (0, 0)])  # noqa: E731
        q_bhte, k_bkte, v_bkte = pad(q_bhte), pad(k_bkte), pad(v_bkte)
        seg_bt = jnp.pad(seg_bt, ((0, 0), (0, padded - T)))
    mesh = jax.sharding.get_abstract_mesh()
    # The mesh's devices decide, not the host's: the compile check lowers for TPUs from a CPU.
    platform = getattr(mesh.abstract_device, "platform", None) or jax.default_backend()

    def run(q, k, v, seg):
        kernel = _splash_kernel(kind, padded, band, q.shape[1], interpret=platform != "tpu")
        return jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(seg, seg))

    if mesh.empty:
        out = run(q_bhte, k_bkte, v_bkte, seg_bt)
    else:
        q_spec = shd.logical_to_spec(("batch", "heads", None, None), q_bhte.shape, mesh)
        kv_spec = shd.logical_to_spec(("batch", "kv_heads", None, None), k_bkte.shape, mesh)
        if q_spec[1] != kv_spec[1]:  # key/value heads not divisible: keep all heads together
            q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
        seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        out = jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
            q_bhte, k_bkte, v_bkte, seg_bt
        )
    return out[:, :, :T]


def _splash_kernel(kind: str, length: int, band: int, heads: int, *, interpret: bool):
    """A splash kernel over `heads` heads of sequences of `length` (a multiple of LANES). Tiles of
    up to 512 positions; of 128 under a local mask, so that a row of tiles computes only the
    about three that meet the window band. Built inside the trace that uses it: its mask
    tables become that program's constants (the library caches the numpy work per shape)."""
    shape = (length, length)
    mask = {
        "causal": lambda: splash.CausalMask(shape),
        "local": lambda: splash.LocalMask(shape, window_size=(band - 1, band - 1), offset=0),
        "full": lambda: splash.FullMask(shape),
    }[kind]()
    block = LANES if kind == "local" else next(b for b in (512, 256, LANES) if length % b == 0)
    blocks = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True,
    )
    return splash.make_splash_mha(
        splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


# ---------------------------------------------------------------------------- cuDNN (GPU)
def causal_cudnn(q_btkge, k_bske, v_bske, key_mask_bs, scale: float, *, implementation: str = "cudnn") -> jax.Array:
    """`causal_xla` on cuDNN's fused kernel: its causal mask plus the key padding as a mask
    (cuDNN's sequence lengths cannot express the left padding of RL prompts). q, k, v in 16-bit.
    `implementation='xla'` runs the same arguments through JAX's reference (CPU tests)."""
    B, T, K, G, E = q_btkge.shape
    mask_b1ts = jnp.broadcast_to(key_mask_bs[:, None, None, :], (B, 1, T, T))  # cuDNN takes no broadcast T
    out_bthe = jax.nn.dot_product_attention(
        q_btkge.reshape(B, T, K * G, E), k_bske, v_bske, mask=mask_b1ts, scale=scale, is_causal=True,
        implementation=implementation,
    )
    return out_bthe.reshape(B, T, K, G, E)


def segment_cudnn(q_bphe, k_bphe, v_bphe, seg_bp, scale: float, band: int | None = None, *,
                  implementation: str = "cudnn") -> jax.Array:
    """`segment_xla` on cuDNN's fused kernel: equal segment ids as a mask (padding, id 0, sees
    padding). `band` changes nothing here (cuDNN's local window is causal-only)."""
    del band
    mask_b1pp = (seg_bp[:, :, None] == seg_bp[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_bphe, k_bphe, v_bphe, mask=mask_b1pp, scale=scale, implementation=implementation)


CAUSAL = {"xla": causal_xla, "splash": causal_splash, "cudnn": causal_cudnn}
SEGMENT = {"xla": segment_xla, "splash": segment_splash, "cudnn": segment_cudnn}
