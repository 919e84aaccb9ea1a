"""Evaluation: greedy decoding on a held-out split, boxed-answer accuracy overall and per task,
functional-token usage, and heat maps of the visual-operation modules' attention.

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft --config.job=eval

As a job it evaluates the newest checkpoint in the workdir; trainers call `evaluate` directly.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from PIL import Image

from atlas_jax import builders, checkpoint, heatmaps, sampling
from atlas_jax import functional_tokens as ft
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import pipeline
from atlas_jax.rl import rewards

log = logging.getLogger("atlas_jax")


def evaluate(graphdef, params, tok, c: mlc.ConfigDict, workdir: str, mesh, *, tag: str, split: str | None = None) -> dict:
    """Greedy-decodes `c.eval.num_per_task` prompts per task of `split`; returns (and writes to
    WORKDIR/eval_<tag>.json) accuracy overall / per task and functional-token usage."""
    split = split or c.eval.split
    model_cfg = graphdef_cfg(graphdef, params)
    src = builders.source(c, workdir, split)
    picked = _per_task(src, c.eval.num_per_task, c.eval.batch_size)
    pcfg = builders.pipeline_config(c, model_cfg, fmt="rl", batch_size=c.eval.batch_size, shuffle=False, num_epochs=1)
    ds = pipeline.make_dataset(_Subset(src, picked), tok, pcfg, model_cfg, source_name=f"{split} (eval subset)")

    names = tuple(c.model.functional_tokens)
    func_ids = tokenizer_lib.functional_token_ids(tok, ft.by_name(names))
    stop = tuple(i for i in (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None)
    with_maps = model_cfg.visual_ops.enabled and c.eval.heatmaps > 0
    scfg = sampling.SamplingConfig(
        max_new_tokens=c.eval.max_new_tokens, greedy=True, stop_ids=stop, pad_id=tok.pad_token_id or 0, return_op_attention=with_maps
    )
    correct, count = collections.Counter(), collections.Counter()
    usage = collections.Counter()
    completions_with_func = 0
    rows = []
    seen = set()
    for host in ds:
        batch = pipeline.to_global(host, mesh)
        out = jax.device_get(sampling.generate(graphdef, params, batch, None, scfg))
        for r in range(out["tokens"].shape[0]):
            if host["uid"][r] in seen:  # padding of the last batch repeats earlier samples
                continue
            seen.add(host["uid"][r])
            ids = out["tokens"][r][out["mask"][r]].tolist()
            text = tok.decode([i for i in ids if i not in stop], skip_special_tokens=False)
            ok = rewards.accuracy_reward(text, host["answer"][r])
            task = host["task"][r]
            correct[task] += ok
            count[task] += 1
            n_func = 0
            for name, fid in zip(names, func_ids):
                k = ids.count(fid)
                usage[name] += k
                n_func += k
            completions_with_func += n_func > 0
            rows.append({"uid": host["uid"][r], "task": task, "answer": host["answer"][r], "completion": text, "correct": ok})
            if with_maps and len(rows) <= c.eval.heatmaps:
                _save_heatmaps(src, host, out, r, len(rows) - 1, names, func_ids, tok, workdir, tag)
    n = max(sum(count.values()), 1)
    results = {
        "accuracy": sum(correct.values()) / n,
        **{f"accuracy/{t}": correct[t] / count[t] for t in sorted(count)},
        "functional_per_completion": sum(usage.values()) / n,
        "completions_with_functional": completions_with_func / n,
        **{f"functional/{k}": usage[k] / n for k in names},
        "num_samples": sum(count.values()),
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{tag}.json"), "w") as f:
            json.dump({"results": results, "samples": rows}, f, indent=1)
    log.info("eval %s on %s: accuracy %.3f, functional tokens per completion %.2f", tag, split, results["accuracy"], results["functional_per_completion"])
    return results


def graphdef_cfg(graphdef, params):
    return nnx.merge(graphdef, params).cfg


def _per_task(src, num_per_task: int, batch_size: int) -> list[int]:
    """Indices of the first `num_per_task` records of every task, padded (with repeats, skipped
    when scoring) to a whole number of batches."""
    taken: dict[str, int] = collections.Counter()
    picked = []
    for i in range(len(src)):
        task = src[i]["task"]
        if taken[task] < num_per_task:
            taken[task] += 1
            picked.append(i)
    n = len(picked)
    picked += [picked[k % n] for k in range((-n) % batch_size)]
    return picked


class _Subset:
    """The records `indices` of a random-access source, in that order."""

    def __init__(self, src, indices: list[int]):
        self.src, self.indices = src, indices
        self.source = getattr(src, "source", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.src[self.indices[i]]


def _save_heatmaps(src, host, out, r, k, names, func_ids, tok, workdir, tag) -> None:
    """One PNG per evaluated sample: the image and one panel per functional token generated."""
    ops = out["op"][r]
    if not (ops >= 0).any() or jax.process_index() != 0:
        return
    processed = _first_image(host, r)
    grid = host["grid_thw"][r][0]
    panels = [processed]
    for n in np.flatnonzero(ops >= 0)[:6]:
        name = names[int(ops[n])]
        panels.append(heatmaps.overlay(processed, out["op_attention"][r, n], grid, title=f"{name} @ {n}"))
    os.makedirs(os.path.join(workdir, "heatmaps"), exist_ok=True)
    heatmaps.strip(panels).save(os.path.join(workdir, "heatmaps", f"{tag}_{k:02d}_{host['task'][r]}.png"))


def _first_image(host, r) -> Image.Image:
    """The sample's first image, reconstructed from its (normalised) pixel patches."""
    from atlas_jax.data.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    t, h, w = (int(x) for x in host["grid_thw"][r][0])
    rows = host["pixel_values"][r][: h * w]  # [h*w, C*tp*14*14], the processor's patch order
    # rows: (block_h, block_w, in_h, in_w) x (channel, temporal, y, x); keep the first temporal copy.
    x = rows.reshape(h // 2, w // 2, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]
    x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(h * 14, w * 14, 3)
    x = x * np.asarray(OPENAI_CLIP_STD) + np.asarray(OPENAI_CLIP_MEAN)
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    mesh = builders.mesh(c)
    builders.build_data(c, workdir)
    tok = builders.tokenizer(c, workdir)
    model = builders.model(c, tok, mesh)
    graphdef, params = nnx.split(model)
    source = workdir if checkpoint.Checkpointer(workdir).latest_step() is not None else c.checkpoint.init_from
    if source:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
        params = checkpoint.init_from(source, abstract)
        log.info("evaluating the parameters of %s", source)
    return evaluate(graphdef, params, tok, c, workdir, mesh, tag="final")
