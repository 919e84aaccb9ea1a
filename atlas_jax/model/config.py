"""Model configuration: the Qwen2.5-VL family plus the functional-token visual operations.

The dataclasses are frozen (hashable), so a config can be a static argument of a jitted
function. `ModelConfig.from_hf_dict` reads both layouts of a Hugging Face `config.json`: the
released Qwen2.5-VL checkpoints (text fields at the top level, `rope_scaling`) and the nested
layout `transformers>=5` writes (`text_config`, `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from atlas_jax.model.layer_stack import REMAT_POLICIES
from atlas_jax.model.layers import ACTIVATIONS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Attention implementations (`model/attention.py`); the run config's 'auto' picks one per platform.
ATTENTION = ("xla", "splash", "cudnn")


class ConfigError(ValueError):
    """A configuration field holds a value the model cannot use."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT tower: patch 14, temporal patch 2, 2D rotary, window attention, 2x2 merger."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6
    attention: str = "xla"  # set from ModelConfig.attention (the tower's blocks see only this section)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder: GQA, RMSNorm, SwiGLU, M-RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    attention: str = "xla"  # set from ModelConfig.attention (the decoder layers see only this section)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisualOpConfig:
    """Functional-token visual operations (this project's step beyond the paper).

    mode: 'module' adds one gated cross-attention module per functional token; 'vocab' is the
      paper exactly (the tokens are plain vocabulary rows, no module).
    token_ids: the vocabulary id of each operation's functional token, in operation order.
    layer: the decoder layer after which the operations write into the residual stream.
    num_heads / head_dim: of each operation's cross-attention over the merged image tokens.
    max_positions: functional positions processed per sample (the first ones; a static cap
      that keeps the cost independent of the sequence length).
    """

    mode: str = "module"
    token_ids: tuple[int, ...] = ()
    layer: int = 0
    num_heads: int = 4
    head_dim: int = 64
    max_positions: int = 16

    @property
    def enabled(self) -> bool:
        return self.mode == "module" and len(self.token_ids) > 0

    @property
    def num_ops(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    visual_ops: VisualOpConfig = VisualOpConfig(mode="vocab")
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # What the backward pass keeps of each decoder / vision layer: a key of
    # layer_stack.REMAT_POLICIES ('none' | 'full' | 'save_projections').
    remat: str = "none"
    scan_layers: bool = False  # run runs of identical layers as one lax.scan (compiles once per run)
    attention: str = "xla"  # cache-free attention: one of ATTENTION (`model/attention.py`)

    def __post_init__(self):
        for tower in ("text", "vision"):  # each tower's layers receive only their own section
            object.__setattr__(self, tower, dataclasses.replace(getattr(self, tower), attention=self.attention))
        self.validate()

    def validate(self) -> None:
        t, v, ops = self.text, self.vision, self.visual_ops
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected one of {sorted(DTYPES)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention={self.attention!r}: expected one of {list(ATTENTION)}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ConfigError("model.attention='cudnn' needs a 16-bit model.dtype (cuDNN has no float32 kernel): "
                              "set model.dtype='bfloat16', or model.attention='xla'")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if t.hidden_size % t.num_heads:
            raise ConfigError(f"text.hidden_size={t.hidden_size} must be divisible by text.num_heads={t.num_heads}")
        if t.num_heads % t.num_kv_heads:
            raise ConfigError(f"text.num_heads={t.num_heads} must be a multiple of text.num_kv_heads={t.num_kv_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ConfigError(
                f"text.mrope_section={t.mrope_section} must sum to head_dim/2={t.head_dim // 2}"
            )
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ConfigError(
                f"vision.hidden_size={v.hidden_size} / num_heads={v.num_heads} must give a head_dim divisible by 4"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(
                f"vision.out_hidden_size={v.out_hidden_size} must equal text.hidden_size={t.hidden_size}"
            )
        for tower, act in (("text", t.hidden_act), ("vision", v.hidden_act)):
            if not isinstance(act, str) or act not in ACTIVATIONS:
                raise ConfigError(f"{tower}.hidden_act={act!r} (the {tower} tower's MLP): expected one of {sorted(ACTIVATIONS)}")
        if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
            raise ConfigError(f"vision.fullatt_block_indexes={v.fullatt_block_indexes} out of range [0, {v.depth})")
        if ops.mode not in ("module", "vocab"):
            raise ConfigError(f"visual_ops.mode={ops.mode!r}: expected 'module' or 'vocab'")
        if ops.mode == "module" and not 0 <= ops.layer < t.num_layers:
            raise ConfigError(f"visual_ops.layer={ops.layer} out of range [0, {t.num_layers})")
        if len(set(ops.token_ids)) != len(ops.token_ids):
            raise ConfigError(f"visual_ops.token_ids={ops.token_ids} has duplicates")
        if any(not 0 <= i < t.vocab_size for i in ops.token_ids):
            raise ConfigError(f"visual_ops.token_ids={ops.token_ids} outside the vocabulary [0, {t.vocab_size})")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
        """Builds a config from a Hugging Face Qwen2.5-VL `config.json` dict.

        Every field read is type-checked here, so a malformed file is rejected naming `source` and
        the field, never with a raw TypeError later."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a JSON {type(d).__name__}, expected an object of config fields")
        if d.get("model_type") != "qwen2_5_vl":
            raise ConfigError(
                f"{source}: model_type={d.get('model_type')!r}, expected 'qwen2_5_vl' (a Qwen2.5-VL checkpoint)"
            )

        def section(dct, key, where=""):
            value = dct.get(key) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {where}{key} is a {type(value).__name__}, expected a JSON object")
            return dict(value)

        def integer(dct, key, where, default=None, minimum=1):
            value = dct.get(key)
            value = default if value is None else value
            if value is None:
                raise ConfigError(f"{source}: missing field {where}{key}")
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{source}: {where}{key}={value!r}, expected an integer >= {minimum}")
            return value

        def integers(dct, key, where, default=None, minimum=1):
            value = dct.get(key, default)
            if value is None:
                raise ConfigError(f"{source}: missing field {where}{key}")
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {where}{key}={value!r}, expected a list of integers")
            return tuple(integer({key: x}, key, where, minimum=minimum) for x in value)

        def number(dct, key, where, default):
            value = dct.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{source}: {where}{key}={value!r}, expected a positive number")
            return float(value)

        td = section(d, "text_config")
        for k, val in d.items():  # released checkpoints keep text fields at the top level
            if k not in ("text_config", "vision_config"):
                td.setdefault(k, val)
        vd = section(d, "vision_config")
        rope_key = "rope_parameters" if td.get("rope_parameters") else "rope_scaling"
        rope = section(td, rope_key)
        type_key = "rope_type" if "rope_type" in rope else "type"
        if rope.get(type_key, "default") not in ("default", "mrope"):
            # Qwen2.5-VL is released with plain M-RoPE; its authors advise against YaRN (it degrades
            # temporal and spatial grounding), so no scaled frequencies are built and none are ignored.
            raise ConfigError(
                f"{source}: {rope_key}.{type_key}={rope[type_key]!r} is not supported: only Qwen2.5-VL's "
                "unscaled M-RoPE ('default' or 'mrope'); remove the rope scaling to load this checkpoint"
            )
        if td.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen2.5-VL does not use it)")
        ties = {where: dct.get("tie_word_embeddings", False) for where, dct in (("", d), ("text_config.", td))}
        for where, tie in ties.items():
            if not isinstance(tie, bool):
                raise ConfigError(f"{source}: {where}tie_word_embeddings={tie!r}, expected true or false")

        num_heads = integer(td, "num_attention_heads", "")
        text = TextConfig(
            vocab_size=integer(td, "vocab_size", ""),
            hidden_size=integer(td, "hidden_size", ""),
            intermediate_size=integer(td, "intermediate_size", ""),
            num_layers=integer(td, "num_hidden_layers", ""),
            num_heads=num_heads,
            num_kv_heads=integer(td, "num_key_value_heads", "", default=num_heads),
            rms_norm_eps=number(td, "rms_norm_eps", "", 1e-6),
            rope_theta=number(rope, "rope_theta", f"{rope_key}.", td.get("rope_theta", 1000000.0)),
            mrope_section=integers(rope, "mrope_section", f"{rope_key}."),
            hidden_act=td.get("hidden_act", "silu"),
            # transformers 5's rule: a tie flag inside text_config (older saves) ties too.
            tie_word_embeddings=any(ties.values()),
            max_position_embeddings=integer(td, "max_position_embeddings", "", 128000),
        )
        v = "vision_config."
        vrope = section(vd, "rope_parameters", v)
        vision = VisionConfig(
            depth=integer(vd, "depth", v),
            hidden_size=integer(vd, "hidden_size", v),
            intermediate_size=integer(vd, "intermediate_size", v),
            num_heads=integer(vd, "num_heads", v),
            in_channels=integer(vd, "in_channels", v, vd.get("in_chans", 3)),
            patch_size=integer(vd, "patch_size", v, 14),
            temporal_patch_size=integer(vd, "temporal_patch_size", v, 2),
            spatial_merge_size=integer(vd, "spatial_merge_size", v, 2),
            window_size=integer(vd, "window_size", v, 112),
            out_hidden_size=integer(vd, "out_hidden_size", v, text.hidden_size),
            fullatt_block_indexes=integers(vd, "fullatt_block_indexes", v, (7, 15, 23, 31), minimum=0),
            hidden_act=vd.get("hidden_act", "silu"),
            rope_theta=number(vrope, "rope_theta", f"{v}rope_parameters.", 10000.0),
            tokens_per_second=integer(vd, "tokens_per_second", v, 2),
        )
        kw = dict(
            vision=vision,
            text=text,
            **{
                name: integer(d, name, "", default, minimum=0)
                for name, default in (
                    ("image_token_id", 151655),
                    ("video_token_id", 151656),
                    ("vision_start_token_id", 151652),
                    ("vision_end_token_id", 151653),
                )
            },
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The released-checkpoint `config.json` layout, which every `transformers` version reads."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "hidden_act": t.hidden_act,
            "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "torch_dtype": self.param_dtype,
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "hidden_act": v.hidden_act,
                "tokens_per_second": v.tokens_per_second,
            },
        }
