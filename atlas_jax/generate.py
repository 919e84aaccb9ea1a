"""One answer from a model, with its functional tokens and the visual-op heat maps.

    python -m atlas_jax.generate --checkpoint=/runs/atlas_sft --image=chart.png --question="What is the total?"
    python -m atlas_jax.generate --checkpoint=/models/Qwen2.5-VL-7B-Instruct --image=a.png --image=b.png \\
        --question="Which image is brighter?" --out=/tmp/generated

--checkpoint is a run's workdir (its newest checkpoint, built with the model, tokenizer and
image settings of its config.json) or a Hugging Face Qwen2.5-VL directory (the paper's image
bounds). Decoding is greedy. The question is untrusted text: a `<|Line|>` typed in it stays
those characters, never the functional token. The trajectory is printed with its functional
tokens, and each functional token's visual-op attention is drawn over the image(s) into
OUT/heatmaps/ (models with visual-op modules).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

flags.DEFINE_string("checkpoint", None, "A run's workdir or a Hugging Face Qwen2.5-VL checkpoint directory.")
flags.DEFINE_multi_string("image", [], "An image file shown before the question (repeat for several, in order).")
flags.DEFINE_string("question", None, "The question (untrusted text).")
flags.DEFINE_string("out", "atlas_generate", "Directory for the heat maps.")
flags.DEFINE_integer("max_new_tokens", 1024, "The decoding budget.")
flags.DEFINE_integer("max_pixels", 0, "> 0: bound on each image's resized area (default: the run's, or the paper's).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A generated answer. ids: the completion's tokens (the stop token included); functional:
    (position in ids, name) of each functional token; prompt_ids: the prompt's tokens; op int32[N]
    and op_attention float32[N, P] (None without visual-op modules): the operation acting at each
    completion position and its attention over the prompt's P merged image tokens."""

    text: str
    ids: list[int]
    functional: list[tuple[int, str]]
    prompt_ids: list[int]
    op: np.ndarray | None
    op_attention: np.ndarray | None


def checkpoint_config(checkpoint_dir: str):
    """(run config, workdir) that rebuild the checkpoint's model: a run's workdir is its own
    workdir, with the `model`, `tokenizer` and `data` sections of its config.json; a Hugging Face
    directory becomes `model.init_from_hf`, with no workdir (None)."""
    from atlas_jax import run_config
    from atlas_jax.model.config import ConfigError

    c = run_config.base()
    if not os.path.isdir(os.path.join(checkpoint_dir, "checkpoints")):
        if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
            raise ConfigError(f"--checkpoint={checkpoint_dir!r}: expected a run's workdir (with checkpoints/) or a "
                              "Hugging Face checkpoint directory (with config.json)")
        c.model.init_from_hf = checkpoint_dir
        return c, None
    saved = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(saved):
        raise ConfigError(f"--checkpoint={checkpoint_dir!r} has checkpoints but no config.json (the run config its job "
                          "writes), so its model cannot be rebuilt; expected a run's workdir or a Hugging Face directory")
    with open(saved) as f:
        run = json.load(f)
    for section in ("model", "tokenizer", "data"):
        c[section].update(run.get(section, {}))
    return c, checkpoint_dir


def load(checkpoint_dir: str, max_pixels: int = 0):
    """(policy, image processor config, mesh) for `--checkpoint`: the newest parameters of a run's
    workdir with the image bounds it trained on, or a Hugging Face directory with the paper's
    (`BenchmarkConfig`); max_pixels > 0 overrides the bound (and caps min_pixels at it)."""
    from atlas_jax import builders
    from atlas_jax.benchmarks.protocol import BenchmarkConfig
    from atlas_jax.data import image_processing

    c, workdir = checkpoint_config(checkpoint_dir)
    mesh = builders.make_mesh(c)
    with tempfile.TemporaryDirectory() as scratch:  # an HF checkpoint's tokenizer, with the functional tokens
        policy = builders.load_policy(c, workdir or scratch, mesh)
    if workdir:
        image_cfg = builders.make_pipeline_config(c, policy.model_cfg, fmt="rl").image
    else:
        image_cfg = image_processing.ImageProcessorConfig.for_vision(
            policy.model_cfg.vision, min_pixels=BenchmarkConfig.min_pixels, max_pixels=BenchmarkConfig.max_pixels)
    if max_pixels > 0:
        image_cfg = dataclasses.replace(image_cfg, max_pixels=max_pixels, min_pixels=min(image_cfg.min_pixels, max_pixels))
    return policy, image_cfg, mesh


