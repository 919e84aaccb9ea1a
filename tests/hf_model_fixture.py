"""Tiny random Qwen2.5-VL checkpoints built locally with `transformers` (no hub), and batches
that feed the same inputs to the PyTorch reference and to the JAX model."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model.config import ModelConfig
from atlas_jax.model.rope import mrope_positions
from atlas_jax.model.vision_layout import batch_vision_layout

IMAGE, VIDEO, VSTART, VEND = 300, 301, 302, 303
VOCAB = 320


def hf_config(tie: bool = False, vocab: int = VOCAB, ids: tuple[int, int, int, int] = (IMAGE, VIDEO, VSTART, VEND)) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            max_position_embeddings=2048,
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=56,
        ),
        image_token_id=ids[0],
        video_token_id=ids[1],
        vision_start_token_id=ids[2],
        vision_end_token_id=ids[3],
        tie_word_embeddings=tie,
    )


def make_hf_checkpoint(path: str, *, tie: bool = False, seed: int = 0, **cfg_kw) -> Qwen2_5_VLForConditionalGeneration:
    """Saves a random tiny Qwen2.5-VL to `path` (safetensors) and returns the torch model (eval, float32)."""
    torch.manual_seed(seed)
    cfg = hf_config(tie, **cfg_kw)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so parity checks every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    return model


@dataclasses.dataclass
class Example:
    """One sequence: token ids and its images as HF-processor-style patch rows."""

    ids: list[int]
    pixel_rows: list[np.ndarray]  # per image float32[t*h*w, C]
    grids: list[tuple[int, int, int]]


def example(rng: np.random.Generator, text_before: int, grids: list[tuple[int, int, int]], text_after: int, C=1176, image_ids=(IMAGE, VSTART, VEND)) -> Example:
    ids = list(rng.integers(0, 256, text_before))
    rows = []
    image, vstart, vend = image_ids
    for t, h, w in grids:
        ids += [vstart] + [image] * (t * h * w // 4) + [vend]
        rows.append(rng.standard_normal((t * h * w, C)).astype(np.float32))
        ids += list(rng.integers(0, 256, 3))
    ids += list(rng.integers(0, 256, text_after))
    return Example([int(i) for i in ids], rows, list(grids))


def jax_batch(examples: list[Example], cfg: ModelConfig, *, pad_left: bool, length: int | None = None, max_patches: int | None = None):
    """A padded batch (`device_batch` layout): ids, positions, mask, pixel_values, layout arrays."""
    T = length or max(len(e.ids) for e in examples)
    B = len(examples)
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        sl = slice(T - n, T) if pad_left else slice(0, n)
        ids[b, sl], mask[b, sl] = e.ids, True
    pos = np.stack(
        [mrope_positions(ids[b], e.grids, mask[b], image_token_id=cfg.image_token_id, spatial_merge_size=2) for b, e in enumerate(examples)]
    )
    out = dict(input_ids=ids, positions=pos, attention_mask=mask)
    if any(e.grids for e in examples):
        P = max_patches or max(max(sum(r.shape[0] for r in e.pixel_rows) for e in examples), 4)
        pv = np.zeros((B, P, examples[0].pixel_rows[0].shape[1] if examples[0].pixel_rows else 1176), np.float32)
        for b, e in enumerate(examples):
            if e.pixel_rows:
                rows = np.concatenate(e.pixel_rows)
                pv[b, : rows.shape[0]] = rows
        out["pixel_values"] = pv
        out.update(batch_vision_layout([e.grids for e in examples], cfg.vision, P))
    return out


def hf_logits(model, e: Example) -> np.ndarray:
    """Reference logits float32[T, V] of one unpadded example (HF computes M-RoPE itself)."""
    ids = torch.tensor([e.ids])
    kw = {}
    if e.grids:
        kw = dict(
            pixel_values=torch.from_numpy(np.concatenate(e.pixel_rows)),
            image_grid_thw=torch.tensor(e.grids),
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
        )
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return out.logits[0].float().numpy()


def jax_logits(model, batch) -> np.ndarray:
    """The JAX model's logits float32[B, T, V] on a `jax_batch`."""
    args, kw = model_inputs(jax.tree.map(jnp.asarray, batch))
    logits, _, _ = model(*args, **kw)
    return np.asarray(logits)


def assert_logits_match(model, torch_model, examples: list[Example], *, pad_left: bool, atol: float = 1e-4) -> None:
    """The JAX model on a padded batch of `examples` gives the reference's logits on each one alone
    (max abs difference <= atol at every real position)."""
    batch = jax_batch(examples, model.cfg, pad_left=pad_left)
    got = jax_logits(model, batch)
    T = batch["input_ids"].shape[1]
    for b, e in enumerate(examples):
        n = len(e.ids)
        sl = slice(T - n, T) if pad_left else slice(0, n)
        np.testing.assert_allclose(got[b, sl], hf_logits(torch_model, e), atol=atol, rtol=0, err_msg=f"example {b}")


def one_device_mesh():
    from atlas_jax import sharding

    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL checkpoint directory written by `transformers` (one per test module)."""
    path = str(tmp_path_factory.mktemp("hf_src"))
    make_hf_checkpoint(path, seed=2)
    return path
