"""Named model sizes. `tiny` trains on a laptop CPU; the `qwen25vl_*` presets match the
released checkpoints (load those with `hf_checkpoint.from_hf`, which reads config.json)."""

from __future__ import annotations

import dataclasses

from atlas_jax.model.config import ModelConfig, TextConfig, VisionConfig, VisualOpConfig


def tiny(vocab_size: int = 1024, **kw) -> ModelConfig:
    """~2M parameters: a from-scratch model for CPU runs and tests.

    rope_theta 5, not Qwen's 1e6 or 10000: M-RoPE gives an image token's column the lowest of the
    head's 16 frequencies (`mrope_section`), theta^(-10/16) .. theta^(-15/16) radians per token. At
    theta 10000 that is 0.003 or less, so across this model's 4 x 4 merged tokens the decoder cannot
    tell a left object from a right one (a 7B model's grids span tens of tokens); at 5, 0.37 .. 0.22.
    """
    return _build(
        VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, fullatt_block_indexes=(1,), window_size=56),
        TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, rope_theta=5.0, mrope_section=(4, 6, 6), max_position_embeddings=4096),
        kw,
    )


def small_100m(vocab_size: int = 32768, **kw) -> ModelConfig:
    """~100M parameters (benchmarks)."""
    return _build(
        VisionConfig(depth=6, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=640, fullatt_block_indexes=(2, 5)),
        TextConfig(vocab_size=vocab_size, hidden_size=640, intermediate_size=1920, num_layers=10, num_heads=10, num_kv_heads=2, rope_theta=1e6, mrope_section=(8, 12, 12)),
        kw,
    )


def medium_1b(vocab_size: int = 65536, **kw) -> ModelConfig:
    """~1B parameters (GPU / TPU throughput and MFU measurements)."""
    return _build(
        VisionConfig(depth=16, hidden_size=1024, intermediate_size=2816, num_heads=16, out_hidden_size=2048, fullatt_block_indexes=(3, 7, 11, 15)),
        TextConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16, num_kv_heads=4, rope_theta=1e6, mrope_section=(16, 24, 24)),
        kw,
    )


def qwen25vl_7b(vocab_size: int = 152064, **kw) -> ModelConfig:
    """Qwen2.5-VL-7B-Instruct's architecture (weights come from `from_hf`)."""
    return _build(
        VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        TextConfig(vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4),
        kw,
    )


def _build(vision: VisionConfig, text: TextConfig, kw: dict) -> ModelConfig:
    ops = kw.pop("visual_ops", VisualOpConfig(mode="vocab"))
    return ModelConfig(vision=vision, text=text, visual_ops=ops, **kw)


PRESETS = {"tiny": tiny, "small_100m": small_100m, "medium_1b": medium_1b, "qwen25vl_7b": qwen25vl_7b}


def get(name: str, **kw) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; expected one of {sorted(PRESETS)}")
    return PRESETS[name](**kw)


def with_visual_ops(cfg: ModelConfig, token_ids, *, mode: str = "module", layer: int | None = None, **kw) -> ModelConfig:
    """`cfg` with functional-token visual operations for `token_ids` (default layer: the middle)."""
    layer = cfg.text.num_layers // 2 if layer is None else layer
    head_dim = kw.pop("head_dim", min(64, cfg.text.head_dim))
    return dataclasses.replace(
        cfg, visual_ops=VisualOpConfig(mode=mode, token_ids=tuple(token_ids), layer=layer, head_dim=head_dim, **kw)
    )
