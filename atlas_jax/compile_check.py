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
no step-time estimate. Exit status: 0 all fit, 1 a program does not fit, 2 a bad topology or
config (one line on stderr, no traceback).
"""

from __future__ import annotations

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
from atlas_jax.train import la_grpo, optimizer, sft, train_state

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
class Program:
    """name; lower: () -> jax Lowered; model_flops: the model's FLOPs per call (0: not estimated)."""

    name: str
    lower: Callable
    model_flops: float = 0.0


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
        "answer": "", "task": "", "uid": "placeholder",
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


# ---------------------------------------------------------------------------- programs
def _frozen_vision_factor(c) -> float:
    """A frozen tower runs forward only: 1/3 of its training FLOPs."""
    return 1 / 3 if c.optim.freeze_vision else 1.0


def sft_programs(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh) -> list[Program]:
    graphdef, tx, schedule, state, state_sh = abstract_state(c, model_cfg, mesh, total_steps=c.train.steps)
    batch = abstract_batch(c, model_cfg, mesh, fmt="sft", batch_size=c.data.batch_size)
    step = sft.make_train_step(
        graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()},
        grad_accum=c.optim.grad_accum, lr_schedule=schedule, train=builders.trainable(c),
    )
    B, T = batch["input_ids"].shape
    f = metrics.model_flops(model_cfg, B, T, batch["pixel_values"].shape[1])
    train_flops = f["decoder"] + f["lm_head"] + f["vision"] * _frozen_vision_factor(c)
    programs = [Program("train_step", _lowering(mesh, step, state, batch), train_flops)]
    if c.eval.num_per_task > 0:
        prompts = abstract_batch(c, model_cfg, mesh, fmt="rl", batch_size=c.eval.batch_size)
        scfg = sampling.SamplingConfig(max_new_tokens=c.eval.max_new_tokens, greedy=True, stop_ids=(0, 1),
                                       return_op_attention=model_cfg.visual_ops.enabled and c.eval.heatmaps > 0)
        programs.append(Program("eval_sampler", _sampler(graphdef, state.params, prompts, None, scfg, mesh)))
    return programs


def la_grpo_programs(c: mlc.ConfigDict, model_cfg: ModelConfig, mesh) -> list[Program]:
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
    )
    R, L = rollouts["input_ids"].shape
    f = metrics.model_flops(model_cfg, R, L, prompts["pixel_values"].shape[1])
    update = f["decoder"] + f["lm_head"] + f["vision"] * _frozen_vision_factor(c)
    update += sum(f.values()) / 3 if loss_cfg.beta > 0 else 0.0  # the reference forward
    return [Program("sampler", lower_sampler), Program("update_step", _lowering(mesh, step, state, ref_params, rollouts), update)]


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


def analyse(program: Program, chip: Chip, chips: int, param_shapes, logits_dims) -> dict:
    t0 = time.perf_counter()
    compiled = program.lower().compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    est_s = float(cost.get("optimal_seconds", -1.0))
    if est_s <= 0:  # the cost model gave up on some op: the roofline of XLA's counts instead
        est_s = max(flops / chip.peak, float(cost.get("bytes accessed", 0.0)) / chip.bandwidth)
    hlo = compiled.as_text()
    loops = repeated_loops(hlo)
    est_s = est_s if program.model_flops and not loops else 0.0
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
        "repeated_loops": loops,
        "collectives": collectives(hlo, param_shapes, logits_dims),
    }


def advice(row: dict, c: mlc.ConfigDict) -> str:
    over = (row["total_bytes"] - row["hbm_bytes"]) / GiB
    knobs = "a smaller per-chip batch (data.batch_size, or a larger optim.grad_accum)"
    if c.job == "la_grpo":
        knobs = "fewer rollouts per chip (rl.prompts_per_step, rl.group_size) or a shorter rl.max_new_tokens"
    remat = "" if c.model.remat == "full" else ", model.remat='full'"
    mesh = "" if tuple(c.mesh) == (1, -1, 1) else ", or a mesh that shards more (mesh=(1, -1, 1): all fsdp)"
    return (f"{row['name']} does not fit: {row['total_bytes'] / GiB:.2f} GiB per chip > {row['hbm_bytes'] / GiB:.2f} GiB HBM "
            f"(over by {over:.2f} GiB); try {knobs}{remat}{mesh}")


def check(c: mlc.ConfigDict, topology: str, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Compiles the job's programs for `topology`; one `analyse` row per program.
    Raises CompileCheckError (bad topology or config) with a one-line message."""
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
        rows.append(analyse(p, chip, len(devices), param_shapes, logits_dims))
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
    lines.append("(per chip; est s / est MFU: XLA's cost-model estimate, not a measurement; '-' for a program "
                 "with repeated loops (scanned layers, micro-batches, output-head chunks), whose bodies XLA "
                 "counts once)")
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


def run(c: mlc.ConfigDict, topology: str, *, json_path: str = "") -> int:
    """The command: prints the table (and advice for what does not fit), writes `json_path`;
    returns the exit status (0 all fit, 1 something does not fit, 2 bad topology or config)."""
    try:
        rows = check(c, topology, log=lambda s: print(s, flush=True))
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
    flags.mark_flags_as_required(["config", "topology"])
    FLAGS = flags.FLAGS
    app.run(lambda argv: sys.exit(run(FLAGS.config, FLAGS.topology, json_path=FLAGS.json)))
