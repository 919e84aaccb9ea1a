"""The pieces every job builds from its config: mesh, tokenizer, data, model.

Each builder is small and does one thing, so a trainer's `main()` reads top to bottom as a
list of calls (big_vision style), and SFT, LA-GRPO and evaluation build identical models and
data from the same config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import ml_collections as mlc
from flax import nnx
from transformers import PreTrainedTokenizerFast

from atlas_jax import functional_tokens as ft
from atlas_jax import checkpoint, hf_checkpoint, multihost, run_config
from atlas_jax import sharding as shd
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import image_processing, pipeline, tfds_builder
from atlas_jax.data.synthetic import TASKS, perception
from atlas_jax.data.synthetic.source import SyntheticSource
from atlas_jax.model import attention, extend, lora, presets, vlm
from atlas_jax.train import optimizer
from atlas_jax.model.config import ConfigError, ModelConfig, VisualOpConfig

log = logging.getLogger("atlas_jax")
CORPUS_RECORDS = 512  # training records a from-scratch tokenizer is trained on (64 per synthetic task)


def make_mesh(c: mlc.ConfigDict, devices=None):
    """The run's mesh over `devices` (default: all; the compile check passes a TPU topology's)."""
    return shd.make_mesh(tuple(c.mesh), devices)


def data_dir(c: mlc.ConfigDict, workdir: str) -> str:
    return c.data.data_dir or os.path.join(workdir, "data")


# ---------------------------------------------------------------------------- data
def synthetic_config(c: mlc.ConfigDict) -> str:
    return tfds_builder.synthetic_config_name(
        c.data.synthetic_config, num_per_task=c.data.num_per_task or None, image_size=c.data.image_size, seed=c.seed
    )


def build_data(c: mlc.ConfigDict, workdir: str) -> None:
    """Writes the ArrayRecord dataset (idempotent; synthetic data only for a fixed-size training set,
    `data.num_per_task` > 0). Process 0 builds; the others wait."""
    d = data_dir(c, workdir)
    if jax.process_index() == 0:
        if c.data.source == "synthetic" and c.data.num_per_task:
            tfds_builder.build_synthetic(d, c.data.synthetic_config, num_per_task=c.data.num_per_task or None, image_size=c.data.image_size, seed=c.seed)
        elif c.data.source == "jsonl":
            splits = {"train": c.data.jsonl_train}
            if c.data.jsonl_eval:
                splits[c.eval.split] = c.data.jsonl_eval
            tfds_builder.build_user_dataset(d, splits, skip_bad_records=c.data.skip_bad_records)
    multihost.barrier("atlas_jax_build_data")


def load_split(c: mlc.ConfigDict, workdir: str, split: str):
    """Random-access records of one split. Synthetic, `data.num_per_task` = 0: generated on the fly,
    `train` without end, an evaluation condition `run_config.eval_num_per_task` per task; > 0: the stored set."""
    d = data_dir(c, workdir)
    if c.data.source == "perception":
        return perception.PerceptionSource(split, seed=c.seed, image_size=c.data.image_size)
    if c.data.source == "synthetic":
        if not c.data.num_per_task:
            size = None if split == "train" else run_config.eval_num_per_task(c, split)
            return SyntheticSource(split, size, seed=c.seed, tasks=c.data.tasks or None, image_size=c.data.image_size,
                                   perception_every=c.data.perception_every if split == "train" else 0)
        return tfds_builder.load_split(d, split, synthetic_config(c))
    return tfds_builder.load_split(d, split, "user", dataset="atlas_user_data")


def make_pipeline_config(c: mlc.ConfigDict, model_cfg: ModelConfig, **kw) -> pipeline.PipelineConfig:
    """`run_config.pipeline_config` with the image preprocessing of `model_cfg`'s vision tower."""
    image = image_processing.ImageProcessorConfig.for_vision(
        model_cfg.vision, max_pixels=c.data.max_patches * model_cfg.vision.patch_size**2 // max(c.data.max_images, 1)
    )
    return run_config.pipeline_config(c, image, **kw)


