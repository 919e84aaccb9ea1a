"""What the blocked attention paths buy: each against the dense form it replaces, side by side.

    python bench/attention_blocks.py decoder   # tiny train step: causal query blocks vs one dense block
    python bench/attention_blocks.py vision    # 100m vision tower fwd+bwd, 448 px images: window bands vs dense

decoder: the forward+backward step of `bench_train_step.py` (tiny config, batch 8 x 256, one
112 px image per sample, one core), compiled twice: with `attention.MIN_CAUSAL_BLOCK` at its value
(4 query blocks of 64 here) and so large that attention is one dense [T, T] block.
vision: the `small_100m` vision tower (6 blocks, 4 of them windowed) on 2 images of 448 px (1024
patches each), forward + backward of a sum of squares, compiled with the tower's
`window_band` (its window blocks' band) as built and set to None (dense block-diagonal mask over the whole row).
Steps alternate between the two programs; medians are reported, with the two losses (equal).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _alternate(a, b, n: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(n):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def decoder_study(ckpt: str) -> None:
    import bench_train_step as b

    from atlas_jax.model import attention

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    batch = b.make_batch(b.model_config("tiny"), 8, 256, 112)
    default = attention.MIN_CAUSAL_BLOCK
    attention.MIN_CAUSAL_BLOCK = 10**9  # read when the step is traced: one dense block
    dense, _ = b.jax_step_fn(ckpt, batch)
    ld = dense(check=True)[0]
    attention.MIN_CAUSAL_BLOCK = default
    blocked, _ = b.jax_step_fn(ckpt, batch)
    lb = blocked(check=True)[0]
    for _ in range(3):
        dense(), blocked()
    td, tb = _alternate(dense, blocked, 15)
    print(f"decoder, tiny train step, 8 x 256 tokens, 1 core: loss dense {ld:.6f} blocked {lb:.6f}")
    print(f"dense {td:.4f} s/step, causal blocks {tb:.4f} s/step: {td / tb:.2f}x")


def vision_study(ckpt: str) -> None:
    import bench_train_step as b
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax import hf_checkpoint, sharding
    from atlas_jax.data.device_batch import LAYOUT_KEYS

    B, px = 2, 448
    batch = b.make_batch(b.model_config("100m"), B, 512, px)
    model = hf_checkpoint.from_hf(ckpt, mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    pv = jnp.asarray(batch["pixel_values"])
    layout = {k: jnp.asarray(batch[k]) for k in LAYOUT_KEYS}

    def step_of(tower):
        graphdef, params, rest = nnx.split(tower, nnx.Param, ...)  # window_band is in the graphdef

        @jax.jit
        def f(params):
            return jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(pv, layout) ** 2))(params)

        return lambda: float(jax.block_until_ready(f(params))[0])

    banded = step_of(model.vision)
    model.vision.window_band = None
    dense = step_of(model.vision)
    ld, lb = dense(), banded()
    td, tb = _alternate(dense, banded, 6)
    print(f"vision tower (small_100m), {B} x {px} px ({pv.shape[1]} patches each), fwd+bwd: loss dense {ld:.1f} banded {lb:.1f}")
    print(f"dense {td:.3f} s, window bands {tb:.3f} s: {td / tb:.2f}x")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("decoder", "vision"):
        raise SystemExit("usage: python bench/attention_blocks.py decoder|vision")
    import bench_train_step as b

    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as ckpt:
        b.save_checkpoint(b.model_config("tiny" if which == "decoder" else "100m"), ckpt)
        (decoder_study if which == "decoder" else vision_study)(ckpt)


if __name__ == "__main__":
    main()
