"""Hugging Face Qwen2.5-VL checkpoints: load straight into a sharded model, and export back.

`from_hf(dir)` reads `config.json` and the safetensors weights (one file, or shards listed in
`model.safetensors.index.json`) and places every parameter directly in its shards: the model is
built abstractly (`nnx.eval_shape`), each tensor stays a lazy view of a memory map, and
`jax.make_array_from_callback` copies out only the slices of the devices a host addresses, so
neither a device nor a host ever holds an unsharded copy of the model.

`to_hf(model, dir)` writes the released-checkpoint layout that every `transformers` version
loads; the functional-token rows live inside the embedding / head tables, and the
visual-operation modules go to a separate `atlas_visual_ops.safetensors` that `transformers`
ignores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atlas_jax import sharding as shd
from atlas_jax.model.config import ConfigError, ModelConfig, VisionConfig, VisualOpConfig
from atlas_jax.model.visual_ops import VisualOps
from atlas_jax.model.vlm import VLM
from atlas_jax.safetensors_io import SafetensorsError, SafetensorsFile, save_file

VISUAL_OPS_FILE = "atlas_visual_ops.safetensors"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its HF name, HF shape, and the two layout transforms."""

    hf_name: str
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(hf_name, in_shape, out_shape) -> Entry:
    """torch Linear weight [out, in] <-> kernel [*in_shape, *out_shape]."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return Entry(
        hf_name,
        (n_out, n_in),
        lambda w: w.T.reshape(tuple(in_shape) + tuple(out_shape)),
        lambda k: k.reshape(n_in, n_out).T,
    )


def _vector(hf_name, shape) -> Entry:
    n = int(np.prod(shape))
    return Entry(hf_name, (n,), lambda b: b.reshape(shape), lambda b: b.reshape(n))


def _same(hf_name, shape) -> Entry:
    return Entry(hf_name, tuple(shape), lambda x: x, lambda x: x)


def param_entries(cfg: ModelConfig) -> dict[tuple, Entry]:
    """NNX parameter path -> HF tensor, for every parameter of the base model."""
    t = cfg.text
    D, H, K, E, F = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    out: dict[tuple, Entry] = {}
    out[("embed", "embedding")] = _same("model.embed_tokens.weight", (t.vocab_size, D))
    out[("final_norm", "scale")] = _vector("model.norm.weight", (D,))
    if not t.tie_word_embeddings:
        out[("lm_head", "kernel")] = _linear("lm_head.weight", (D,), (t.vocab_size,))
    for i in range(t.num_layers):
        p, h = ("layers", i), f"model.layers.{i}."
        out[p + ("input_norm", "scale")] = _vector(h + "input_layernorm.weight", (D,))
        out[p + ("post_attn_norm", "scale")] = _vector(h + "post_attention_layernorm.weight", (D,))
        for name, heads in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            out[p + ("attn", name, "kernel")] = _linear(h + f"self_attn.{name}.weight", (D,), (heads, E))
            out[p + ("attn", name, "bias")] = _vector(h + f"self_attn.{name}.bias", (heads, E))
        out[p + ("attn", "o_proj", "kernel")] = _linear(h + "self_attn.o_proj.weight", (H, E), (D,))
        for name, (i_, o_) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
            out[p + ("mlp", name, "kernel")] = _linear(h + f"mlp.{name}.weight", (i_,), (o_,))
    for path, entry in vision_entries(cfg.vision).items():
        out[("vision",) + path] = dataclasses.replace(entry, hf_name="visual." + entry.hf_name)
    return out


def vision_entries(v: VisionConfig) -> dict[tuple, Entry]:
    """VisionTower parameter path -> HF `Qwen2_5_VisionTransformerPretrainedModel` tensor name."""
    Dv, Hv, Ev, Fv, C = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, v.patch_dim
    out: dict[tuple, Entry] = {}
    patch_shape = (Dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    # Conv3d weight order (c, t, h, w) equals the processor's flatten order of a patch.
    out[("patch_embed", "kernel")] = Entry(
        "patch_embed.proj.weight", patch_shape, lambda w: w.reshape(Dv, C).T, lambda k: k.T.reshape(patch_shape)
    )
    for i in range(v.depth):
        p, h = ("blocks", i), f"blocks.{i}."
        out[p + ("norm1", "scale")] = _vector(h + "norm1.weight", (Dv,))
        out[p + ("norm2", "scale")] = _vector(h + "norm2.weight", (Dv,))
        out[p + ("attn", "qkv", "kernel")] = _linear(h + "attn.qkv.weight", (Dv,), (3, Hv, Ev))
        out[p + ("attn", "qkv", "bias")] = _vector(h + "attn.qkv.bias", (3, Hv, Ev))
        out[p + ("attn", "proj", "kernel")] = _linear(h + "attn.proj.weight", (Hv, Ev), (Dv,))
        out[p + ("attn", "proj", "bias")] = _vector(h + "attn.proj.bias", (Dv,))
        for name, (i_, o_) in (("gate_proj", (Dv, Fv)), ("up_proj", (Dv, Fv)), ("down_proj", (Fv, Dv))):
            out[p + ("mlp", name, "kernel")] = _linear(h + f"mlp.{name}.weight", (i_,), (o_,))
            out[p + ("mlp", name, "bias")] = _vector(h + f"mlp.{name}.bias", (o_,))
    M, D = Dv * v.merge_unit, v.out_hidden_size
    out[("merger", "ln_q", "scale")] = _vector("merger.ln_q.weight", (Dv,))
    out[("merger", "fc1", "kernel")] = _linear("merger.mlp.0.weight", (M,), (M,))
    out[("merger", "fc1", "bias")] = _vector("merger.mlp.0.bias", (M,))
    out[("merger", "fc2", "kernel")] = _linear("merger.mlp.2.weight", (M,), (D,))
    out[("merger", "fc2", "bias")] = _vector("merger.mlp.2.bias", (D,))
    return out


def load_state_dict(module: nnx.Module, entries: dict[tuple, Entry], state_dict, prefix: str = "") -> None:
    """Copies HF tensors (name -> array) into `module` in place, keeping each parameter's dtype
    and sharding. Raises CheckpointError naming a missing tensor or one of the wrong shape."""
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    for path, var in params.items():
        e = entries[path]
        name = prefix + e.hf_name
        if name not in state_dict:
            raise CheckpointError(f"missing tensor {name}")
        w = np.asarray(state_dict[name])
        if tuple(w.shape) != e.hf_shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(w.shape)}, expected {e.hf_shape}")
        old = var.get_value()
        new = jnp.asarray(e.to_jax(w), dtype=old.dtype)
        var.set_value(jax.device_put(new, old.sharding))


def state_dict(module: nnx.Module, entries: dict[tuple, Entry], prefix: str = "") -> dict[str, np.ndarray]:
    """The module's parameters as HF-named, HF-laid-out host arrays."""
    return {
        prefix + entries[path].hf_name: np.ascontiguousarray(entries[path].to_hf(_host(var.get_value())))
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def _canonical(name: str) -> str:
    """transformers>=4.52 in-memory names -> the released checkpoint names."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual."), ("language_model.model.", "model.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


# ---------------------------------------------------------------------- reading
def read_config(path: str, **overrides) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint directory needs config.json)")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({type(e).__name__}: {e})") from e
    ops_file = os.path.join(path, VISUAL_OPS_FILE)
    if "visual_ops" not in overrides and os.path.exists(ops_file):
        # An atlas-jax export: its functional-token modules are described in the ops file's metadata.
        meta = _open(ops_file).metadata.get("visual_ops")
        if meta:
            overrides["visual_ops"] = _visual_op_config(ops_file, meta)
    try:
        return ModelConfig.from_hf_dict(d, source=cfg_path, **overrides)
    except ConfigError as e:  # the checks of ModelConfig.validate name the field but not the file
        message = str(e)
        raise CheckpointError(message if message.startswith(cfg_path) else f"{cfg_path}: {message}") from e


def _visual_op_config(ops_file: str, meta: str) -> VisualOpConfig:
    """The VisualOpConfig stored (as JSON) in the ops file's 'visual_ops' metadata."""
    try:
        fields = json.loads(meta)
        fields["token_ids"] = tuple(fields["token_ids"])
        return VisualOpConfig(**fields)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        names = ", ".join(f.name for f in dataclasses.fields(VisualOpConfig))
        raise CheckpointError(
            f"{ops_file}: metadata 'visual_ops' is not a VisualOpConfig (expected a JSON object with {names}): {e}"
        ) from e


@dataclasses.dataclass(frozen=True)
class Weights:
    """A checkpoint's base tensors: canonical name -> (file, name in that file); `source` is the file
    that lists them (model.safetensors, or the shard index), named when a tensor is missing."""

    tensors: dict[str, tuple[SafetensorsFile, str]]
    source: str


def open_weights(path: str) -> Weights:
    """The base tensors of a checkpoint directory, over a single file or a sharded index."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index (expected a 'weight_map' object): {e}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, expected an object name -> shard file")
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, fname in weight_map.items():
            fpath = os.path.join(path, str(fname))
            if fname not in files:
                if not os.path.exists(fpath):
                    raise CheckpointError(f"{index}: incomplete shard index: shard {fname} (for {name}) is missing")
                files[fname] = _open(fpath)
            if name not in files[fname]:
                raise CheckpointError(
                    f"{index}: incomplete shard index: weight_map puts tensor {name} in {fpath}, which does not hold it"
                )
            out[_canonical(name)] = (files[fname], name)
        return Weights(out, index)
    if os.path.exists(single):
        f = _open(single)
        return Weights({_canonical(n): (f, n) for n in f}, single)
    pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
    if pickles:
        raise CheckpointError(
            f"{path}: only a pickle-based checkpoint ({', '.join(pickles)}) was found; it is never unpickled. "
            "Convert it to safetensors first (e.g. load it yourself in a trusted environment and save_pretrained "
            "with safe_serialization=True)."
        )
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} found")


def _open(path: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e


def _check_float(path: str, name: str, dtype: np.dtype) -> None:
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, expected a floating-point dtype")


def _read(weights: Weights, entry: Entry, want_shape) -> np.ndarray:
    """The tensor for `entry` in the JAX layout, as a lazy view of the memory-mapped file: nothing is
    read until a shard's slice of it is (see `_sharded`)."""
    if entry.hf_name not in weights.tensors:
        where = "the shard index has no entry for it" if weights.source.endswith(INDEX_FILE) else "the file does not hold it"
        raise CheckpointError(f"{weights.source}: missing tensor {entry.hf_name} ({where})")
    f, name = weights.tensors[entry.hf_name]
    shape, dtype = f.info(name)
    if shape != entry.hf_shape:
        raise CheckpointError(f"{f.path}: tensor {name} has shape {shape}, expected {entry.hf_shape} from config.json")
    _check_float(f.path, name, dtype)
    arr = entry.to_jax(f[name])
    assert arr.shape == tuple(want_shape), (entry.hf_name, arr.shape, want_shape)
    return arr


def _sharded(view: np.ndarray, sharding, dtype) -> jax.Array:
    """A global array from a host view (e.g. a memory map): each addressable device copies, and
    converts to `dtype`, only its own slice, so no host reads or holds the whole tensor. The slice is
    copied (never handed to JAX as a view of the read-only map, which a backend might alias)."""
    return jax.make_array_from_callback(view.shape, sharding, lambda idx: np.array(view[idx], dtype=dtype, order="C"))


def load_into(model_abstract: VLM, path: str, mesh, rules=shd.RULES) -> VLM:
    """Fills an abstract (eval_shape) model from the checkpoint, sharded on `mesh`."""
    cfg = model_abstract.cfg
    weights = open_weights(path)
    graphdef, abstract = nnx.split(model_abstract)
    shardings = shd.state_shardings(abstract, mesh, rules)
    entries = param_entries(cfg)
    ops_file = os.path.join(path, VISUAL_OPS_FILE)
    ops_weights = _open(ops_file) if os.path.exists(ops_file) and cfg.visual_ops.enabled else None

    flat_sh = dict(nnx.to_flat_state(shardings))
    leaves = []
    for path_, var in nnx.to_flat_state(abstract):
        sharding = flat_sh[path_].get_value() if isinstance(flat_sh[path_], nnx.Variable) else flat_sh[path_]
        if path_[0] == "visual_ops":
            if ops_weights is None:
                leaves.append((path_, None))  # initialised fresh below (gates at zero)
                continue
            key = "visual_ops." + ".".join(map(str, path_[1:]))
            if key not in ops_weights:
                raise CheckpointError(
                    f"{ops_file}: missing tensor {key} (is visual_ops configured like the run that saved it?)"
                )
            shape, dtype = ops_weights.info(key)
            if shape != tuple(var.shape):
                raise CheckpointError(
                    f"{ops_file}: tensor {key} has shape {shape}, expected {tuple(var.shape)} "
                    "(is visual_ops configured like the run that saved it?)"
                )
            _check_float(ops_file, key, dtype)
            view = ops_weights[key]
        else:
            if path_ not in entries:
                raise CheckpointError(f"no Hugging Face name known for parameter {'/'.join(map(str, path_))}")
            view = _read(weights, entries[path_], var.shape)
        leaves.append((path_, _sharded(view, sharding, var.dtype)))

    if any(a is None for _, a in leaves):  # fresh visual-op modules on a base checkpoint
        fresh = shd.sharded_init(lambda: VisualOps(cfg, rngs=nnx.Rngs(0)), mesh, rules)
        fresh_flat = dict(nnx.to_flat_state(nnx.state(fresh)))
        leaves = [(p, a if a is not None else fresh_flat[p[1:]].get_value()) for p, a in leaves]

    state = nnx.from_flat_state([(p, abstract_var.replace(a)) for (p, a), (_, abstract_var) in zip(leaves, nnx.to_flat_state(abstract))])
    return nnx.merge(graphdef, state)


def from_hf(path: str, *, mesh=None, rules=shd.RULES, **overrides) -> VLM:
    """Loads a Qwen2.5-VL checkpoint directory into a sharded VLM.

    overrides: ModelConfig fields (e.g. visual_ops=VisualOpConfig(...), dtype='bfloat16').
    """
    cfg = read_config(path, **overrides)
    mesh = mesh if mesh is not None else shd.make_mesh((-1, 1, 1))
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
    return load_into(abstract, path, mesh, rules)


# ---------------------------------------------------------------------- writing
def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_tensors(model: VLM, dtype=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(base tensors by HF name, visual-op tensors) as host numpy arrays."""
    if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        raise ValueError("the model holds LoRA adapters, which transformers' Qwen2.5-VL has no place for: "
                         "export the merged weights, `lora.merged(model, lora_cfg)`")
    entries = param_entries(model.cfg)
    base, ops = {}, {}
    for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = _host(var.get_value())
        if dtype is not None:
            arr = arr.astype(dtype)
        if path_[0] == "visual_ops":
            ops["visual_ops." + ".".join(map(str, path_[1:]))] = arr
        else:
            e = entries[path_]
            base[e.hf_name] = np.ascontiguousarray(e.to_hf(arr))
    return base, ops


def to_hf(model: VLM, path: str, *, tokenizer=None, dtype=None) -> None:
    """Writes `model` as a Hugging Face checkpoint directory (config, weights, tokenizer).

    Files are written to temporary names and renamed, so a crash never leaves a half-written
    checkpoint under the final names. Only process 0 writes.
    """
    base, ops = hf_tensors(model, dtype)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    cfg_dict = model.cfg.to_hf_dict()
    if dtype is not None:
        cfg_dict["torch_dtype"] = np.dtype(dtype).name
    if tokenizer is not None:  # the released config.json's ids; without them transformers assumes Qwen's 151643 / 151645
        cfg_dict.update(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id)
    save_file(base, os.path.join(path, WEIGHTS_FILE))
    if ops:
        save_file(ops, os.path.join(path, VISUAL_OPS_FILE), metadata={"format": "atlas_jax", "visual_ops": json.dumps(dataclasses.asdict(model.cfg.visual_ops))})
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg_dict, f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
