"""Times the tiny-config JAX train step with alternative attention formulations (CPU study).

    for v in current bias transposed dpa manual; do taskset -c 0 python bench/attention_variants.py $v; done

Each variant replaces `masked_softmax_attention` in the decoder and the vision tower; the step
is the one `bench_train_step.py` times (batch 8 x 256 tokens, one 112 px image per sample).
"""

import os
import sys
import tempfile
import time

import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as b
from atlas_jax.model import attention, layers

def v_bias(q, k, v, mask, scale):
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = logits + jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)

def v_transposed(q, k, v, mask, scale):
    qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # b k g t d
    kt = jnp.transpose(k, (0, 2, 1, 3))  # b k s d
    vt = jnp.transpose(v, (0, 2, 1, 3))
    logits = jnp.einsum("bkgtd,bksd->bkgts", qt, kt, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, vt)
    return jnp.transpose(out, (0, 3, 1, 2, 4))

def v_dpa(q, k, v, mask, scale):
    B, T, K, G, E = q.shape
    qh = q.reshape(B, T, K * G, E)
    m = jnp.broadcast_to(mask, (B, K, G) + mask.shape[-2:]).reshape(B, K * G, *mask.shape[-2:])
    out = jax.nn.dot_product_attention(qh, k, v, mask=m, scale=scale, implementation="xla")
    return out.reshape(B, T, K, G, E)

def v_manual_softmax(q, k, v, mask, scale):
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, -1e30)
    mx = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    e = jnp.exp(logits - mx)
    probs = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)

variants = {"current": layers.masked_softmax_attention, "bias": v_bias, "transposed": v_transposed, "dpa": v_dpa, "manual": v_manual_softmax}
name = sys.argv[1]
fn = variants[name]
attention.masked_softmax_attention = fn  # the XLA attention of both towers
cfg = b.model_config("tiny")
d = tempfile.mkdtemp()
b.save_checkpoint(cfg, d)
batch = b.make_batch(cfg, 8, 256, 112)
step, _ = b.jax_step_fn(d, batch)
step(check=True)
for _ in range(3): step()
ts = []
for _ in range(15):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(name, "median %.4f min %.4f" % (np.median(ts), np.min(ts)))
