"""The run configuration shared by every job (SFT, LA-GRPO, evaluation), and its validation.

Configs in `configs/` start from `base()` and change what they need; command-line overrides
(`--config.optim.lr=1e-4`) are applied by `ml_collections.config_flags`, which rejects unknown
keys. `validate` runs before anything is built or compiled, so a bad field fails in seconds
with a message naming it.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections as mlc

from atlas_jax.functional_tokens import DEFAULT_TOKENS
from atlas_jax.model import presets
from atlas_jax.model.config import ConfigError

JOBS = ("sft", "la_grpo", "eval", "pipeline")


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
    c.model.remat = False
    c.model.functional_tokens = tuple(t.name for t in DEFAULT_TOKENS)
    c.model.visual_ops = mlc.ConfigDict()
    c.model.visual_ops.mode = "module"  # 'module' | 'vocab' (the paper exactly)
    c.model.visual_ops.layer = -1  # -1: the middle decoder layer
    c.model.visual_ops.num_heads = 4
    c.model.visual_ops.head_dim = 32
    c.model.visual_ops.max_positions = 8

    c.tokenizer = mlc.ConfigDict()
    c.tokenizer.path = ""  # '' = train a byte-level BPE on the synthetic corpus (from-scratch runs)
    c.tokenizer.vocab_size = 1024

    c.data = mlc.ConfigDict()
    c.data.source = "synthetic"  # 'synthetic' | 'jsonl'
    c.data.data_dir = ""  # '' = WORKDIR/data
    c.data.synthetic_config = "tiny"
    c.data.num_per_task = 0  # 0 = the synthetic config's default
    c.data.image_size = 112
    c.data.jsonl_train = ""
    c.data.jsonl_eval = ""
    c.data.batch_size = 16  # global
    c.data.max_length = 256
    c.data.max_patches = 64
    c.data.max_images = 1
    c.data.sft_target = "trajectory"  # 'trajectory' | 'answer_only'
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

    c.train = mlc.ConfigDict()
    c.train.steps = 300
    c.train.log_every = 10
    c.train.stop_at = 0  # > 0: save and stop at this step (a planned interruption; the schedule still spans `steps`)

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.init_from = ""  # another run's workdir: start from its latest params

    c.rl = mlc.ConfigDict()
    c.rl.init_from = ""  # an SFT run's workdir: start (and the reference policy) from its latest params
    c.rl.steps = 20  # rollout batches
    c.rl.prompts_per_step = 8  # global B; each gets group_size completions
    c.rl.group_size = 4
    c.rl.num_iterations = 1  # mu: updates per rollout batch (old log-probs reused)
    c.rl.max_new_tokens = 96
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.top_k = 0
    c.rl.loss_type = "grpo"  # grpo | bnpo | dapo | dr_grpo
    c.rl.epsilon_low = 0.2
    c.rl.epsilon_high = 0.28
    c.rl.beta = 0.0  # KL weight; 0 skips the reference model
    c.rl.alpha = 0.1  # LA-GRPO anchor weight; 0 = plain GRPO
    c.rl.scale_rewards = "group"
    c.rl.lr = 1e-4
    c.rl.warmup_steps = 2
    c.rl.anchor_share = True
    c.rl.eval_every = 0  # 0 = only at the end
    c.rl.rewards = mlc.ConfigDict(dict(accuracy=1.0, functional_usage=0.2, format=0.2, verbosity=0.5, spam=0.5))

    c.eval = mlc.ConfigDict()
    c.eval.split = "validation"
    c.eval.num_per_task = 16
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 96
    c.eval.heatmaps = 4  # samples whose visual-op attention is saved as PNG heat maps
    c.eval.every = 0  # 0 = only at the end of training
    return c


def synthetic_suite(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The tiny-model, built-in-suite settings the CPU configs share (SFT and LA-GRPO budgets)."""
    c.data.synthetic_config = "small"
    c.data.num_per_task = 64
    c.data.image_size = 112
    c.data.batch_size = 16
    c.data.max_length = 192
    c.data.max_patches = 64
    c.train.steps = 300
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.checkpoint.every = 100
    c.rl.steps = 20
    c.rl.prompts_per_step = 8
    c.rl.group_size = 4
    c.rl.max_new_tokens = 80
    c.rl.lr = 5e-5
    return c