# ---------------------------------------------------------------------------- tokenizer
def make_tokenizer(c: mlc.ConfigDict, workdir: str):
    """The run's tokenizer, with the functional tokens; saved in WORKDIR/tokenizer so a resumed
    run (and evaluation) uses exactly the same one. Taken from (first found): the workdir,
    `tokenizer.path`, the run named by `checkpoint.init_from`, the HF
    checkpoint; else trained on the synthetic training split."""
    tokens = ft.by_name(tuple(c.model.functional_tokens))
    saved = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(saved, "tokenizer.json")):
        return _load_run_tokenizer(saved)
    run = c.checkpoint.init_from
    from_run = os.path.join(run, "tokenizer") if run and os.path.exists(os.path.join(run, "tokenizer", "tokenizer.json")) else ""
    path = c.tokenizer.path or from_run or c.model.init_from_hf
    if path:
        tok = tokenizer_lib.load_tokenizer(path)
    else:
        tok = tokenizer_lib.build_tokenizer(_corpus(c, workdir), vocab_size=c.tokenizer.vocab_size)
    tokenizer_lib.add_functional_tokens(tok, tokens)
    if jax.process_index() == 0:  # written aside, then renamed: a run killed meanwhile leaves no half file
        shutil.rmtree(saved + ".tmp", ignore_errors=True)
        tok.save_pretrained(saved + ".tmp")
        shutil.rmtree(saved, ignore_errors=True)  # a tokenizer.json-less leftover
        os.replace(saved + ".tmp", saved)
    multihost.barrier("atlas_jax_tokenizer")
    return tokenizer_lib.load_tokenizer(saved)


