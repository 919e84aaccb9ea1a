"""What the flat matmuls buy, and what a hand-written attention backward did not, side by side.

    python bench/step_forms.py            # tiny train step, 8 x 256 tokens, one core
    python bench/step_forms.py --threads 2

The forward+backward step of `bench_train_step.py` (tiny config, one 112 px image per sample),
compiled three times in one process:

- `current`: the library as it is;
- `tensordot`: `Dense` as `jnp.tensordot` over [B, T, D] (the form before `layers.tensordot_rows`);
- `hand-written attention`: attention in a head-major layout ([B, K, G, T, E] queries) with a
  `jax.custom_vjp` backward (every product a plain batched GEMM, no score-sized transpose,
  FlashAttention's rowsum(dO * O)) in the decoder's query blocks and the vision tower. On its
  own it ran the tiny model's attention 1.4x faster than autodiff; inside the whole step it made
  no difference beyond the noise (0.97-1.03 of the step time), so the library kept autodiff.

Steps alternate between the programs; medians are reported with each program's loss (equal).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (the thread pool is sized in main(), before the first JAX call)
import jax.numpy as jnp  # noqa: E402


def tensordot_matmul(x, kernel, n_in):
    return jnp.tensordot(x, kernel, axes=n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_major(q, k, v, mask, scale):
    """q: [B, K, G, T, E]; k, v: [B, K, S, E]; mask broadcastable to [B, K, G, T, S]."""
    return _head_major_fwd(q, k, v, mask, scale)[0]


def _head_major_fwd(q, k, v, mask, scale):
    logits = jnp.einsum("bkgte,bkse->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bkgts,bkse->bkgte", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _head_major_bwd(scale, res, d_out):
    q, k, v, probs, out = res
    d_probs = jnp.einsum("bkgte,bkse->bkgts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out * out, axis=-1, keepdims=True)  # rowsum(dP * P)
    d_logits = probs * (d_probs - row) * scale
    d_q = jnp.einsum("bkgts,bkse->bkgte", d_logits, k)
    d_kT = jnp.einsum("bkgte,bkgts->bkes", q, d_logits)
    d_vT = jnp.einsum("bkgte,bkgts->bkes", d_out, probs)
    return d_q, jnp.swapaxes(d_kT, 2, 3), jnp.swapaxes(d_vT, 2, 3), None


head_major.defvjp(_head_major_fwd, _head_major_bwd)


def hand_written_attention(q, k, v, mask, scale):
    """`masked_softmax_attention`'s signature ([B, T, K, G, E] queries) over `head_major`."""
    out = head_major(jnp.transpose(q, (0, 2, 3, 1, 4)), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, scale)
    return jnp.transpose(out, (0, 3, 1, 2, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import bench_train_step as b

    from atlas_jax.model import attention, layers

    cfg = b.model_config("tiny")
    batch = b.make_batch(cfg, 8, 256, 112)
    patches = {
        "current": [],
        "tensordot": [(layers, "tensordot_rows", tensordot_matmul)],
        "hand-written attention": [
            (attention, "masked_softmax_attention", hand_written_attention),
        ],
    }
    steps, losses = {}, {}
    with tempfile.TemporaryDirectory() as ckpt:
        b.save_checkpoint(cfg, ckpt)
        for name, patch in patches.items():
            saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patch]
            for mod, attr, fn in patch:
                setattr(mod, attr, fn)
            try:  # the patch is read while the step is traced, i.e. by its first call
                steps[name], _ = b.jax_step_fn(ckpt, batch)
                losses[name] = steps[name](check=True)[0]
            finally:
                for mod, attr, fn in saved:
                    setattr(mod, attr, fn)
    for step in steps.values():
        step(), step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    print(f"tiny train step, 8 x 256 tokens, {args.threads} thread(s), {args.steps} alternating steps each")
    cur = statistics.median(times["current"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} loss {losses[name]:.6f}  {med:.4f} s/step  time / current {med / cur:.2f}")


if __name__ == "__main__":
    main()
