"""Compile every program a job runs for a TPU slice, on this machine, before the slice is rented.

    python -m atlas_jax.compile_check --config=configs/sft_qwen25vl_7b.py --topology=v5p:2x2x4 \\
        [--config.data.batch_size=64 ...] [--json=/tmp/sft_v5p.json]

Needs libtpu (`pip install -e '.[tpu]'`), not a TPU: XLA compiles for the compile-only devices of
the named topology (`jax.experimental.topologies`; libtpu's warnings about TPU_* variables are
harmless). Nothing real is read: the model's shapes come from the config's preset
(`builders.shape_model_config`), the batches' from the pipeline's own `collate` of a placeholder
record, the training state's from `train_state.create` under `jax.eval_shape`, the rollout
batch's from the sampler's outputs; no weights, checkpoint, dataset or tokenizer. The programs are
the job's own, built by its own functions, after `run_config.validate`:

  sft      train_step (`train.sft.make_train_step`), eval_sampler (the greedy evaluation sampler)
  la_grpo  sampler (prefill + decode loop: one program), update_step (`train.la_grpo.make_rl_step`;
           with rl.beta > 0 the reference model's log-prob forward runs inside it)

Per program: compile time, per-chip memory from XLA's buffer assignment (arguments + outputs +
temporaries - aliased, against the chip's HBM), XLA's FLOPs and cost-model step time (where
the cost model cannot time an op, the roofline max(FLOPs / peak, bytes accessed / HBM
bandwidth) of XLA's counts), the model's FLOPs and the MFU that step time implies (an
estimate, not a measurement), and the collectives of the compiled HLO. A sampler's cost counts one pass of its decode loop, so it has
no step-time estimate.

XLA's cost analysis counts a while loop's body once. A training program with loops (scanned
layers, accumulated micro-batches, the output head's chunks, the partitioner's windowed einsums)
is therefore also compiled loop-free at small depths (`LoopFree`: layers unrolled at 1 and 2 of
each kind, one micro-batch, the head in one chunk, fsdp matmuls whole) and XLA's costs are
extrapolated linearly in the layer counts to the real depth, times the micro-batches
(`--noestimate` skips these extra compiles). XLA sees the Pallas attention kernels as opaque
calls: their FLOPs are charged at the chip's peak on top. Exit status: 0 all fit, 1 a program does not fit, 2 a bad topology or
config (one line on stderr, no traceback).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax import builders, metrics, run_config, sampling, sharding as shd
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import batching
from atlas_jax.model import lora, presets, rope, vision_layout
from atlas_jax.model.config import ConfigError, ModelConfig
from atlas_jax.train import la_grpo, optimizer, sft, token_logprobs, train_state

GiB = 2**30


class CompileCheckError(ValueError):
    """A topology or config the check cannot compile for; the message is one actionable line."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """chip_config: the topology's chip configuration (v4 runs its two cores as one device);
    hbm: bytes per chip; peak: dense bf16 FLOP/s per chip; bandwidth: HBM bytes/s per chip."""

    chip_config: str
    hbm: int
    peak: float
    bandwidth: float


# Compile-only devices expose no memory stats, hence the table.
CHIPS = {
    "v4": Chip("megacore", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("default", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("default", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("default", 32 * GiB, 918e12, 1640e9),
}


@dataclasses.dataclass
class LoopFree:
    """A program's loop-free versions, for XLA's cost model, which counts a while loop's body once.

    lowerings[i]: () -> jax Lowered of the same program with layers unrolled (`scan_layers=False`)
    at the layer counts design[i] (`LAYER_COUNTS`), one micro-batch (no accumulation loop) and the
    output head over the whole sequence at once (the step builders' `head_chunk`: the same FLOPs
    in one trip of `token_logprobs`' chunk loop; only the variants' memory is not the job's),
    compiled with whole matmuls (`WHOLE_EINSUMS`); counts: the real model's layer counts; passes:
    the real step's micro-batches (its XLA costs are `passes` times a variant's: the optimizer
    update, which runs once per step, is counted `passes` times)."""

    design: list[tuple[int, ...]]
    lowerings: list[Callable]
    counts: tuple[int, ...]
    passes: int = 1


@dataclasses.dataclass
class Program:
    """name; lower: () -> jax Lowered; model_flops: the model's FLOPs per call (0: not estimated);
    kernel_flops: of those, the attention FLOPs that run in Pallas kernels, which XLA's cost model
    does not see into; loop_free: how to estimate a program with repeated loops (None: none)."""

    name: str
    lower: Callable
    model_flops: float = 0.0
    kernel_flops: float = 0.0
    loop_free: LoopFree | None = None


# ---------------------------------------------------------------------------- topology
def topology_devices(topology: str) -> tuple[list, Chip]:
    """The compile-only devices of e.g. 'v5e:4x8' or 'v5p:2x2x4', and their chip's figures."""
    generation, _, dims = topology.partition(":")
    if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", dims):
        raise CompileCheckError(
            f"unknown topology {topology!r}: expected GENERATION:DIMS with GENERATION one of {sorted(CHIPS)} "
            "and DIMS like 4x8 or 2x2x4 (e.g. v5e:4x8, v5p:2x4x4)"
        )
    sizes = [int(d) for d in dims.split("x")]
    per_host = (min(sizes[0], 2), min(sizes[1], 2), 1)
    from jax.experimental import topologies

    # Compile-only devices touch no TPU, so several checks (and test runs) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=CHIPS[generation].chip_config,
            chips_per_host_bounds=per_host, num_slices=1,
        )
    except Exception as e:  # libtpu missing, or a shape it rejects: both end the check
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileCheckError(f"topology {topology!r}: {first} (is libtpu installed? pip install -e '.[tpu]')") from None
    return list(desc.devices), CHIPS[generation]


