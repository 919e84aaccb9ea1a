"""Model-FLOPs utilisation of the library's compiled SFT step (GPU / TPU; runs on CPU too).

The timed program is `atlas_jax.train.sft.make_train_step`, the step the SFT job runs: forward,
masked cross-entropy, backward, global-norm clipping and the AdamW update, with donated state,
on a ('data', 'fsdp', 'tensor') mesh over every local device. The batch is B sequences of T
tokens, each with one `--image` px image (its merged tokens after 4 text tokens), no padding.

MFU = model FLOPs per step / step time / (peak FLOP/s per device * devices), the baseline being
the hardware's peak dense bf16 rate (`atlas_jax.metrics.PEAK_FLOPS`, or `--peak-tflops`).
Model FLOPs are counted analytically (`atlas_jax.metrics.model_flops`: every matmul of the
vision tower, the decoder and the output head, forward 2x and backward 4x, with causal attention counted in
full as is usual for MFU); XLA's own count of the compiled program (`cost_analysis`, which
includes rematerialised forwards) is printed beside it. Run from the repository root:

    python bench/bench_mfu.py                                   # ~1B (medium_1b), bf16, remat
    python bench/bench_mfu.py --preset tiny --batch 8 --seq 256 --image 112 --dtype float32   # CPU check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="medium_1b", help="atlas_jax.model.presets name")
    ap.add_argument("--batch", type=int, default=None, help="global sequences per step (default: 4 per device)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--image", type=int, default=448, help="image side in px, one per sample (0: text only)")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--no-remat", action="store_true", help="keep activations instead of rematerialising layers")
    ap.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device (default: known table)")
    args = ap.parse_args()

    import jax

    from atlas_jax import metrics, sharding
    from atlas_jax.data import device_batch, pipeline
    from atlas_jax.model import presets, vlm
    from atlas_jax.train import optimizer, sft, train_state
    from bench_train_step import make_batch

    n_dev = jax.device_count()
    B = args.batch or 4 * n_dev
    base = presets.get(args.preset)
    V = base.text.vocab_size
    cfg = presets.get(
        args.preset, dtype=args.dtype, param_dtype=args.param_dtype, remat="none" if args.no_remat else "full",
        image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1,
    )
    mesh = sharding.make_mesh(tuple(int(x) for x in args.mesh.split(",")))

    # ------------------------------------------------------------------ model, optimizer, state
    t0 = time.perf_counter()
    model = vlm.create(cfg, mesh)
    tx = optimizer.make_optimizer(nnx_params(model), lr=1e-4, warmup_steps=10, total_steps=1000)
    graphdef, state, state_sh = train_state.create(model, tx, mesh)
    del model
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    # ------------------------------------------------------------------ batch (the SFT format)
    raw = make_batch(cfg, B, args.seq, args.image)
    host = {
        "input_ids": raw["input_ids"],
        "positions": raw["positions"],
        "attention_mask": np.ones((B, args.seq), bool),
        "loss_mask": np.ones((B, args.seq), bool),
        "functional_mask": np.zeros((B, args.seq), bool),
    }
    if args.image:
        host["pixel_values"] = raw["pixel_values"].astype(np.float32)
        host.update({k: raw[k] for k in device_batch.LAYOUT_KEYS})
    batch = pipeline.to_global(host, mesh)
    step_fn = sft.make_train_step(graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()})

    # ------------------------------------------------------------------ compile
    with jax.set_mesh(mesh):
        compiled = step_fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    setup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ time
    times = []
    with jax.set_mesh(mesh):
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            state, m = step_fn(state, batch)
            jax.block_until_ready((state, m))
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    loss = float(m["loss"])
    med = statistics.median(times)

    patches = raw["pixel_values"].shape[1] if args.image else 0
    flops = metrics.model_flops(cfg, B, args.seq, patches)
    total = sum(flops.values())
    peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops_per_device()
    dev = jax.devices()[0]
    print(f"device: {n_dev} x {dev.device_kind} ({dev.platform}); jax {jax.__version__}; mesh {dict(mesh.shape)}")
    print(f"model: {args.preset} {n_params / 1e6:.1f}M params; compute {args.dtype}, params {args.param_dtype}, "
          f"remat {not args.no_remat}; batch {B} x {args.seq} tokens, "
          + (f"one {args.image}px image ({patches} patches) per sample" if args.image else "text only"))
    print(f"setup + compile {setup_s:.1f}s; loss after {args.warmup + args.steps} steps {loss:.4f}")
    if mem is not None:
        gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes) / 2**30
        print(f"compiled step memory per device: {gib:.2f} GiB (arguments + temporaries + outputs - aliased)")
    print(f"step: median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms ({args.steps} steps); "
          f"{B * args.seq / med:,.0f} tokens/s")
    print("model TFLOP per step: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items())
          + f"; total {total / 1e12:.3f} (XLA's count of the compiled program: {xla_flops * n_dev / 1e12:.3f})")
    achieved = total / med / n_dev
    if peak:
        print(f"MFU: {achieved / 1e12:.1f} TFLOP/s per device of a {peak / 1e12:.0f} TFLOP/s peak = {100 * achieved / peak:.1f}%")
    else:
        print(f"achieved {achieved / 1e9:.1f} GFLOP/s per device (peak unknown for {dev.device_kind}: pass --peak-tflops)")


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


if __name__ == "__main__":
    main()