def _need(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: expected {expected}")


def mesh_size(mesh, num_devices: int) -> tuple[int, int, int]:
    shape = list(mesh)
    if -1 in shape:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        shape[shape.index(-1)] = num_devices // known
    return tuple(shape)


def validate(c: mlc.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the first bad field."""
    _need(c.job in JOBS, "job", c.job, f"one of {JOBS}")
    _need(len(c.mesh) == 3 and list(c.mesh).count(-1) <= 1, "mesh", c.mesh, "(data, fsdp, tensor) with at most one -1")
    data, fsdp, tensor = mesh_size(c.mesh, num_devices)
    _need(data * fsdp * tensor == num_devices, "mesh", c.mesh, f"sizes whose product is the {num_devices} devices")
    m, d, o, t = c.model, c.data, c.optim, c.train
    _need(m.init_from_hf != "" or m.preset in presets.PRESETS, "model.preset", m.preset, f"one of {sorted(presets.PRESETS)}")
    _need(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype, "'float32' or 'bfloat16'")
    _need(m.param_dtype in ("float32", "bfloat16"), "model.param_dtype", m.param_dtype, "'float32' or 'bfloat16'")
    names = {tok.name for tok in DEFAULT_TOKENS}
    _need(all(n in names for n in m.functional_tokens), "model.functional_tokens", m.functional_tokens, f"names from {sorted(names)}")
    _need(m.visual_ops.mode in ("module", "vocab"), "model.visual_ops.mode", m.visual_ops.mode, "'module' or 'vocab'")
    _need(d.source in ("synthetic", "jsonl"), "data.source", d.source, "'synthetic' or 'jsonl'")
    _need(d.source != "jsonl" or bool(d.jsonl_train), "data.jsonl_train", d.jsonl_train, "a JSONL path when data.source='jsonl'")
    _need(d.batch_size > 0 and d.batch_size % (data * fsdp) == 0, "data.batch_size", d.batch_size,
          f"a positive multiple of the batch-sharding mesh axes data*fsdp={data * fsdp}")
    _need(o.grad_accum > 0 and d.batch_size % o.grad_accum == 0 and (d.batch_size // o.grad_accum) % (data * fsdp) == 0,
          "optim.grad_accum", o.grad_accum, f"a divisor of data.batch_size={d.batch_size} leaving micro-batches divisible by {data * fsdp}")
    _need(d.max_length >= 32, "data.max_length", d.max_length, ">= 32 tokens (prompt + image + response)")
    _need(d.max_patches > 0 and d.max_patches % 4 == 0, "data.max_patches", d.max_patches, "a positive multiple of 4")
    _need(d.image_size % 28 == 0, "data.image_size", d.image_size, "a multiple of 28")
    _need((d.image_size // 14) ** 2 <= d.max_patches * max(d.max_images, 1), "data.max_patches", d.max_patches,
          f">= the {(d.image_size // 14) ** 2} patches of one {d.image_size}px image")
    _need(o.lr > 0, "optim.lr", o.lr, "> 0")
    _need(t.steps >= 0, "train.steps", t.steps, ">= 0")
    _need(c.checkpoint.every > 0 and c.checkpoint.keep > 0, "checkpoint.every", c.checkpoint.every, "> 0 (and keep > 0)")
    r = c.rl
    _need(r.group_size >= 2, "rl.group_size", r.group_size, ">= 2 completions per prompt (advantages compare them)")
    _need(r.prompts_per_step > 0 and (r.prompts_per_step * r.group_size) % (data * fsdp) == 0 and r.prompts_per_step % (data * fsdp) == 0,
          "rl.prompts_per_step", r.prompts_per_step, f"a positive multiple of data*fsdp={data * fsdp}")
    _need(r.loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"), "rl.loss_type", r.loss_type, "grpo | bnpo | dapo | dr_grpo")
    _need(r.scale_rewards in ("group", "batch", "none"), "rl.scale_rewards", r.scale_rewards, "group | batch | none")
    _need(r.alpha >= 0 and r.beta >= 0, "rl.alpha", r.alpha, ">= 0 (and rl.beta >= 0)")
    _need(r.num_iterations >= 1, "rl.num_iterations", r.num_iterations, ">= 1")
    _need(set(r.rewards.keys()) <= {"accuracy", "functional_usage", "format", "verbosity", "spam", "expected_usage"},
          "rl.rewards", dict(r.rewards), "weights for accuracy, functional_usage, expected_usage, format, verbosity, spam")
    _need(c.eval.batch_size > 0 and c.eval.batch_size % (data * fsdp) == 0, "eval.batch_size", c.eval.batch_size,
          f"a positive multiple of data*fsdp={data * fsdp}")


def apply_overrides(c: mlc.ConfigDict, overrides: Mapping[str, Any], *, where: str = "override") -> mlc.ConfigDict:
    """A copy of `c` with dotted-key overrides applied; an unknown key or a wrong type is a
    ConfigError naming the key (and `where` it came from)."""
    c = copy.deepcopy(c)
    for key, value in overrides.items():
        node, *parents, leaf = [c, *key.split(".")]
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], mlc.ConfigDict):
                raise ConfigError(f"{where}: unknown key {key!r}: {_no_field(node, part, '.'.join(parents[:depth]))}")
            node = node[part]
        section = ".".join(parents)
        if leaf not in node:
            raise ConfigError(f"{where}: unknown key {key!r}: {_no_field(node, leaf, section)}")
        if isinstance(node[leaf], mlc.ConfigDict):
            raise ConfigError(f"{where}: key {key!r} is a config section, not a field; override its fields ({sorted(node[leaf].keys())})")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: key {key!r} = {value!r}: {e}") from None
    return c


def _no_field(node: mlc.ConfigDict, name: str, section: str) -> str:
    fields = sorted(node.keys())
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{('config.' + section) if section else 'the config'} has no field {name!r} (fields: {', '.join(fields)}){hint}"