# ---------------------------------------------------------------------------- abstract inputs
def placeholder_tokens(c: mlc.ConfigDict, vocab_size: int) -> tokenizer_lib.RunTokens:
    """Token ids inside a `vocab_size` vocabulary, the functional tokens in its last rows: ids
    change values, never shapes."""
    names = tuple(c.model.functional_tokens)
    return tokenizer_lib.RunTokens(
        functional=tuple(zip(names, range(vocab_size - len(names), vocab_size))), stop_ids=(0, 1), pad_id=0,
        image_id=1, video_id=2, vision_start_id=3, vision_end_id=4,
    )


def shape_model_config(c: mlc.ConfigDict, mesh) -> ModelConfig:
    """`builders.model_config` without a tokenizer: the preset's vocabulary, or the from-scratch
    tokenizer's largest (BPE + control + functional tokens) when that is larger."""
    scratch = c.tokenizer.vocab_size + len(tokenizer_lib.QWEN_SPECIAL_TOKENS) + len(c.model.functional_tokens)
    vocab = max(presets.get(c.model.preset).text.vocab_size, scratch)
    return builders.model_config(c, placeholder_tokens(c, vocab), vocab, mesh)


def _placeholder_example(model_cfg: ModelConfig, max_patches: int) -> dict:
    """One text-only record as `ExampleBuilder.build` returns it (collate pads it to full size)."""
    ids = np.zeros((1,), np.int32)
    return {
        "input_ids": ids,
        "loss_mask": np.ones((1,), bool),
        "functional_mask": np.zeros((1,), bool),
        "positions": rope.mrope_positions(
            ids, [], image_token_id=model_cfg.image_token_id, spatial_merge_size=model_cfg.vision.spatial_merge_size
        ),
        "prompt_len": 1,
        "pixel_values": np.zeros((0, model_cfg.vision.patch_dim), np.float32),
        "grid_thw": np.zeros((0, 3), np.int32),
        **vision_layout.vision_layout([], model_cfg.vision, max_patches),
        "answer": "", "task": "", "uid": "placeholder", "ops": (),
    }


def abstract_batch(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh, *, fmt: str, batch_size: int) -> dict:
    """The device arrays of a global pipeline batch as sharded ShapeDtypeStructs (full length:
    every sequence padded to data.max_length, the largest shape the job compiles)."""
    pcfg = builders.make_pipeline_config(c, model_cfg, fmt=fmt, batch_size=batch_size)
    one = batching.collate(
        [_placeholder_example(model_cfg, pcfg.max_patches)], fmt=fmt, pad_id=0, max_length=pcfg.max_length,
        pad_to_multiple=0, max_patches=pcfg.max_patches, max_images=pcfg.max_images, patch_dim=pcfg.image.patch_dim,
    )
    arrays = {k: v for k, v in one.items() if isinstance(v, np.ndarray)}
    return {k: _sharded((batch_size, *x.shape[1:]), x.dtype, mesh) for k, x in arrays.items()}


