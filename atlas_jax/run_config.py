"""The run configuration shared by every job (SFT, LA-GRPO, evaluation), and its validation.

Configs in `configs/` start from `base()` and change what they need; command-line overrides
(`--config.optim.lr=1e-4`) are applied by `ml_collections.config_flags`, which rejects unknown
keys. `validate` runs before anything is built or compiled, so a bad field fails in seconds
with a message naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections as mlc

from atlas_jax import sampling
from atlas_jax.benchmarks.protocol import BenchmarkConfig
from atlas_jax.data import pipeline
from atlas_jax.data.image_processing import ImageProcessorConfig
from atlas_jax.data.synthetic import TASKS
from atlas_jax.data.synthetic.family import EVAL_CONDITIONS
from atlas_jax.functional_tokens import DEFAULT_TOKENS
from atlas_jax.model import lora, presets
from atlas_jax.model.config import ATTENTION, DTYPES, ConfigError
from atlas_jax.model.layer_stack import REMAT_POLICIES
from atlas_jax.rl import losses, rewards as rewards_lib

JOBS = ("sft", "la_grpo", "eval", "pipeline", "benchmark", "perceive")


def base() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.job = "sft"
    c.seed = 0
    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
    c.distributed = False  # jax.distributed.initialize() (multi-host): auto-detected on TPU pods / SLURM / k8s,
    c.coordinator_address = ""  # or given here / by JAX_COORDINATOR_ADDRESS ("host:port"),
    c.num_processes = 0  # JAX_NUM_PROCESSES (0 = auto)
    c.process_id = -1  # JAX_PROCESS_ID (-1 = auto)
    c.log_level = "INFO"

    c.model = mlc.ConfigDict()
    c.model.preset = "tiny"  # from-scratch size (see atlas_jax/model/presets.py)
    c.model.init_from_hf = ""  # a Hugging Face Qwen2.5-VL checkpoint directory (overrides preset)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # 'none' | 'full' | 'save_projections' (atlas_jax/model/layer_stack.py)
    c.model.scan_layers = False  # one lax.scan per run of identical layers: compiles once per run
    # Cache-free attention: 'auto' (splash on TPU, cuDNN on GPU in 16-bit, XLA on CPU) | 'xla' |
    # 'splash' | 'cudnn' (atlas_jax/model/attention.py).
    c.model.attention = "auto"
    c.model.functional_tokens = tuple(t.name for t in DEFAULT_TOKENS)
    c.model.visual_ops = mlc.ConfigDict()
    c.model.visual_ops.mode = "module"  # 'module' | 'vocab' (the paper exactly)
    c.model.visual_ops.layer = -1  # -1: the middle decoder layer
    c.model.visual_ops.num_heads = 4
    c.model.visual_ops.head_dim = 32
    c.model.visual_ops.max_positions = 8
    c.model.lora = _section(lora.LoraConfig, ("rank", "alpha", "module_regex", "base_dtype"))  # rank 0 = no adapters

    c.tokenizer = mlc.ConfigDict()
    c.tokenizer.path = ""  # '' = train a byte-level BPE on the synthetic corpus (from-scratch runs)
    c.tokenizer.vocab_size = 1024

    c.data = mlc.ConfigDict()
    c.data.source = "synthetic"  # 'synthetic' | 'jsonl' | 'perception' (pretraining to see, jobs/perceive.py)
    c.data.data_dir = ""  # '' = WORKDIR/data
    c.data.synthetic_config = "tiny"
    c.data.num_per_task = 0  # synthetic training data: 0 = an unlimited stream generated on the fly; N = a stored set of N per task
    c.data.tasks = ()  # the synthetic families trained and evaluated on (names in data.synthetic.TASKS); () = the original eight
    c.data.perception_every = 0  # synthetic SFT on the fly: every N-th training record a perception question, which keeps
    # a perception-pretrained start's reading of the image (SFT on the families alone erases it in ~100 steps); 0 = none
    c.data.image_size = 112
    c.data.jsonl_train = ""
    c.data.jsonl_eval = ""
    c.data.batch_size = 16  # global
    c.data.max_length = 256
    c.data.max_patches = 64
    c.data.max_images = 1
    c.data.sft_target = "trajectory"  # 'trajectory' | 'answer_only' | 'mixed' (per record, data/pipeline.py)
    c.data.answer_only_share = pipeline.PipelineConfig.answer_only_share  # sft_target='mixed': the records trained on their answer-only response
    c.data.skip_bad_records = False
    c.data.pad_to_multiple = 64
    c.data.worker_count = 0

    c.optim = mlc.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1
    c.optim.freeze_vision = False
    c.optim.vision_lr_scale = 1.0  # the vision tower's learning rate relative to optim.lr (a parameter group)

    c.train = mlc.ConfigDict()
    c.train.steps = 300
    c.train.log_every = 10
    c.train.stop_at = 0  # > 0: save and stop at this step (a planned interruption; the schedule still spans `steps`)
    c.train.wandb_project = ""  # '' = no Weights & Biases (TensorBoard and metrics.jsonl always); needs the [wandb] extra
    c.train.profile_steps = ()  # (first, end): a jax.profiler trace of steps first..end-1 in WORKDIR/profile; () = off

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.init_from = ""  # another run's workdir: start from its latest params

    c.rl = mlc.ConfigDict()  # LA-GRPO; train.steps counts rollout batches, optim.* and checkpoint.init_from apply as in SFT
    c.rl.prompts_per_step = 8  # global B; each gets group_size completions
    c.rl.group_size = 4
    c.rl.num_iterations = 1  # mu: updates per rollout batch (old log-probs reused)
    c.rl.scale_rewards = "group"  # group | batch | none
    c.rl.anchor_share = True  # also measure the anchor term's share of the parameter gradient
    c.rl.micro_batch = 0  # rollouts per forward / backward pass of the update (gradients summed exactly); 0 = all at once
    c.rl.sample = _section(sampling.SamplingConfig, ROLLOUT_SAMPLING)
    c.rl.loss = _section(losses.GRPOLossConfig, tuple(f.name for f in dataclasses.fields(losses.GRPOLossConfig)
                                                      if f.name != "max_completion_length"))  # that one is rl.sample's
    c.rl.rewards = mlc.ConfigDict(dict(accuracy=1.0, functional_usage=0.2, format=0.2, verbosity=0.5, spam=0.5, expected_usage=0.0, overlong=0.0))
    # A user's reward functions, "package.module:function=weight" each (ConfigDict keys cannot hold
    # dots or colons, so they are not rl.rewards keys); imported and signature-checked by validate.
    c.rl.custom_rewards = ()
    c.rl.reward_errors = "raise"  # a reward that raises / returns non-finite: raise (stop, naming it) | zero (score 0, counted)
    c.rl.overlong_buffer = 16  # DAPO soft overlong reward `overlong`: linear from 0 at max_new_tokens - buffer to -penalty
    c.rl.overlong_penalty = 1.0
    c.rl.mask_truncated = False  # completions that hit max_new_tokens without a stop token contribute no loss
    c.rl.filter_groups = "none"  # DAPO dynamic sampling: drop groups whose reward | accuracy is all equal (none = keep all)
    c.rl.max_extra_rounds = 2  # filter_groups: at most this many extra rollout rounds to refill the batch

    c.eval = mlc.ConfigDict()
    c.eval.split = "in_distribution"  # what the trainers evaluate (eval.every, the end); synthetic: one of EVAL_CONDITIONS
    c.eval.conditions = EVAL_CONDITIONS  # the recipe's results: every checkpoint on each (synthetic data)
    c.eval.num_per_task = 16  # prompts per task of each evaluated split (synthetic: generated, apart from data.num_per_task)
    # {condition: N}: a split's own prompts per task in place of num_per_task (e.g. a larger headline split)
    c.eval.num_per_task_by_condition = mlc.ConfigDict()
    c.eval.image_swap = True  # also score each prompt with another sample's image (same batch, rotated by one)
    # > 0: the image-swap control scores only the first this many of each task's prompts (it has to show the
    # fall toward the prior, not resolve small differences); 0 = every evaluated prompt
    c.eval.image_swap_num_per_task = 0
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 96
    c.eval.heatmaps = 4  # samples whose visual-op attention is saved as PNG heat maps
    c.eval.every = 0  # > 0: also evaluate every this many steps (SFT steps / LA-GRPO rollout batches); 0 = only at the end

    # The benchmark job: V* / WeMath / BLINK files and the authors' protocol (atlas_jax/benchmarks/protocol.py).
    c.benchmark = _section(BenchmarkConfig, tuple(f.name for f in dataclasses.fields(BenchmarkConfig)))
    return c


ROLLOUT_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p")  # the user's part of SamplingConfig


def _section(cls, fields: tuple[str, ...]) -> mlc.ConfigDict:
    """A config section holding `fields` of the dataclass `cls` with its defaults (their one home)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return mlc.ConfigDict({name: defaults[name] for name in fields})


