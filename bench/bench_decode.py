"""Decode throughput of `atlas_jax.sampling.generate` vs `transformers`' `generate` (PyTorch).

Both sides run greedy decoding of the same random Qwen2.5-VL weights (built with `transformers`,
saved as safetensors, loaded into JAX with `hf_checkpoint.from_hf`) on the same batch of prompts,
each holding one image, with the same prompt length and number of new tokens (no stop token:
every row decodes exactly N tokens). Configs: the `tiny` and `small_100m` presets.

Reported per side: end-to-end generate time for N tokens, and decode tokens/s measured as
B * (N - 1) / (t(N) - t(1)), which removes the prefill (vision tower + prompt) from the rate.
Also reports the fraction of greedy tokens that agree (random weights have near-ties, so a
few late divergences are expected; the first tokens should agree).

    python bench/bench_decode.py                      # both configs, B=8, N=32
    python bench/bench_decode.py --configs tiny --batch 16 --new-tokens 64

Run it alone on the machine: JAX's CPU backend uses every core, and torch is given the same
number of threads (`--threads`, default os.cpu_count()). On a machine shared with other jobs,
torch's OpenMP threads slow HF's many small per-step ops down several-fold; `--threads 1` gives
HF's best case on the tiny config. At ~100M parameters and batch 8, a float32 decode step is
bound by reading the weights from memory (~0.36 GB per step), on both sides.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from atlas_jax import hf_checkpoint, sampling
from atlas_jax.model import presets
from atlas_jax.model.rope import mrope_positions
from atlas_jax.model.vision_layout import batch_vision_layout

GRID = (1, 8, 8)  # one 112x112 image: 64 patches, 16 merged tokens


def special_ids(vocab: int) -> dict[str, int]:
    return dict(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)


def build_checkpoint(preset: str, path: str, seed: int = 0):
    """A random HF model of the preset's shape, saved to `path`; returns the torch model."""
    vocab = presets.get(preset).text.vocab_size
    cfg = presets.get(preset, **special_ids(vocab))
    torch.manual_seed(seed)
    # No bos/eos: the checkpoint has no tokenizer, and every row decodes exactly N tokens.
    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict(), bos_token_id=None, eos_token_id=None)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    model.save_pretrained(path)
    return model, cfg


def make_prompts(cfg, batch: int, text_before: int, text_after: int, seed: int = 0):
    """B prompts of equal length: text, <vision_start> image tokens <vision_end>, text."""
    rng = np.random.default_rng(seed)
    t, h, w = GRID
    n_img = t * h * w // 4
    ids = np.concatenate(
        [
            rng.integers(0, 256, (batch, text_before)),
            np.full((batch, 1), cfg.vision_start_token_id),
            np.full((batch, n_img), cfg.image_token_id),
            np.full((batch, 1), cfg.vision_end_token_id),
            rng.integers(0, 256, (batch, text_after)),
        ],
        axis=1,
    ).astype(np.int32)
    pixels = rng.standard_normal((batch, t * h * w, 3 * 2 * 14 * 14)).astype(np.float32)
    mask = np.ones(ids.shape, bool)
    pos = np.stack([mrope_positions(ids[b], [GRID], image_token_id=cfg.image_token_id, spatial_merge_size=2) for b in range(batch)])
    jax_batch = dict(input_ids=ids, attention_mask=mask, positions=pos, pixel_values=pixels,
                     **batch_vision_layout([[GRID]] * batch, cfg.vision, t * h * w))
    hf_kw = dict(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        pixel_values=torch.from_numpy(pixels.reshape(-1, pixels.shape[-1])),
        image_grid_thw=torch.tensor([GRID] * batch),
        # transformers 5 places M-RoPE image positions only where this marks image tokens.
        mm_token_type_ids=torch.from_numpy(ids == cfg.image_token_id).int(),
    )
    return jax_batch, hf_kw


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hf(model, hf_kw, n: int, repeats: int):
    def run(k):
        with torch.no_grad():
            return model.generate(**hf_kw, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, eos_token_id=None)

    out = run(n)  # warm-up and the tokens
    t_n = best_time(lambda: run(n), repeats)
    t_1 = best_time(lambda: run(1), repeats)
    return out[:, hf_kw["input_ids"].shape[1]:].numpy(), t_n, t_1


def bench_jax(model, batch, n: int, repeats: int):
    graphdef, state = nnx.split(model)

    def run(k):
        out = sampling.generate(graphdef, state, batch, None, sampling.SamplingConfig(max_new_tokens=k, greedy=True))
        return jax.block_until_ready(out)["tokens"]

    tokens = run(n)  # compile
    run(1)
    t_n = best_time(lambda: run(n), repeats)
    t_1 = best_time(lambda: run(1), repeats)
    return np.asarray(tokens), t_n, t_1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small_100m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text", type=int, default=24, help="text tokens around the image in each prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; cpu_count={os.cpu_count()}; batch={args.batch} new_tokens={args.new_tokens}")
    rows = []
    for preset in args.configs.split(","):
        with tempfile.TemporaryDirectory() as d:
            hf_model, cfg = build_checkpoint(preset, d)
            jax_model = hf_checkpoint.from_hf(d)
        n_params = sum(p.numel() for p in hf_model.parameters())
        batch, hf_kw = make_prompts(jax_model.cfg, args.batch, args.text // 2, args.text - args.text // 2)
        tp = batch["input_ids"].shape[1]
        hf_tok, hf_n, hf_1 = bench_hf(hf_model, hf_kw, args.new_tokens, args.repeats)
        jx_tok, jx_n, jx_1 = bench_jax(jax_model, batch, args.new_tokens, args.repeats)
        dec = lambda t_n, t_1: args.batch * (args.new_tokens - 1) / max(t_n - t_1, 1e-9)  # noqa: E731
        agree = float((hf_tok == jx_tok).mean())
        first = float((hf_tok[:, 0] == jx_tok[:, 0]).mean())
        rows.append((preset, n_params, tp, hf_n, jx_n, dec(hf_n, hf_1), dec(jx_n, jx_1), agree, first))
        del hf_model, jax_model

    print(f"\n{'config':11s} {'params':>8s} {'Tp':>4s} {'HF gen s':>9s} {'JAX gen s':>9s} {'HF dec tok/s':>12s} "
          f"{'JAX dec tok/s':>13s} {'ratio':>6s} {'e2e ratio':>9s} {'agree':>6s} {'first':>6s}")
    for preset, n_params, tp, hf_n, jx_n, hf_d, jx_d, agree, first in rows:
        print(f"{preset:11s} {n_params / 1e6:7.1f}M {tp:4d} {hf_n:9.3f} {jx_n:9.3f} {hf_d:12.1f} {jx_d:13.1f} "
              f"{jx_d / hf_d:5.1f}x {hf_n / jx_n:8.1f}x {agree:6.2f} {first:6.2f}")


if __name__ == "__main__":
    main()