def _sharded(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    """A batch-first array's abstract value, batch axis over the mesh's batch axes."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=shd.batch_sharding(mesh, len(shape)))


def _replicated(x, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))


def abstract_state(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh, *, total_steps: int):
    """(graphdef, tx, lr schedule, sharded abstract TrainState, its shardings): the job's
    optimizer over the model's abstract parameters (with `model.lora`'s adapters), and
    `train_state.create`'s state for them."""
    lora_cfg = run_config.lora_config(c)
    model = lora.abstract(model_cfg, lora_cfg) if lora_cfg.enabled else builders.make_abstract_model(model_cfg)
    graphdef, params = nnx.split(model)
    tx, schedule = optimizer.from_config(params, c.optim, total_steps=total_steps, train=builders.trainable(c))
    return (graphdef, tx, schedule, *train_state.abstract_create(params, tx, mesh))


def _abstract(tree, mesh):
    """Concrete leaves (scalars, keys, stop ids) as replicated ShapeDtypeStructs: lowering for
    compile-only devices takes no host arrays."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else _replicated(x, mesh), tree)


def _sampler(graphdef, params, prompts: dict, rng, scfg: sampling.SamplingConfig, mesh) -> Callable:
    """The `lower` of the sampler program for these (abstract) inputs."""
    args, static = sampling.program_arguments(graphdef, params, prompts, rng, scfg)
    return _lowering(mesh, sampling._generate_jit, *_abstract(args, mesh), **static)


def _lowering(mesh, jitted, /, *args, **kw) -> Callable:
    """() -> jitted.lower(*args, **kw) under the mesh (only lowering may see compile-only devices)."""

    @functools.cache  # the LA-GRPO check reads the sampler's output shapes before compiling it
    def lower():
        with jax.set_mesh(mesh):
            return jitted.lower(*args, **kw)

    return lower


# ---------------------------------------------------------------------------- loop-free variants
LAYER_COUNTS = ("decoder layers", "vision window-attention blocks", "vision full-attention blocks")


def layer_counts(m: ModelConfig) -> tuple[int, int, int]:
    full = len(m.vision.fullatt_block_indexes)
    return m.text.num_layers, m.vision.depth - full, full


def at_depth(m: ModelConfig, counts: tuple[int, ...]) -> ModelConfig:
    """`m` with its layers unrolled at these `LAYER_COUNTS`: the vision window blocks first, then
    the full-attention ones; the visual operations after the first decoder layer (their cost does
    not depend on where they run)."""
    layers, window, full = counts
    return dataclasses.replace(
        m, scan_layers=False, text=dataclasses.replace(m.text, num_layers=layers),
        vision=dataclasses.replace(m.vision, depth=window + full, fullatt_block_indexes=tuple(range(window, window + full))),
        visual_ops=dataclasses.replace(m.visual_ops, layer=0),
    )


def depth_design(counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The layer counts to compile at: a base of at most one layer of each kind, then for each
    kind the model has more of, the base with one more of it (one compile per unknown)."""
    base = tuple(min(n, 1) for n in counts)
    return [base] + [tuple(b + (j == i) for j, b in enumerate(base)) for i, n in enumerate(counts) if n > base[i]]


def extrapolate(design: list[tuple[int, ...]], figures, counts: tuple[int, ...]) -> np.ndarray:
    """figures[i]: costs measured at design[i]; the costs at `counts` of the linear model
    a + sum_k b_k * count_k (a: everything outside the layers) through those points."""
    kinds = [k for k in range(len(counts)) if any(d[k] != design[0][k] for d in design)]
    X = np.array([[1.0] + [d[k] for k in kinds] for d in design])
    return np.array([1.0] + [counts[k] for k in kinds]) @ np.linalg.solve(X, np.asarray(figures, np.float64))


def _loop_free(build: Callable[[ModelConfig], Callable], model_cfg: ModelConfig, passes: int) -> LoopFree:
    """build(model config) -> lower of one micro-batch's program for that model."""
    counts = layer_counts(model_cfg)
    design = depth_design(counts)
    return LoopFree(design, [lambda d=d: build(at_depth(model_cfg, d))() for d in design], counts, passes)


