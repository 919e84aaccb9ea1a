"""Dense perception pretraining: a tiny starting point that can see (the miniature's Qwen2.5-VL).

    python -m atlas_jax.main --config=configs/perceive_synthetic.py --workdir=/tmp/perceive

Reads top to bottom: train -> export -> check.
  - train: the SFT job itself (`jobs/sft.py`, same step, checkpoints, resume) on the unlimited,
    seeded perception stream (`data.source='perception'`, `data/synthetic/perception.py`);
  - export: the final parameters as a Qwen2.5-VL checkpoint directory WORKDIR/hf (config.json,
    model.safetensors, tokenizer files; `hf_checkpoint.to_hf`). It holds no functional tokens,
    so a run with `model.init_from_hf=WORKDIR/hf` extends it exactly as it extends
    Qwen2.5-VL-7B (`builders.make_model` -> `extend.add_functional_tokens`);
  - check: on held-out perception prompts, the share answered exactly (teacher-forced argmax of
    every response token: what greedy decoding answers) with each prompt's own image, with
    another sample's image (image swap), and by the image-blind prior; WORKDIR/perception.json,
    and WORKDIR/hf/MANIFEST.json with every file's sha256 (`atlas_jax.pretrained`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from atlas_jax import builders, hf_checkpoint, multihost, pretrained, run_config
from atlas_jax.data import pipeline
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.data.synthetic import perception
from atlas_jax.jobs import sft
from atlas_jax.jobs.results import wilson_interval
from atlas_jax.train import token_logprobs

log = logging.getLogger("atlas_jax")
HF_DIR = "hf"
COMMAND = "python -m atlas_jax.main --config=configs/perceive_synthetic.py --workdir=WORKDIR  # -> WORKDIR/hf"
PRIOR_SAMPLES = 4096  # training samples the image-blind prior's majority answers are counted on


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    # ------------------------------------------------------------------ train (the SFT job)
    # Its task-suite evaluation does not apply; the perception check below uses eval.num_per_task.
    sft.main(run_config.apply_overrides(c, {"eval.num_per_task": 0, "eval.every": 0}), workdir)

    # ------------------------------------------------------------------ export
    mesh = builders.make_mesh(c)
    policy = builders.load_policy(c, workdir, mesh)
    out = os.path.join(workdir, HF_DIR)
    hf_checkpoint.to_hf(nnx.merge(policy.graphdef, policy.params), out, tokenizer=policy.tok)
    log.info("exported the perception-pretrained model to %s (load it with --config.model.init_from_hf=%s)", out, out)

    # ------------------------------------------------------------------ check
    held = [perception.generate("held_out", i, c.seed, c.data.image_size) for i in range(c.eval.num_per_task)]
    report = check(policy, c, held, mesh)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "perception.json"), "w") as f:
            json.dump(report, f, indent=2)
        headline = {k: report[k] for k in ("num_samples", "accuracy", "accuracy_interval", "image_swap", "prior")}
        pretrained.write_manifest(out, command=COMMAND, seed=c.seed, steps=c.train.steps, held_out_check=headline)
    log.info("held-out perception: exact %.3f, image swap %.3f, image-blind prior %.3f (%d prompts)",
             report["accuracy"], report["image_swap"], report["prior"], report["num_samples"])
    return report


def check(policy: builders.Policy, c: mlc.ConfigDict, held: list, mesh) -> dict:
    """Exact-answer accuracy of `held` (perception Samples, a multiple of `eval.batch_size`) with
    own images, swapped images and the image-blind prior; overall, per question kind, with 95%
    intervals for the overall figures; and teacher-forced token accuracy."""
    own, swapped = score(policy, c, held, mesh), score(policy, c, image_swapped(held, c.eval.batch_size), mesh)
    prior = image_blind_prior(held, c.seed, c.data.image_size)
    kinds = sorted({s.task for s in held})
    report = {"num_samples": len(held)}
    for name, hits in (("accuracy", own["exact"]), ("image_swap", swapped["exact"]), ("prior", prior)):
        report[name] = float(np.mean(hits))
        report[f"{name}_interval"] = wilson_interval(int(np.sum(hits)), len(hits))
        report[f"{name}_per_kind"] = {k: float(np.mean([h for h, s in zip(hits, held) if s.task == k])) for k in kinds}
    report["token_accuracy"] = own["token_accuracy"]
    report["token_accuracy_image_swap"] = swapped["token_accuracy"]
    return report


def image_swapped(samples: list, batch_size: int) -> list:
    """The samples, each with the image of the next sample in its batch (the last takes the first's)."""
    out = []
    for start in range(0, len(samples), batch_size):
        block = samples[start:start + batch_size]
        out += [dataclasses.replace(s, images=block[(j + 1) % len(block)].images) for j, s in enumerate(block)]
    return out


def score(policy: builders.Policy, c: mlc.ConfigDict, samples: list, mesh) -> dict:
    """{'exact': bool per sample (every response token is the argmax), 'token_accuracy'} of the
    samples, teacher-forced, in whole `eval.batch_size` batches."""
    n = c.eval.batch_size
    if not samples or len(samples) % n:
        raise ValueError(f"{len(samples)} perception samples: expected a positive multiple of eval.batch_size={n}")
    pcfg = builders.make_pipeline_config(c, policy.model_cfg, fmt="sft", batch_size=n, shuffle=False, num_epochs=1)
    ds = pipeline.make_dataset(samples, policy.tok, policy.tokens, pcfg, policy.model_cfg, source_name="perception/held_out")
    fn = _scorer(policy.graphdef)
    exact, right, total = [], 0, 0
    for host in ds:
        batch = {k: v for k, v in pipeline.to_global(host, mesh).items() if isinstance(v, jax.Array)}
        with jax.set_mesh(mesh):
            e, r, t = multihost.gather(fn(policy.params, batch))  # every host's rows, in stream order
        exact += [bool(x) for x in e]
        right, total = right + int(r.sum()), total + int(t.sum())
    return {"exact": exact, "token_accuracy": right / max(total, 1)}


@functools.cache
def _scorer(graphdef: nnx.GraphDef):
    @jax.jit
    def per_sample(params, batch):
        """(bool[B] all response tokens argmax-correct, int[B] correct tokens, int[B] response tokens)."""
        model = nnx.merge(graphdef, params)
        args, kw = model_inputs(batch)
        hidden, _, _ = model(*args, head=False, **kw)
        _, hit_bt = token_logprobs.target_logprobs(hidden[:, :-1], model.output_head(), batch["input_ids"][:, 1:])
        mask_bt = batch["loss_mask"][:, 1:]
        return jnp.all(hit_bt | ~mask_bt, axis=1), jnp.sum(hit_bt & mask_bt, axis=1), jnp.sum(mask_bt, axis=1)

    return per_sample


def image_blind_prior(held: list, seed: int, image_size: int, num_train: int = PRIOR_SAMPLES) -> list[bool]:
    """Per held-out sample, whether the best image-blind guess is right: the response most often
    given to the same question in `num_train` training samples (the prior a model that ignores
    the image converges to)."""
    by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(num_train):
        s = perception.generate("train", i, seed, image_size)
        by_question[s.question][s.response] += 1
    return [bool(by_question[s.question]) and by_question[s.question].most_common(1)[0][0] == s.response for s in held]