def save_run_config(c: mlc.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json: the run's config, from which `atlas_jax.generate` (and a person)
    rebuilds its model and tokenizer."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, indent=2, default=str)


def _load_run_tokenizer(saved: str):
    """The tokenizer a run saved in its workdir; its checkpoints hold its token ids, so a damaged
    one is an error saying how to get it back, not something to replace quietly."""
    try:
        return tokenizer_lib.load_tokenizer(saved)
    except Exception as e:  # noqa: BLE001 - JSON errors, OSError, and the tokenizers library's plain Exception
        raise checkpoint.CheckpointError(
            f"{os.path.join(saved, 'tokenizer.json')} is unreadable ({type(e).__name__}: {e}); it is the tokenizer this "
            f"run's checkpoints were trained with: copy {saved} back from a backup (or from the run it came from), or, "
            f"if no checkpoint depends on it yet, delete {saved} to rebuild it from the config"
        ) from e


def _corpus(c, workdir):
    """Texts to train a from-scratch BPE on: the training split (its first CORPUS_RECORDS records
    when generated without end) plus the functional words. Perception pretraining adds its own
    texts to the suite's: the model it makes is the suite's starting point."""
    perceive = c.data.source == "perception"
    # Perception pretraining: every family's texts (`TASKS`), so the start's tokenizer covers the main job's too.
    src = (SyntheticSource("train", None, seed=c.seed, tasks=list(TASKS), image_size=c.data.image_size) if perceive
           else load_split(c, workdir, "train"))
    texts = perception.corpus(c.seed, image_size=c.data.image_size) if perceive else []
    for i in range(min(len(src), CORPUS_RECORDS)):
        r = src[i]
        texts += [r["question"], r["response"].replace("<|", " ").replace("|>", " ")]
    texts += [" ".join(t.words) for t in ft.DEFAULT_TOKENS]
    return texts


# ---------------------------------------------------------------------------- model
def attention_implementation(c: mlc.ConfigDict, mesh_) -> str:
    """`model.attention` for the devices of `mesh_` (a TPU topology's in the compile check, whatever
    the host's backend): 'auto' becomes splash on TPU, cuDNN on GPU, XLA on CPU."""
    return attention.resolve(c.model.attention, mesh_.devices.flat[0].platform, c.model.dtype)


def model_config(c: mlc.ConfigDict, tokens: tokenizer_lib.RunTokens, vocab_size: int, mesh_) -> ModelConfig:
    """The from-scratch architecture for the run's tokenizer (`vocab_size` entries; ids from `tokens`)
    on the devices of `mesh_`."""
    cfg = presets.get(
        c.model.preset, vocab_size=-(-vocab_size // 128) * 128, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
        remat=c.model.remat, scan_layers=c.model.scan_layers, attention=attention_implementation(c, mesh_),
        image_token_id=tokens.image_id, video_token_id=tokens.video_id,
        vision_start_token_id=tokens.vision_start_id, vision_end_token_id=tokens.vision_end_id,
    )
    v = c.model.visual_ops
    layer = cfg.text.num_layers // 2 if v.layer < 0 else v.layer
    ops = VisualOpConfig(mode=v.mode, token_ids=tokens.functional_ids, layer=layer, num_heads=v.num_heads,
                         head_dim=v.head_dim, max_positions=v.max_positions)
    return dataclasses.replace(cfg, visual_ops=ops)


def make_model(c: mlc.ConfigDict, tok, tokens: tokenizer_lib.RunTokens, mesh_) -> vlm.VLM:
    """A sharded model: from a Hugging Face checkpoint (+ functional tokens) or from scratch,
    with LoRA adapters when `model.lora.rank` > 0."""
    model = _base_model(c, tok, tokens, mesh_)
    lora_cfg = run_config.lora_config(c)
    if not lora_cfg.enabled:
        return model
    with jax.set_mesh(mesh_):
        return lora.apply(model, lora_cfg, seed=c.seed)


def trainable(c: mlc.ConfigDict) -> nnx.filterlib.Filter:
    """The parameters the run trains (`optimizer.trainable`): the optimizer and the step take it."""
    return optimizer.trainable(c.optim.freeze_vision, adapters_only=run_config.lora_config(c).enabled)


def _base_model(c: mlc.ConfigDict, tok, tokens: tokenizer_lib.RunTokens, mesh_) -> vlm.VLM:
    if c.model.init_from_hf:
        base = hf_checkpoint.from_hf(
            c.model.init_from_hf, mesh=mesh_, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
            remat=c.model.remat, scan_layers=c.model.scan_layers, attention=attention_implementation(c, mesh_),
        )
        v = c.model.visual_ops
        if base.cfg.visual_ops.token_ids:  # an exported atlas-jax checkpoint: tokens already there
            return base
        return extend.add_functional_tokens(
            base, tok, ft.by_name(tokens.functional_names), mode=v.mode,
            layer=None if v.layer < 0 else v.layer, num_heads=v.num_heads, head_dim=v.head_dim, max_positions=v.max_positions,
        )
    return vlm.create(model_config(c, tokens, len(tok), mesh_), mesh_, seed=c.seed)


def make_abstract_model(model_cfg: ModelConfig) -> vlm.VLM:
    """The model's shapes, no arrays (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(0)))


def num_params(model_: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model_, nnx.Param)))


# ---------------------------------------------------------------------------- a trained policy
@dataclasses.dataclass(frozen=True)
class Policy:
    """A model ready to sample or evaluate: `nnx.merge(graphdef, params)`, its config, the run's
    tokenizer and token ids. Trainers build one and swap in each step's parameters (`with_params`)."""

    tok: PreTrainedTokenizerFast
    tokens: tokenizer_lib.RunTokens
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    source: str = ""  # where the parameters came from

    def with_params(self, params: nnx.State) -> Policy:
        return dataclasses.replace(self, params=params)


def load_policy(c: mlc.ConfigDict, workdir: str, mesh) -> Policy:
    """The run's model with the parameters of the newest checkpoint in `workdir`, else of
    `checkpoint.init_from`, else as `make_model` builds it (a HF checkpoint's weights)."""
    run = c.checkpoint.init_from
    tokenizers = (os.path.join(workdir, "tokenizer"), c.tokenizer.path, run and os.path.join(run, "tokenizer"), c.model.init_from_hf)
    if not any(path and os.path.exists(path) for path in tokenizers):
        raise ConfigError(f"no trained tokenizer for the run in {workdir!r}: evaluate a run's workdir, or set "
                          "checkpoint.init_from (a run's workdir), model.init_from_hf or tokenizer.path")
    tok = make_tokenizer(c, workdir)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)
    model = make_model(c, tok, tokens, mesh)
    graphdef, params = nnx.split(model)
    with checkpoint.Checkpoints(workdir, read_only=True) as own:
        source = workdir if own.latest_step() is not None else run
    if source:
        params = checkpoint.init_from(source, checkpoint.abstract(params))
    source = source or c.model.init_from_hf or "a freshly initialised model"
    log.info("evaluating the parameters of %s", source)
    return Policy(tok, tokens, model.cfg, graphdef, params, source)