# ---------------------------------------------------------------------------- programs
def _frozen_vision_factor(c) -> float:
    """A frozen tower runs forward only: 1/3 of its training FLOPs."""
    return 1 / 3 if c.optim.freeze_vision else 1.0


def attention_flops(model_cfg: ModelConfig, batch: int, seq: int, patches: int, vision_factor: float) -> float:
    """The scores-and-values part of `metrics.model_flops` (decoder + vision x vision_factor):
    the FLOPs that run inside the attention kernels."""
    t, v = model_cfg.text, model_cfg.vision
    decoder = t.num_layers * 2 * batch * seq * seq * t.num_heads * t.head_dim
    window = min(patches, (v.window_size // v.patch_size) ** 2)
    full = len(v.fullatt_block_indexes)
    vision = 2 * batch * patches * v.hidden_size * (full * patches + (v.depth - full) * window)
    return 6.0 * (decoder + vision * vision_factor)


def _kernel_flops(model_cfg: ModelConfig, *args) -> float:
    return attention_flops(model_cfg, *args) if model_cfg.attention == "splash" else 0.0


def _sft_step(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh, *,
              head_in_one_chunk: bool = False) -> tuple[Callable, tuple[int, int, int], nnx.GraphDef, nnx.State]:
    """(lower of the job's train step, its batch's (B, T, patches), the model's graphdef and
    abstract parameters). head_in_one_chunk: the loss applies the output head to the whole
    sequence at once (a cost variant's, `LoopFree`), not `token_logprobs.CHUNK` positions at a time."""
    graphdef, tx, schedule, state, state_sh = abstract_state(c, model_cfg, mesh, total_steps=c.train.steps)
    batch = abstract_batch(c, model_cfg, mesh, fmt="sft", batch_size=c.data.batch_size)
    step = sft.make_train_step(
        graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()},
        grad_accum=c.optim.grad_accum, lr_schedule=schedule, train=builders.trainable(c),
        head_chunk=batch["input_ids"].shape[1] if head_in_one_chunk else token_logprobs.CHUNK,
    )
    return _lowering(mesh, step, state, batch), (*batch["input_ids"].shape, batch["pixel_values"].shape[1]), graphdef, state.params


def sft_programs(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh) -> list[Program]:
    lower, (B, T, patches), graphdef, params = _sft_step(c, model_cfg, mesh)
    f = metrics.model_flops(model_cfg, B, T, patches)
    train_flops = f["decoder"] + f["lm_head"] + f["vision"] * _frozen_vision_factor(c)
    kernel = _kernel_flops(model_cfg, B, T, patches, _frozen_vision_factor(c))
    one_pass = copy.deepcopy(c)
    one_pass.optim.grad_accum = 1
    one_pass.data.batch_size = c.data.batch_size // c.optim.grad_accum
    loop_free = _loop_free(lambda m: _sft_step(one_pass, m, mesh, head_in_one_chunk=True)[0], model_cfg, c.optim.grad_accum)
    programs = [Program("train_step", lower, train_flops, kernel, loop_free)]
    if c.eval.num_per_task > 0:
        prompts = abstract_batch(c, model_cfg, mesh, fmt="rl", batch_size=c.eval.batch_size)
        scfg = sampling.SamplingConfig(max_new_tokens=c.eval.max_new_tokens, greedy=True, stop_ids=(0, 1),
                                       return_op_attention=model_cfg.visual_ops.enabled and c.eval.heatmaps > 0)
        programs.append(Program("eval_sampler", _sampler(graphdef, params, prompts, None, scfg, mesh)))
    return programs


def _rl_programs(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh, *,
                 head_in_one_chunk: bool = False) -> tuple[Callable, Callable, float, float]:
    """(lower of the sampler, lower of the update step, the update's model FLOPs, its FLOPs in
    attention kernels). head_in_one_chunk: as `_sft_step`'s, for the update's log-probs."""
    from atlas_jax.jobs import la_grpo as job  # the job's own rollout-batch builder

    r = c.rl
    graphdef, tx, _, state, state_sh = abstract_state(c, model_cfg, mesh, total_steps=c.train.steps * r.num_iterations)
    prompts = abstract_batch(c, model_cfg, mesh, fmt="rl", batch_size=r.prompts_per_step)
    tokens = placeholder_tokens(c, model_cfg.text.vocab_size)
    scfg = run_config.rollout_sampling(c, tokens, num_samples=r.group_size)
    rng = jax.random.PRNGKey(0)
    lower_sampler = _sampler(graphdef, state.params, prompts, rng, scfg, mesh)
    out = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), lower_sampler().out_info)
    rewards = jax.ShapeDtypeStruct((out["tokens"].shape[0],), jnp.float32)
    rollouts = jax.eval_shape(job._rollout_batch, out, prompts, rewards)
    rollouts = {k: _sharded(v.shape, v.dtype, mesh) for k, v in rollouts.items()}

    loss_cfg = run_config.loss_config(c)
    adapters_off = run_config.lora_config(c).enabled  # the reference is the policy with its adapters off
    ref_params, ref_sh = (state.params, state_sh.params) if loss_cfg.beta > 0 and not adapters_off else (None, None)
    step = la_grpo.make_rl_step(
        graphdef, tx, loss_cfg, group_size=r.group_size, temperature=scfg.temperature, scale_rewards=r.scale_rewards,
        functional_ids=tokens.functional_ids, anchor_share=r.anchor_share, micro_batch=r.micro_batch,
        state_sharding=state_sh, ref_sharding=ref_sh, batch_sharding={k: v.sharding for k, v in rollouts.items()},
        train=builders.trainable(c), reference_adapters_off=adapters_off,
        head_chunk=rollouts["input_ids"].shape[1] if head_in_one_chunk else token_logprobs.CHUNK,
    )
    R, L = rollouts["input_ids"].shape
    patches = prompts["pixel_values"].shape[1]
    f = metrics.model_flops(model_cfg, R, L, patches)
    update = f["decoder"] + f["lm_head"] + f["vision"] * _frozen_vision_factor(c)
    kernel = _kernel_flops(model_cfg, R, L, patches, _frozen_vision_factor(c))
    if loss_cfg.beta > 0:  # the reference forward
        update += sum(f.values()) / 3
        kernel += _kernel_flops(model_cfg, R, L, patches, 1.0) / 3
    return lower_sampler, _lowering(mesh, step, state, ref_params, rollouts), update, kernel


