"""What a frozen vision tower and LoRA save in the compiled training steps.

`--mode freeze`: the SFT step (`train.sft.make_train_step`) with `optim.freeze_vision` off and on
(`optimizer.trainable`: the step differentiates only the non-vision parameters, so the tower's
backward is neither computed nor stored), on a batch where the tower is a large share of the
work (big images, short text). Prints XLA's FLOP count, the compiled memory per device and the
median step time of each, and the ratios.

`--mode lora`: per-device memory (`memory_analysis()`, compile only) of the SFT step and the
LA-GRPO step (beta > 0) without and with LoRA (`model.lora`: adapters on the decoder's
projections; without LoRA the LA-GRPO reference is a second copy of the weights, with it the
policy with its adapters off). Run from the repository root:

    python bench/bench_frozen_lora.py --mode freeze --preset tiny --batch 8 --seq 96 --image 448
    python bench/bench_frozen_lora.py --mode lora --preset small_100m --batch 8 --seq 512 --image 224
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
    ap.add_argument("--mode", choices=("freeze", "lora"), required=True)
    ap.add_argument("--preset", default="tiny", help="atlas_jax.model.presets name")
    ap.add_argument("--batch", type=int, default=8, help="global sequences (LA-GRPO: rollouts) per step")
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--image", type=int, default=448, help="image side in px, one per sample")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (--mode lora)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from atlas_jax import sharding
    from atlas_jax.model import presets

    V = presets.get(args.preset).text.vocab_size
    cfg = presets.get(args.preset, image_token_id=V - 4, video_token_id=V - 3, vision_start_token_id=V - 2,
                      vision_end_token_id=V - 1)
    mesh = sharding.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    print(f"{args.preset}; mesh {dict(mesh.shape)} of {jax.devices()[0].platform}; batch {args.batch} x {args.seq} "
          f"tokens, one {args.image}px image each")
    if args.mode == "freeze":
        freeze(cfg, mesh, args)
    else:
        lora_memory(cfg, mesh, args)


def _sft_batch(cfg, mesh, args):
    from atlas_jax.data import device_batch, pipeline
    from bench_train_step import make_batch

    raw = make_batch(cfg, args.batch, args.seq, args.image)
    B, T = args.batch, args.seq
    host = {"input_ids": raw["input_ids"], "positions": raw["positions"], "attention_mask": np.ones((B, T), bool),
            "loss_mask": np.ones((B, T), bool), "functional_mask": np.zeros((B, T), bool),
            "pixel_values": raw["pixel_values"].astype(np.float32), **{k: raw[k] for k in device_batch.LAYOUT_KEYS}}
    return pipeline.to_global(host, mesh)


def _gib(mem) -> float:
    """Arguments + temporaries + outputs - aliased (donated) bytes, in GiB."""
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30


def freeze(cfg, mesh, args) -> None:
    import jax
    from flax import nnx

    from atlas_jax.model import vlm
    from atlas_jax.train import optimizer, sft, train_state

    batch = _sft_batch(cfg, mesh, args)
    rows = {}
    for frozen in (False, True):
        model = vlm.create(cfg, mesh)
        train = optimizer.trainable(freeze_vision=frozen)
        tx = optimizer.make_optimizer(nnx.state(model), lr=1e-4, warmup_steps=0, total_steps=100, train=train)
        graphdef, state, state_sh = train_state.create(model, tx, mesh)
        del model
        step = sft.make_train_step(graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()},
                                   train=train)
        with jax.set_mesh(mesh):
            compiled = step.lower(state, batch).compile()
            times = []
            for i in range(args.steps + 1):
                t = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t)
        mem = compiled.memory_analysis()
        rows[frozen] = (compiled.cost_analysis()["flops"], _gib(mem), mem.temp_size_in_bytes / 2**30, statistics.median(times[1:]))
        print(f"freeze_vision={frozen}: XLA GFLOP/device {rows[frozen][0] / 1e9:.2f}; memory {rows[frozen][1]:.3f} GiB "
              f"(temporaries {rows[frozen][2]:.3f}); step median {rows[frozen][3] * 1e3:.0f} ms")
    (f0, m0, t0, s0), (f1, m1, t1, s1) = rows[False], rows[True]
    print(f"frozen / trained tower: FLOPs {f1 / f0:.2f}, memory {m1 / m0:.2f}, temporaries {t1 / t0:.2f}, step time {s1 / s0:.2f}")


def _rl_batch(cfg, mesh, args, group_size=4, completion=32):
    """`args.batch` rollouts of `args.batch // group_size` prompts; the last `completion` tokens are completions."""
    from atlas_jax.data import device_batch, pipeline
    from bench_train_step import make_batch

    B, R, T = args.batch // group_size, args.batch, args.seq
    raw = make_batch(cfg, B, T, args.image)
    rep = lambda x: np.repeat(x, group_size, axis=0)  # noqa: E731
    host = {"input_ids": rep(raw["input_ids"]), "positions": rep(raw["positions"]), "attention_mask": np.ones((R, T), bool),
            "completion_mask": np.ones((R, completion), bool), "old_logprobs": np.full((R, completion), -3.0, np.float32),
            "rewards": np.linspace(0, 1, R, dtype=np.float32),
            "pixel_values": raw["pixel_values"].astype(np.float32), **{k: raw[k] for k in device_batch.LAYOUT_KEYS}}
    return pipeline.to_global(host, mesh), group_size


def lora_memory(cfg, mesh, args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atlas_jax.model import lora, vlm
    from atlas_jax.rl import losses
    from atlas_jax.train import la_grpo, optimizer, sft, train_state

    sft_batch = _sft_batch(cfg, mesh, args)
    rl_batch, G = _rl_batch(cfg, mesh, args)
    lc = losses.GRPOLossConfig(beta=0.04)
    for rank in (0, args.rank):
        model = vlm.create(cfg, mesh)
        if rank:
            with jax.set_mesh(mesh):
                model = lora.apply(model, lora.LoraConfig(rank=rank), seed=0)
        train = optimizer.trainable(freeze_vision=False, adapters_only=rank > 0)
        tx = optimizer.make_optimizer(nnx.state(model), lr=1e-4, warmup_steps=0, total_steps=100, train=train)
        graphdef, state, state_sh = train_state.create(model, tx, mesh)
        del model
        sft_step = sft.make_train_step(graphdef, tx, state_sharding=state_sh,
                                       batch_sharding={k: v.sharding for k, v in sft_batch.items()}, train=train)
        ref, ref_sh = (None, None) if rank else (jax.tree.map(jnp.copy, state.params), state_sh.params)
        rl_step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, state_sharding=state_sh, ref_sharding=ref_sh,
                                       batch_sharding={k: v.sharding for k, v in rl_batch.items()}, train=train,
                                       reference_adapters_off=rank > 0)
        with jax.set_mesh(mesh):
            sft_mem = sft_step.lower(state, sft_batch).compile().memory_analysis()
            rl_mem = rl_step.lower(state, ref, rl_batch).compile().memory_analysis()
        print(f"lora rank {rank}: SFT {_gib(sft_mem):.3f} GiB per device (arguments {sft_mem.argument_size_in_bytes / 2**30:.3f}); "
              f"LA-GRPO (beta {lc.beta}) {_gib(rl_mem):.3f} GiB (arguments {rl_mem.argument_size_in_bytes / 2**30:.3f})")


if __name__ == "__main__":
    main()