def generate(policy, images: list, question: str, image_cfg, mesh, max_new_tokens: int) -> Trajectory:
    """Greedy-decodes the answer to `question` about `images` (PIL). The prompt fills every row of
    the mesh's batch shards (the sampler's batch contract); row 0 is returned."""
    import jax

    from atlas_jax import multihost, sampling
    from atlas_jax.jobs.benchmark import PromptBatcher, prompt_shape

    shape = prompt_shape([im.size for im in images], question, policy.tok, image_cfg)
    per_host = max(mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count(), 1)
    batch = PromptBatcher(policy, image_cfg, [shape], max(len(images), 1), pad_to_multiple=0)([(images, question)] * per_host, mesh)
    with_maps = policy.model_cfg.visual_ops.enabled and bool(images)
    tokens = policy.tokens
    scfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, stop_ids=tokens.stop_ids,
                                   pad_id=tokens.pad_id, return_op_attention=with_maps)
    out = multihost.gather({k: v for k, v in sampling.generate(policy.graphdef, policy.params, batch, None, scfg).items()
                            if k in ("tokens", "mask", "prompt_ids", "prompt_mask", "op", "op_attention")})
    ids = out["tokens"][0][out["mask"][0]].tolist()
    names = dict((i, n) for n, i in tokens.functional)
    return Trajectory(
        text=policy.tok.decode([i for i in ids if i not in tokens.stop_ids], skip_special_tokens=False),
        ids=ids, functional=[(n, names[i]) for n, i in enumerate(ids) if i in names],
        prompt_ids=out["prompt_ids"][0][out["prompt_mask"][0]].tolist(),
        op=out["op"][0] if with_maps else None, op_attention=out["op_attention"][0] if with_maps else None,
    )


def save_heatmaps(trajectory: Trajectory, images: list, image_cfg, names: tuple[str, ...], out_dir: str) -> list[str]:
    """One PNG per functional token whose operation acted (every one but a last-position token):
    its attention drawn over each image, side by side. Returns the paths."""
    from atlas_jax import heatmaps
    from atlas_jax.data.image_processing import image_grid, num_image_tokens

    if trajectory.op is None:
        return []
    grids = [image_grid(*im.size, image_cfg) for im in images]
    ends = np.cumsum([num_image_tokens(g, image_cfg.merge_size) for g in grids])
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for k, m in enumerate(np.flatnonzero(trajectory.op >= 0)):
        title = f"{names[int(trajectory.op[m])]} @ token {m}"
        panels = [heatmaps.overlay(im, trajectory.op_attention[m, end - n:end], grid, merge=image_cfg.merge_size, title=title)
                  for im, grid, end, n in zip(images, grids, ends, np.diff(ends, prepend=0))]
        paths.append(os.path.join(out_dir, f"{k:02d}_{names[int(trajectory.op[m])]}_token{m}.png"))
        heatmaps.strip(panels).save(paths[-1])
    return paths


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.checkpoint or FLAGS.question is None:
        raise app.UsageError("--checkpoint and --question are required")
    from atlas_jax import checkpoint, hf_checkpoint
    from atlas_jax.data import image_processing
    from atlas_jax.data.records import decode_image
    from atlas_jax.data.sample import BadRecordError
    from atlas_jax.model.config import ConfigError

    try:
        images = []
        for path in FLAGS.image:
            with open(path, "rb") as f:
                images.append(decode_image(f.read(), path, "the file", "--image"))
        policy, image_cfg, mesh = load(FLAGS.checkpoint, FLAGS.max_pixels)
        trajectory = generate(policy, images, FLAGS.question, image_cfg, mesh, FLAGS.max_new_tokens)
    except (ConfigError, BadRecordError, OSError, image_processing.ImageError,
            checkpoint.CheckpointError, hf_checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = save_heatmaps(trajectory, images, image_cfg, policy.tokens.functional_names, os.path.join(FLAGS.out, "heatmaps"))
    print(trajectory.text)
    print(f"\n[{len(trajectory.ids)} tokens; functional tokens: "
          + (", ".join(f"{name} at {n}" for n, name in trajectory.functional) or "none") + "]")
    for path in paths:
        print(f"heat map: {path}")


if __name__ == "__main__":
    app.run(main)