def la_grpo_programs(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh) -> list[Program]:
    lower_sampler, lower_update, update, kernel = _rl_programs(c, model_cfg, mesh)
    rollouts = c.rl.prompts_per_step * c.rl.group_size
    micro = c.rl.micro_batch or rollouts
    loop_free = None
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    # One pass: the prompts of one micro-batch's whole groups, which the variant's sampler must be
    # able to shard (e.g. 8 prompts on 32 fsdp chips cannot: no estimate, rather than an error).
    if micro % c.rl.group_size == 0 and (micro // c.rl.group_size) % batch_shards == 0:
        one_pass = copy.deepcopy(c)
        one_pass.rl.prompts_per_step = micro // c.rl.group_size
        loop_free = _loop_free(lambda m: _rl_programs(one_pass, m, mesh, head_in_one_chunk=True)[1], model_cfg, rollouts // micro)
    return [Program("sampler", lower_sampler), Program("update_step", lower_update, update, kernel, loop_free)]


# ---------------------------------------------------------------------------- analysis
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape_text)]


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    size = {"pred": 1, "s4": 1, "u4": 1}.get(dtype) or max(int(re.sub(r"\D", "", dtype) or 8) // 8, 1)
    return size * math.prod(dims)


def collectives(hlo: str, param_shapes: set[tuple[int, ...]], logits_dims: tuple[int, int]) -> dict:
    """Counts and per-chip result bytes of each collective in the compiled HLO (each op once, also
    inside loops), and the all-gathers whose result is a whole parameter or a [.., T, V] tensor."""
    summary: dict = {}
    flagged = []
    for m in _COLLECTIVE.finditer(hlo):
        op = m.group("op")
        # An async start's tuple holds (operand, result, ...): the largest array is the result.
        dt, dims = max(_arrays(m.group("shape")), key=lambda a: _nbytes(*a), default=("u8", ()))
        entry = summary.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _nbytes(dt, dims)
        if op == "all-gather" and (dims in param_shapes or set(logits_dims) <= set(dims)):
            flagged.append({"shape": list(dims), "dtype": dt, "whole": "logits" if set(logits_dims) <= set(dims) else "parameter"})
    summary["flagged_all_gathers"] = flagged
    return summary


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def repeated_loops(hlo: str) -> int:
    """While loops that run more than once (or an unknown number of times). XLA's cost analysis
    counts a loop body once, so with any of them its FLOPs and step time cover part of the step."""
    return hlo.count(" while(") - sum(1 for n in _TRIP_COUNT.findall(hlo) if int(n) <= 1)


def xla_cost(compiled, chip: Chip) -> np.ndarray:
    """[FLOPs, bytes accessed, step seconds] per chip from XLA's cost analysis; the seconds are its
    cost model's, or where that gave up on some op, the roofline of its counts."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    seconds = float(cost.get("optimal_seconds", -1.0))
    if seconds <= 0:
        seconds = max(flops / chip.peak, nbytes / chip.bandwidth)
    return np.array([flops, nbytes, seconds])


# The SPMD partitioner turns an fsdp matmul into a "windowed einsum" loop (one weight shard per trip,
# overlapping the gather with the matmul), whose body the cost model would count once: the cost
# variants compile their matmuls whole (the same FLOPs) instead.
WHOLE_EINSUMS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def loop_free_cost(loop_free: LoopFree, chip: Chip, log: Callable[[str], None] = lambda s: None) -> dict:
    """XLA's costs of the whole step, extrapolated from its loop-free variants' (`LoopFree`):
    {"flops", "bytes", "xla_s", "design", "compile_s"}; raises CompileCheckError when a variant
    still has a repeated loop (its costs would be partial) or XLA refuses it for the chip's HBM
    (the output head over a whole micro-batch's sequences at once can need more than the job)."""
    figures, compile_s = [], 0.0
    for counts, lower in zip(loop_free.design, loop_free.lowerings):
        t0 = time.perf_counter()
        try:
            compiled = lower().compile(compiler_options=WHOLE_EINSUMS)
        except jax.errors.JaxRuntimeError as e:
            if (m := _OUT_OF_HBM.search(str(e))) is None:
                raise
            raise CompileCheckError(f"the cost estimate's variant at layer counts {counts} does not fit the chip: "
                                    f"{m.group(1)}{m.group(2)} of temporaries (a smaller rl.micro_batch / per-chip batch)") from None
        compile_s += time.perf_counter() - t0
        if loops := repeated_loops(compiled.as_text()):
            raise CompileCheckError(f"the cost estimate's variant at layer counts {counts} still has {loops} repeated loop(s)")
        figures.append(xla_cost(compiled, chip))
        log(f"  cost variant {dict(zip(LAYER_COUNTS, counts))}: {figures[-1][0] / 1e12:.3f} TFLOP, "
            f"{figures[-1][2] * 1e3:.1f} ms (XLA), {time.perf_counter() - t0:.0f} s")
    flops, nbytes, seconds = loop_free.passes * extrapolate(loop_free.design, figures, loop_free.counts)
    return {"flops": flops, "bytes": nbytes, "xla_s": seconds, "design": loop_free.design, "compile_s": compile_s}


_OUT_OF_HBM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM")


def _out_of_memory_row(program: Program, chip: Chip, error: str, compile_s: float) -> dict | None:
    """The row of a program XLA refused to compile for the chip's HBM (its temporaries alone
    exceed it; the error names no other figure); None for any other error."""
    m = _OUT_OF_HBM.search(error)
    if m is None:
        return None
    temp = int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))
    return {
        "name": program.name, "fits": False, "headroom": 1 - temp / chip.hbm, "total_bytes": temp,
        "hbm_bytes": chip.hbm, "memory": {"argument": 0, "output": 0, "temp": temp, "alias": 0},
        "out_of_memory": True, "compile_s": compile_s, "flops": 0.0, "model_flops": program.model_flops,
        "est_step_s": None, "est_mfu": None, "estimate": None, "repeated_loops": 0,
        "collectives": {"flagged_all_gathers": []},
    }