def loss_config(c: mlc.ConfigDict) -> losses.GRPOLossConfig:
    """`rl.loss` as the loss's dataclass (dr_grpo's length normaliser is the sampled length)."""
    return _build(losses.GRPOLossConfig, c.rl.loss, "rl.loss", max_completion_length=c.rl.sample.max_new_tokens)


def rollout_sampling(c: mlc.ConfigDict, tokens, **fields) -> sampling.SamplingConfig:
    """`rl.sample` as the sampler's dataclass, with the run's stop / pad ids (`tokenizer.RunTokens`)."""
    return _build(sampling.SamplingConfig, c.rl.sample, "rl.sample", stop_ids=tokens.stop_ids, pad_id=tokens.pad_id, **fields)


def _build(cls, section: mlc.ConfigDict, where: str, **fields):
    """cls(**section, **fields); its range checks' ValueError becomes a ConfigError naming the field."""
    try:
        return cls(**section.to_dict(), **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{where}.{e}") from None


def synthetic_suite(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The tiny-model, built-in-suite settings the CPU configs share (SFT and LA-GRPO budgets)."""
    c.data.synthetic_config = "small"
    c.data.num_per_task = 0  # unlimited, on the fly
    c.data.image_size = 112
    c.data.batch_size = 16
    c.data.max_length = 192
    c.data.max_patches = 64
    c.train.steps = 300
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.checkpoint.every = 100
    c.rl.prompts_per_step = 8
    c.rl.group_size = 8
    c.rl.sample.max_new_tokens = 80
    # The policy is scored by its greedy decode, and RL improves what it samples: at temperature 1
    # it mostly sharpens the samples toward that decode (sampled accuracy 0.43 -> 0.49, greedy
    # level); at 0.5 a group's completions differ where the model is unsure of what it reads, and
    # the reward picks the reading (bench/RESULTS.md, "RL at a lower sampling temperature").
    c.rl.sample.temperature = 0.5
    c.rl.filter_groups = "reward"  # at 0.5 a third of the groups agree: refill the batch with ones that teach
    return c


def synthetic_rl_stage(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The synthetic suite's LA-GRPO budget, on top of `synthetic_suite` (the recipe's second stage
    and `configs/la_grpo_synthetic.py`)."""
    c.train.steps = 120  # rollout batches
    # Scored on 2048 in-distribution prompts, seed 0's RL - SFT is +0.009 at 2e-4, +0.026 at 5e-4 and
    # -0.013 at 1e-3 (bench/RESULTS.md, "RL on 2048 prompts").
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 5
    return c


def _need(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: expected {expected}")


def eval_num_per_task(c: mlc.ConfigDict, split: str) -> int:
    """Prompts per task evaluated on `split`: its `eval.num_per_task_by_condition` entry, else `eval.num_per_task`."""
    return c.eval.num_per_task_by_condition.get(split, c.eval.num_per_task)


def mesh_size(mesh, num_devices: int) -> tuple[int, int, int]:
    shape = list(mesh)
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = num_devices // known
    return tuple(shape)


def stage(c: mlc.ConfigDict, job: str, **overrides) -> mlc.ConfigDict:
    """The config of one stage of the recipe (job 'pipeline'): `c` with job=`job`, the stage's own
    settings from `c.stages.<job>` (a partial config tree, e.g. `stages.la_grpo.optim.lr`) and
    `overrides` (dotted keys) applied, and without `stages`."""
    flat = dict(_dotted(c.stages[job])) if "stages" in c and job in c.stages else {}
    out = apply_overrides(c, {"job": job, **flat, **overrides}, where=f"config.stages.{job}")
    with out.unlocked():
        if "stages" in out:
            del out["stages"]
    return out


def _dotted(section: mlc.ConfigDict, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, mlc.ConfigDict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def validate(c: mlc.ConfigDict, num_devices: int, *, paths: bool = True) -> None:
    """Raises ConfigError naming the first bad field (for the recipe: of any stage). Needs no built
    object (no data, tokenizer or model), so it runs in well under a second, before any work.
    paths=False skips the checks that the files it names exist (the compile check reads none)."""
    if c.job == "pipeline":
        for job in ("sft", "la_grpo"):
            validate(stage(c, job), num_devices, paths=paths)
    _need(c.job in JOBS, "job", c.job, f"one of {JOBS}")
    _need(isinstance(c.seed, int) and c.seed >= 0, "seed", c.seed, "an integer >= 0")
    batch_shards = _check_mesh(c, num_devices)
    _check_model(c.model)
    _check_lora(c)
    _check_data(c)
    _check_training(c, batch_shards)
    _check_rl(c.rl, batch_shards if c.job == "la_grpo" else 1)  # an SFT run's slice need not divide its rollouts
    e = c.eval
    _need(e.batch_size > 0 and e.batch_size % batch_shards == 0, "eval.batch_size", e.batch_size,
          f"a positive multiple of data*fsdp={batch_shards}")
    _need(e.every >= 0 and e.num_per_task >= 0 and e.heatmaps >= 0, "eval.every", e.every,
          ">= 0 (and eval.num_per_task, eval.heatmaps >= 0)")
    _need(e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, ">= 1")
    _need(isinstance(e.image_swap_num_per_task, int) and e.image_swap_num_per_task >= 0, "eval.image_swap_num_per_task",
          e.image_swap_num_per_task, "an integer >= 0 (0 = every evaluated prompt)")
    for split, n in e.num_per_task_by_condition.items():
        _need(isinstance(n, int) and n >= 1, f"eval.num_per_task_by_condition.{split}", n, "an integer >= 1")
    if c.data.source == "synthetic":
        _need(e.split in EVAL_CONDITIONS, "eval.split", e.split, f"one of {EVAL_CONDITIONS} (the synthetic suite's evaluation conditions)")
        _need(len(e.conditions) > 0 and set(e.conditions) <= set(EVAL_CONDITIONS), "eval.conditions", e.conditions,
              f"some of {EVAL_CONDITIONS}")
        unknown = sorted(set(e.num_per_task_by_condition) - set(EVAL_CONDITIONS))
        _need(not unknown, "eval.num_per_task_by_condition", unknown, f"keys among {EVAL_CONDITIONS}")
    if c.job == "pipeline":
        _need(e.num_per_task >= 1, "eval.num_per_task", e.num_per_task, ">= 1 (the recipe evaluates every condition)")
    if c.job == "benchmark":
        _check_benchmark(c.benchmark, batch_shards, paths)
    if paths:
        _check_paths(c)


def _check_mesh(c: mlc.ConfigDict, num_devices: int) -> int:
    """Checks the mesh; returns the number of batch shards (data * fsdp)."""
    ok = len(c.mesh) == 3 and list(c.mesh).count(-1) <= 1 and all(isinstance(s, int) and (s >= 1 or s == -1) for s in c.mesh)
    _need(ok, "mesh", c.mesh, "(data, fsdp, tensor) sizes >= 1, at most one of them -1")
    data, fsdp, tensor = mesh_size(c.mesh, num_devices)
    _need(data * fsdp * tensor == num_devices, "mesh", c.mesh, f"sizes whose product is the {num_devices} devices")
    return data * fsdp


def _check_model(m: mlc.ConfigDict) -> None:
    _need(m.init_from_hf != "" or m.preset in presets.PRESETS, "model.preset", m.preset, f"one of {sorted(presets.PRESETS)}")
    _need(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {sorted(DTYPES)}")
    _need(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {sorted(DTYPES)}")
    _need(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"one of {sorted(REMAT_POLICIES)}")
    _need(m.attention in ("auto", *ATTENTION), "model.attention", m.attention, f"'auto' or one of {list(ATTENTION)}")
    names = {tok.name for tok in DEFAULT_TOKENS}
    _need(all(n in names for n in m.functional_tokens), "model.functional_tokens", m.functional_tokens, f"names from {sorted(names)}")
    v = m.visual_ops
    _need(v.mode in ("module", "vocab"), "model.visual_ops.mode", v.mode, "'module' or 'vocab'")
    for field in ("num_heads", "head_dim", "max_positions"):
        _need(v[field] >= 1, f"model.visual_ops.{field}", v[field], ">= 1")
    if not m.init_from_hf:  # a checkpoint's depth is only known once its config.json is read
        layers = presets.get(m.preset).text.num_layers
        _need(-1 <= v.layer < layers, "model.visual_ops.layer", v.layer, f"-1 (the middle) or a decoder layer 0..{layers - 1}")


def _check_lora(c: mlc.ConfigDict) -> None:
    """`model.lora` builds its dataclass (whose checks name the field)."""
    lora_config(c)


def lora_config(c: mlc.ConfigDict) -> lora.LoraConfig:
    """`model.lora` as the adapters' dataclass."""
    return _build(lora.LoraConfig, c.model.lora, "model.lora")


def _check_data(c: mlc.ConfigDict) -> None:
    """`data` builds its dataclass (whose range checks name the field); the checks here are the
    ones a `PipelineConfig` cannot make: the source, and the image size against the task suite."""
    pipeline_config(c, fmt="sft", batch_size=1)  # data.batch_size is checked against the mesh (_check_training)
    d = c.data
    _need(d.source in ("synthetic", "jsonl", "perception"), "data.source", d.source, "'synthetic', 'jsonl' or 'perception'")
    _need(d.max_images >= 1, "data.max_images", d.max_images, ">= 1")
    unknown = [t for t in d.tasks if t not in TASKS]
    _need(not unknown and len(set(d.tasks)) == len(d.tasks), "data.tasks", d.tasks,
          f"distinct names among {list(TASKS)} (() = the original eight)")
    _need(not d.tasks or (d.source == "synthetic" and not d.num_per_task), "data.tasks", d.tasks,
          "() unless data.source='synthetic' is generated on the fly (data.num_per_task=0; a stored set holds every family)")
    smallest = max(TASKS[t].min_image_size for t in (d.tasks or TASKS)) if d.source == "synthetic" else 28
    _need(d.image_size % 28 == 0 and d.image_size >= smallest, "data.image_size", d.image_size,
          f"a multiple of 28, >= {smallest}" + (" (the synthetic tasks' smallest legible size)" if d.source == "synthetic" else ""))
    _need((d.image_size // 14) ** 2 <= d.max_patches * d.max_images, "data.max_patches", d.max_patches,
          f">= the {(d.image_size // 14) ** 2} patches of one {d.image_size}px image")
    _need(d.num_per_task >= 0, "data.num_per_task", d.num_per_task, ">= 0 (0 = generated on the fly)")
    _need(d.perception_every == 0 or (d.perception_every > 0 and c.job == "sft" and d.source == "synthetic" and not d.num_per_task),
          "data.perception_every", d.perception_every,
          "0, or > 0 in an SFT job on synthetic data generated on the fly (data.num_per_task=0)")


def pipeline_config(c: mlc.ConfigDict, image: ImageProcessorConfig | None = None, *, fmt: str, batch_size: int | None = None,
                    shuffle: bool = True, num_epochs: int | None = None, seed_offset: int = 0) -> pipeline.PipelineConfig:
    """`data` as the input pipeline's dataclass, for batches in `fmt` of `batch_size` (default
    data.batch_size); image: the vision tower's preprocessing (default: the dataclass's)."""
    d = c.data
    fields = dict(image=image) if image is not None else {}
    try:
        return pipeline.PipelineConfig(
            batch_size=batch_size or d.batch_size, max_length=d.max_length, max_patches=d.max_patches,
            max_images=d.max_images, seed=c.seed + seed_offset, shuffle=shuffle, num_epochs=num_epochs,
            skip_bad_records=d.skip_bad_records, worker_count=d.worker_count, pad_to_multiple=d.pad_to_multiple,
            format=fmt, sft_target=d.sft_target, answer_only_share=d.answer_only_share, **fields,
        )
    except ConfigError as e:
        raise ConfigError(f"config.{e}") from None


def _check_training(c: mlc.ConfigDict, batch_shards: int) -> None:
    """optim.*, train.*, checkpoint.* (sections without a dataclass of their own) and data.batch_size."""
    o, t, d = c.optim, c.train, c.data
    if c.job == "la_grpo":  # its batches are rl.prompts_per_step prompts (checked in _check_rl)
        batch_shards = 1
    _need(d.batch_size > 0 and d.batch_size % batch_shards == 0, "data.batch_size", d.batch_size,
          f"a positive multiple of the batch-sharding mesh axes data*fsdp={batch_shards}")
    _need(o.grad_accum > 0 and d.batch_size % o.grad_accum == 0 and (d.batch_size // o.grad_accum) % batch_shards == 0,
          "optim.grad_accum", o.grad_accum, f"a divisor of data.batch_size={d.batch_size} leaving micro-batches divisible by {batch_shards}")
    _need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "a finite number > 0")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a finite number >= 0")
    _need(math.isfinite(o.vision_lr_scale) and o.vision_lr_scale > 0, "optim.vision_lr_scale", o.vision_lr_scale,
          "a finite number > 0 (freeze the tower with optim.freeze_vision)")
    _need(0 <= o.b1 < 1, "optim.b1", o.b1, "in [0, 1)")
    _need(0 <= o.b2 < 1, "optim.b2", o.b2, "in [0, 1)")
    _need(math.isfinite(o.clip_norm) and o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 = no clipping)")
    _need(t.steps >= 0, "train.steps", t.steps, ">= 0")
    _need(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _need(t.stop_at >= 0, "train.stop_at", t.stop_at, ">= 0 (0 = never)")
    p = tuple(t.profile_steps)
    _need(p == () or (len(p) == 2 and 1 <= p[0] < p[1]), "train.profile_steps", t.profile_steps,
          "() (off) or (first, end) with 1 <= first < end: the steps first..end-1 are traced")
    _need(c.checkpoint.every > 0, "checkpoint.every", c.checkpoint.every, "> 0")
    _need(c.checkpoint.keep > 0, "checkpoint.keep", c.checkpoint.keep, "> 0")


def _check_rl(r: mlc.ConfigDict, batch_shards: int) -> None:
    _need(r.group_size >= 2, "rl.group_size", r.group_size, ">= 2 completions per prompt (advantages compare them)")
    _need(r.prompts_per_step > 0 and r.prompts_per_step % batch_shards == 0,
          "rl.prompts_per_step", r.prompts_per_step, f"a positive multiple of data*fsdp={batch_shards}")
    _need(r.scale_rewards in losses.SCALE_REWARDS, "rl.scale_rewards", r.scale_rewards, " | ".join(losses.SCALE_REWARDS))
    _need(r.num_iterations >= 1, "rl.num_iterations", r.num_iterations, ">= 1")
    rollouts = r.prompts_per_step * r.group_size
    _need(r.micro_batch == 0 or (r.micro_batch > 0 and rollouts % r.micro_batch == 0 and r.micro_batch % batch_shards == 0),
          "rl.micro_batch", r.micro_batch, f"0 (all rollouts at once) or a divisor of rl.prompts_per_step * rl.group_size = "
          f"{rollouts} that is a multiple of data*fsdp={batch_shards} (every micro-batch spans every batch shard)")
    _build(sampling.SamplingConfig, r.sample, "rl.sample")
    _build(losses.GRPOLossConfig, r.loss, "rl.loss", max_completion_length=r.sample.max_new_tokens)
    known = ("accuracy", "functional_usage", "expected_usage", "format", "verbosity", "spam", "overlong")
    _need(set(r.rewards.keys()) <= set(known), "rl.rewards", dict(r.rewards), f"weights for {', '.join(known)}")
    for name, weight in r.rewards.items():
        _need(isinstance(weight, (int, float)) and math.isfinite(weight), f"rl.rewards.{name}", weight, "a finite number")
    _need(isinstance(r.custom_rewards, (tuple, list)), "rl.custom_rewards", r.custom_rewards,
          'a tuple of "package.module:function=weight" strings')
    for i, spec in enumerate(r.custom_rewards):
        try:
            rewards_lib.load_reward(spec)
        except ValueError as e:
            raise ConfigError(f"config.rl.custom_rewards[{i}]={e}") from None
    _need(r.reward_errors in ("raise", "zero"), "rl.reward_errors", r.reward_errors, "raise | zero")
    longest = r.sample.max_new_tokens if r.rewards.get("overlong") else math.inf  # bounded only when the reward is on
    _need(0 < r.overlong_buffer <= longest, "rl.overlong_buffer", r.overlong_buffer,
          f"in [1, rl.sample.max_new_tokens={r.sample.max_new_tokens}]")
    _need(r.overlong_penalty >= 0, "rl.overlong_penalty", r.overlong_penalty, ">= 0")
    _need(r.filter_groups in ("none", "reward", "accuracy"), "rl.filter_groups", r.filter_groups, "none | reward | accuracy")
    _need(r.max_extra_rounds >= 0, "rl.max_extra_rounds", r.max_extra_rounds, ">= 0")


def _check_benchmark(b: mlc.ConfigDict, batch_shards: int, paths: bool) -> None:
    """benchmark.*: the protocol's ranges (`BenchmarkConfig`), the batch against the mesh and, with
    `paths`, the benchmark files and the judge (imported and signature-checked here, before any work)."""
    _build(BenchmarkConfig, b, "benchmark")
    _need(b.batch_size % batch_shards == 0, "benchmark.batch_size", b.batch_size, f"a multiple of data*fsdp={batch_shards}")
    if paths:
        from atlas_jax.benchmarks import grading  # imports math_verify: only for this job

        for field in ("vstar", "wemath", "blink"):
            _need(not b[field] or os.path.exists(b[field]), f"benchmark.{field}", b[field], "an existing file or directory")
        if b.judge:
            grading.load_judge(b.judge)


def _check_paths(c: mlc.ConfigDict) -> None:
    """Every path the run reads exists (checked before any work, not discovered as a traceback)."""
    if c.model.init_from_hf:
        _need(os.path.isfile(os.path.join(c.model.init_from_hf, "config.json")), "model.init_from_hf", c.model.init_from_hf,
              "a Hugging Face checkpoint directory holding config.json")
    if c.tokenizer.path:
        _need(os.path.exists(c.tokenizer.path), "tokenizer.path", c.tokenizer.path, "an existing tokenizer directory or file")
    if c.checkpoint.init_from:
        _need(os.path.isdir(c.checkpoint.init_from), "checkpoint.init_from", c.checkpoint.init_from, "an existing run directory")
    if c.data.source == "jsonl":
        _need(bool(c.data.jsonl_train), "data.jsonl_train", c.data.jsonl_train, "a JSONL path when data.source='jsonl'")
        for field in ("jsonl_train", "jsonl_eval"):
            path = c.data[field]
            _need(not path or os.path.isfile(path), f"data.{field}", path, "an existing JSONL file")


def apply_overrides(c: mlc.ConfigDict, overrides: Mapping[str, Any], *, where: str = "override") -> mlc.ConfigDict:
    """A copy of `c` with dotted-key overrides applied; an unknown key or a wrong type is a
    ConfigError naming the key (and `where` it came from)."""
    c = copy.deepcopy(c)
    for key, value in overrides.items():
        node, leaf = lookup(c, key, where=where)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: key {key!r} = {value!r}: {e}") from None
    return c


def lookup(c: mlc.ConfigDict, key: str, *, where: str) -> tuple[mlc.ConfigDict, str]:
    """(section, field name) of the dotted `key` in `c`; a ConfigError naming the key (and the
    closest field) when `c` has no such field."""
    node, *parents, leaf = [c, *key.split(".")]
    for depth, part in enumerate(parents):
        if part not in node or not isinstance(node[part], mlc.ConfigDict):
            raise ConfigError(f"{where}: unknown key {key!r}: {_no_field(node, part, '.'.join(parents[:depth]))}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"{where}: unknown key {key!r}: {_no_field(node, leaf, '.'.join(parents))}")
    if isinstance(node[leaf], mlc.ConfigDict):
        raise ConfigError(f"{where}: key {key!r} is a config section, not a field; override its fields ({sorted(node[leaf].keys())})")
    return node, leaf


def _no_field(node: mlc.ConfigDict, name: str, section: str) -> str:
    fields = sorted(node.keys())
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{('config.' + section) if section else 'the config'} has no field {name!r} (fields: {', '.join(fields)}){hint}"
