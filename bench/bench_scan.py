"""Layers unrolled vs under a scan (`model.scan_layers`): compile time and step time, side by side.

The SFT job's compiled step (`train.sft.make_train_step`: forward, loss, backward, AdamW) is
built twice in one process, once per form, over the same weights and batch; steps alternate
between the two programs so both see the same machine load. Run from the repository root:

    python bench/bench_scan.py --preset tiny --batch 8 --seq 256            # ~2 min on 2 cores
    python bench/bench_scan.py --preset small_100m --batch 4 --seq 256 --remat full

Prints each form's compile seconds, median step time, the loss after the steps (equal up to
float rounding) and the scan / unrolled ratios.
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
    ap.add_argument("--preset", default="tiny", help="atlas_jax.model.presets name")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--image", type=int, default=112, help="image side in px, one per sample (0: text only)")
    ap.add_argument("--remat", default="full", help="model.remat policy")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import jax
    from flax import nnx

    from atlas_jax import sharding
    from atlas_jax.data import device_batch, pipeline
    from atlas_jax.model import presets, vlm
    from atlas_jax.train import optimizer, sft, train_state
    from bench_train_step import make_batch

    V = presets.get(args.preset).text.vocab_size
    ids = dict(image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2, vision_end_token_id=V - 1)
    mesh = sharding.make_mesh((-1, 1, 1))
    raw = make_batch(presets.get(args.preset, **ids), args.batch, args.seq, args.image)
    host = {"input_ids": raw["input_ids"], "positions": raw["positions"],
            "attention_mask": np.ones((args.batch, args.seq), bool), "loss_mask": np.ones((args.batch, args.seq), bool),
            "functional_mask": np.zeros((args.batch, args.seq), bool)}
    if args.image:
        host["pixel_values"] = raw["pixel_values"].astype(np.float32)
        host.update({k: raw[k] for k in device_batch.LAYOUT_KEYS})
    batch = pipeline.to_global(host, mesh)

    forms = {}
    for name, scan in (("unrolled", False), ("scan", True)):
        cfg = presets.get(args.preset, remat=args.remat, scan_layers=scan, **ids)
        model = vlm.create(cfg, mesh, seed=0)
        tx = optimizer.make_optimizer(nnx.state(model, nnx.Param), lr=1e-4, warmup_steps=1, total_steps=100)
        graphdef, state, state_sh = train_state.create(model, tx, mesh)
        step_fn = sft.make_train_step(graphdef, tx, state_sharding=state_sh,
                                      batch_sharding={k: v.sharding for k, v in batch.items()})
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step_fn.lower(state, batch).compile()
        forms[name] = dict(compiled=compiled, state=state, compile_s=time.perf_counter() - t0, times=[])

    with jax.set_mesh(mesh):
        for i in range(args.steps + 1):
            for f in forms.values():
                t = time.perf_counter()
                f["state"], m = f["compiled"](f["state"], batch)
                jax.block_until_ready(m)
                if i:  # the first call of each is a warm-up
                    f["times"].append(time.perf_counter() - t)
                f["loss"] = float(m["loss"])

    print(f"{args.preset}: batch {args.batch} x {args.seq} tokens, image {args.image}px, remat {args.remat!r}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}")
    for name, f in forms.items():
        print(f"  {name:9s} compile {f['compile_s']:6.1f} s   step median {statistics.median(f['times']) * 1e3:8.1f} ms"
              f"   loss after {args.steps + 1} steps {f['loss']:.5f}")
    u, s = forms["unrolled"], forms["scan"]
    print(f"  scan / unrolled: compile {s['compile_s'] / u['compile_s']:.2f}x, "
          f"step {statistics.median(s['times']) / statistics.median(u['times']):.2f}x")


if __name__ == "__main__":
    main()