def analyse(program: Program, chip: Chip, chips: int, param_shapes, logits_dims, *,
            estimate: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """One program's row. estimate: for a program with repeated loops, compile its loop-free
    variants (`LoopFree`) for a step-time estimate (False: none, '-')."""
    t0 = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if (row := _out_of_memory_row(program, chip, str(e), time.perf_counter() - t0)) is None:
            raise
        return row
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    flops, nbytes, xla_s = xla_cost(compiled, chip)
    hlo = compiled.as_text()
    loops = repeated_loops(hlo)
    est = None
    if program.model_flops and not loops:
        est = {"flops": flops, "bytes": nbytes, "xla_s": xla_s, "method": "XLA cost model"}
    elif program.model_flops and program.loop_free is not None and estimate:
        try:
            est = loop_free_cost(program.loop_free, chip, log)
        except CompileCheckError as e:  # no estimate, the memory figures still stand
            log(f"  no step-time estimate: {e}")
    if est is not None and "method" not in est:
        est["method"] = (f"XLA cost model of {len(est['design'])} loop-free compiles at layer counts "
                         f"{est.pop('design')} ({', '.join(LAYER_COUNTS)}), extrapolated linearly to "
                         f"{program.loop_free.counts} x {program.loop_free.passes} micro-batch(es)")
    est_s = 0.0
    if est is not None:
        # XLA sees a Pallas kernel as an opaque call: its FLOPs are charged at the chip's peak.
        est["kernel_s"] = program.kernel_flops / chips / chip.peak
        est_s = est["xla_s"] + est["kernel_s"]
    return {
        "name": program.name,
        "fits": total <= chip.hbm,
        "headroom": 1 - total / chip.hbm,
        "total_bytes": total,
        "hbm_bytes": chip.hbm,
        "memory": parts,
        "compile_s": compile_s,
        "flops": flops,
        "model_flops": program.model_flops,
        "est_step_s": est_s or None,
        "est_mfu": program.model_flops / (est_s * chip.peak * chips) if est_s > 0 else None,
        "estimate": est,
        "repeated_loops": loops,
        "collectives": collectives(hlo, param_shapes, logits_dims),
    }


def advice(row: dict, c: mlc.ConfigDict) -> str:
    over = (row["total_bytes"] - row["hbm_bytes"]) / GiB
    knobs = "a smaller per-chip batch (data.batch_size, or a larger optim.grad_accum)"
    if c.job == "la_grpo":
        knobs = "fewer rollouts per chip (rl.prompts_per_step, rl.group_size) or a shorter rl.max_new_tokens"
        if row["name"] == "update_step":
            # Micro-batches bound the update's activations without changing its result (the
            # gradients are summed exactly), so they come first; the anchor's grad-share
            # diagnostic is a second backward pass (bench/RESULTS.md: ~5 GiB per chip on v4-32).
            rollouts = c.rl.prompts_per_step * c.rl.group_size
            knobs = (f"a smaller rl.micro_batch (rollouts per forward/backward pass, now {c.rl.micro_batch or rollouts}; "
                     f"the step's result does not change), {knobs}"
                     + (", or rl.anchor_share=False (drops the anchor's gradient-share diagnostic)" if c.rl.anchor_share else ""))
    remat = "" if c.model.remat == "full" else ", model.remat='full'"
    mesh = "" if tuple(c.mesh) == (1, -1, 1) else ", or a mesh that shards more (mesh=(1, -1, 1): all fsdp)"
    need = "its temporaries alone (XLA refused to compile it)" if row.get("out_of_memory") else "per chip"
    return (f"{row['name']} does not fit: {row['total_bytes'] / GiB:.2f} GiB {need} > {row['hbm_bytes'] / GiB:.2f} GiB HBM "
            f"(over by {over:.2f} GiB); try {knobs}{remat}{mesh}")


def check(c: mlc.ConfigDict, topology: str, log: Callable[[str], None] = lambda s: None, *, estimate: bool = True) -> list[dict]:
    """Compiles the job's programs for `topology`; one `analyse` row per program (estimate: as
    there). Raises CompileCheckError (bad topology or config) with a one-line message."""
    devices, chip = topology_devices(topology)
    if c.job not in ("sft", "la_grpo"):
        raise CompileCheckError(f"config.job={c.job!r}: the compile check covers the 'sft' and 'la_grpo' jobs")
    try:
        run_config.validate(c, len(devices), paths=False)
        mesh = builders.make_mesh(c, devices)
        model_cfg = shape_model_config(c, mesh)
    except (ConfigError, ValueError) as e:
        raise CompileCheckError(f"config does not fit topology {topology} ({len(devices)} chips): {e}") from None
    log(f"topology {topology}: {len(devices)} x {devices[0].device_kind}, {chip.hbm / GiB:.0f} GiB HBM per chip; mesh {dict(mesh.shape)}")
    programs = sft_programs(c, model_cfg, mesh) if c.job == "sft" else la_grpo_programs(c, model_cfg, mesh)
    _, params = nnx.split(builders.make_abstract_model(model_cfg))
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if len(x.shape) >= 2}
    logits_dims = (c.data.max_length - 1, model_cfg.text.vocab_size)
    rows = []
    for p in programs:
        log(f"compiling {p.name} ...")
        rows.append(analyse(p, chip, len(devices), param_shapes, logits_dims, estimate=estimate, log=log))
        r = rows[-1]
        log(f"  {r['compile_s']:.0f} s; {r['total_bytes'] / GiB:.2f} GiB per chip of {r['hbm_bytes'] / GiB:.0f} GiB "
            f"({100 * r['headroom']:.1f}% free)")
    return rows


