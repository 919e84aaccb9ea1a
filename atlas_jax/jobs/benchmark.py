"""Evaluation on the paper's benchmarks (V* Bench, WeMath, BLINK) from local files, with the
authors' protocol (`benchmarks.protocol`: greedy, 8192 new tokens, the boxed-answer suffix).

    python -m atlas_jax.main --config=configs/la_grpo_qwen25vl_7b.py --workdir=/runs/atlas_rl \\
        --config.job=benchmark --config.benchmark.vstar=/data/vstar_bench \\
        --config.benchmark.wemath=/data/We-Math/testmini.json --config.benchmark.blink=/data/BLINK

It evaluates the newest checkpoint in the workdir (else `checkpoint.init_from`, else the
`model.init_from_hf` checkpoint as it is) and writes, per benchmark, WORKDIR/benchmarks/<name>.json
(protocol, table, every graded completion) and <name>.md, and WORKDIR/benchmarks/summary.md
with the paper's table beside this run's numbers. Every row of every file is read and checked,
and the judge imported, before the model is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections as mlc

from atlas_jax import builders, multihost, sampling
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.benchmarks import grading, loaders, tables
from atlas_jax.benchmarks.protocol import BenchmarkConfig
from atlas_jax.data import batching, image_processing, pipeline
from atlas_jax.data.sample import BadRecordError, Sample

log = logging.getLogger("atlas_jax")


def main(c: mlc.ConfigDict, workdir: str) -> dict[str, list[dict]]:
    """{benchmark: its table rows (`tables.table`)}."""
    # ------------------------------------------------------------------ questions, judge
    cfg = BenchmarkConfig(**{**c.benchmark.to_dict(), "blink_subsets": tuple(c.benchmark.blink_subsets)})
    judge = grading.load_judge(cfg.judge) if cfg.judge else None
    benchmarks = loaders.load(cfg)

    # ------------------------------------------------------------------ mesh, model
    mesh = builders.make_mesh(c)
    policy = builders.load_policy(c, workdir, mesh)

    # ------------------------------------------------------------------ decode, grade, write
    out_dir = os.path.join(workdir, "benchmarks")
    results = {}
    for name, items in benchmarks.items():
        samples = evaluate(policy, items, cfg, judge, mesh, pad_to_multiple=c.data.pad_to_multiple)
        results[name] = tables.table(samples)
        overall = next(r for r in results[name] if r["subset"] == "all")
        log.info("%s: accuracy %.1f%% over %d questions", name, 100 * overall["accuracy"], len(samples))
        if jax.process_index() == 0:
            _write(out_dir, name, cfg, policy.source, results[name], samples)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(f"# Benchmarks of {policy.source}\n\n## Beside the paper's table (accuracy, %)\n\n"
                    f"{tables.paper_comparison(results)}\n")
            f.writelines(f"\n## {name}\n\n{tables.markdown(rows)}\n" for name, rows in results.items())
    return results


def evaluate(policy: builders.Policy, items: list[loaders.BenchmarkItem], cfg: BenchmarkConfig, judge, mesh, *,
             pad_to_multiple: int = 64) -> list[dict]:
    """Greedy-decodes every question of `items` (global batches of `cfg.batch_size`; host h
    builds rows [h*b, (h+1)*b) of each) and grades each completion; returns one record per
    question, in order, the same on every host. length: completion tokens before the stop token."""
    image_cfg = image_processing.ImageProcessorConfig.for_vision(
        policy.model_cfg.vision, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    questions = [item.question(cfg.prompt_suffix) for item in items]
    shapes = []
    for item, question in zip(items, questions):
        try:
            shapes.append(prompt_shape(item.image_sizes(), question, policy.tok, image_cfg))
        except image_processing.ImageError as e:
            raise BadRecordError(item.source, item.row, "images", str(e)) from None
    batcher = PromptBatcher(policy, image_cfg, shapes, max(len(it.images) for it in items), pad_to_multiple)
    scfg = sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=True, stop_ids=policy.tokens.stop_ids,
                                   pad_id=policy.tokens.pad_id)
    batch_size = cfg.batch_size
    order = list(range(len(items))) + [k % len(items) for k in range((-len(items)) % batch_size)]  # repeats pad the last batch
    records: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = batcher([(items[i].load_images(), questions[i]) for i in rows[multihost.own_rows(batch_size)]], mesh)
        out = sampling.generate(policy.graphdef, policy.params, batch, None, scfg)
        completions, mask = multihost.gather((out["tokens"], out["mask"]))
        for i, row_tokens, row_mask in zip(rows, completions, mask):
            if i not in records:
                records[i] = _graded(items[i], questions[i], row_tokens[row_mask].tolist(), policy, judge)
    return [records[i] for i in range(len(items))]


def prompt_shape(image_sizes: list[tuple[int, int]], question: str, tok, image_cfg) -> tuple[int, int]:
    """(patches, prompt tokens) of a question about images of these (width, height) sizes, without
    decoding any pixels; an unusable image size raises `image_processing.ImageError`."""
    grids = [image_processing.image_grid(w, h, image_cfg) for w, h in image_sizes]
    counts = [image_processing.num_image_tokens(g, image_cfg.merge_size) for g in grids]
    return sum(t * h * w for t, h, w in grids), len(tokenizer_lib.encode_chat(tok, question, counts).input_ids)


class PromptBatcher:
    """This host's (images, question) prompts -> one global sampler batch (`pipeline.to_global`),
    built by the input pipeline's `ExampleBuilder` ('rl' format: left-padded prompts, the question
    untrusted text) and `collate`, padded to shapes that fit every prompt of `shapes`
    ((patches, prompt tokens) of each, `prompt_shape`): one compiled sampler per length bucket."""

    def __init__(self, policy: builders.Policy, image_cfg, shapes: list[tuple[int, int]], max_images: int, pad_to_multiple: int):
        tokens = policy.tokens
        self.builder = batching.ExampleBuilder(
            policy.tok, policy.model_cfg, image_cfg, source_name="prompt", fmt="rl",
            max_length=max(t for _, t in shapes), max_patches=max(p for p, _ in shapes), max_images=max_images, min_images=0,
            functional_ids=tokens.functional_ids, functional_strings=tokens.functional_strings,
        )
        # Every host must hand jax the same local shapes: several hosts pad to the longest prompt.
        self.collate = dict(fmt="rl", pad_id=tokens.pad_id, max_length=self.builder.max_length,
                            pad_to_multiple=pad_to_multiple if jax.process_count() == 1 else 0,
                            max_patches=self.builder.max_patches, max_images=max_images, patch_dim=image_cfg.patch_dim)

    def __call__(self, prompts: list[tuple[list, str]], mesh) -> dict:
        examples = [self.builder.build(k, Sample(images, question, "", "")) for k, (images, question) in enumerate(prompts)]
        return pipeline.to_global(batching.collate(examples, **self.collate), mesh)


def _graded(item: loaders.BenchmarkItem, question: str, ids: list[int], policy: builders.Policy, judge) -> dict:
    tokens = policy.tokens
    text_ids = [i for i in ids if i not in tokens.stop_ids]
    completion = policy.tok.decode(text_ids, skip_special_tokens=False)
    grade = grading.grade(completion, item, judge, question=question)
    return {
        "uid": item.uid, "subset": item.subset, "question": question, "reference": item.reference(),
        "predicted": grade.predicted, "correct": grade.correct, "method": grade.method, "completion": completion,
        "functional": {name: ids.count(fid) for name, fid in tokens.functional}, "length": len(text_ids),
        "stopped": len(text_ids) < len(ids),
    }


def _write(out_dir: str, name: str, cfg: BenchmarkConfig, source: str, rows: list[dict], samples: list[dict]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    protocol = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("vstar", "wemath", "blink")}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"benchmark": name, "checkpoint": source, "protocol": protocol, "table": rows, "samples": samples}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {name}: {source}\n\nGreedy, at most {cfg.max_new_tokens} new tokens, images in "
                f"[{cfg.min_pixels}, {cfg.max_pixels}] pixels; accuracy in %, lengths in tokens.\n\n{tables.markdown(rows)}\n")