# ---------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = f"{'program':14s} {'compile':>8s} {'args':>8s} {'out':>8s} {'temp':>8s} {'alias':>8s} {'total':>9s} {'HBM':>7s} {'headroom':>8s} {'XLA TFLOP':>10s} {'est s':>8s} {'est MFU':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["memory"]
        g = lambda b: f"{b / GiB:7.2f}G"  # noqa: E731
        est = f"{r['est_step_s']:8.3f}" if r["est_step_s"] else f"{'-':>8s}"
        mfu = f"{100 * r['est_mfu']:7.1f}%" if r["est_mfu"] else f"{'-':>8s}"
        lines.append(
            f"{r['name']:14s} {r['compile_s']:7.1f}s {g(m['argument'])} {g(m['output'])} {g(m['temp'])} {g(m['alias'])} "
            f"{g(r['total_bytes']):>9s} {r['hbm_bytes'] / GiB:6.1f}G {100 * r['headroom']:7.1f}% {r['flops'] / 1e12:10.3f} {est} {mfu}"
        )
    lines.append("(per chip; XLA TFLOP: the compiled program's count, a loop's body once; est s / est MFU: XLA's "
                 "cost-model estimate, not a measurement, with the attention kernels' FLOPs at peak; '-': no "
                 "model FLOPs, or repeated loops without --estimate)")
    for r in rows:
        if r["estimate"] is not None:
            e = r["estimate"]
            lines.append(f"{r['name']} estimate: {e['method']}: {e['flops'] / 1e12:.3f} TFLOP, {e['bytes'] / GiB:.1f} GiB "
                         f"accessed, {e['xla_s']:.3f} s + attention kernels {e['kernel_s']:.3f} s")
    for r in rows:
        col = r["collectives"]
        parts = [f"{op} {v['count']} ({v['bytes'] / GiB:.2f} GiB)" for op, v in col.items() if op != "flagged_all_gathers"]
        lines.append(f"{r['name']} collectives: {', '.join(parts) or 'none'}")
        kinds = {}
        for f in col["flagged_all_gathers"]:
            kinds[f["whole"]] = kinds.get(f["whole"], 0) + 1
        if kinds:
            lines.append(f"  all-gathers of a whole tensor: {kinds}"
                         + (" (fsdp gathers each weight before its matmul: expected)" if set(kinds) == {"parameter"} else ""))
    return "\n".join(lines)


def run(c: mlc.ConfigDict, topology: str, *, json_path: str = "", estimate: bool = True) -> int:
    """The command: prints the table (and advice for what does not fit), writes `json_path`;
    returns the exit status (0 all fit, 1 something does not fit, 2 bad topology or config)."""
    try:
        rows = check(c, topology, log=lambda s: print(s, flush=True), estimate=estimate)
    except CompileCheckError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"topology": topology, "config": c.job, "programs": rows}, f, indent=2)
    bad = [r for r in rows if not r["fits"]]
    for r in bad:
        print(f"compile_check: {advice(r, c)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/ (optionally file.py:arg).", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x8, v5p:2x2x4, v4:2x2x4, v6e:4x4.")
    flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
    flags.DEFINE_bool("estimate", True, "For a program with loops (scanned layers, micro-batches), compile its "
                      "loop-free variants at small depths for the step-time / MFU estimate.")
    flags.mark_flags_as_required(["config", "topology"])
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(run(FLAGS.config, FLAGS.topology, json_path=FLAGS.json, estimate=FLAGS.estimate)))
