"""Evaluation: greedy decoding on a held-out split, boxed-answer accuracy overall and per task,
functional-token usage, heat maps of the visual-operation modules' attention, and how much of
that attention lands on the object the question is about (where the generator knows it).

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft --config.job=eval

As a job it evaluates the newest checkpoint in the workdir; trainers call `evaluate` directly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx
from PIL import Image

from atlas_jax import builders, checkpoint, heatmaps, multihost, run_config, sampling
from atlas_jax.data import device_batch, pipeline, records
from atlas_jax.rl import rewards

log = logging.getLogger("atlas_jax")
HEATMAP_SCALE = 3  # heat-map panels show the image 3x larger (a 112-px image: 336 px)


def evaluate(policy: builders.Policy, c: mlc.ConfigDict, workdir: str, mesh, *, tag: str, split: str | None = None) -> dict:
    """Greedy-decodes `run_config.eval_num_per_task` prompts per task of `split` with `policy`; returns (the same on
    every host) accuracy overall / per task, the image-swap control (`c.eval.image_swap`: the same
    prompts, or the first `c.eval.image_swap_num_per_task` of each task, each with the image of the
    next prompt in its batch, the last taking the first's; `image_swap_samples` of them) and
    functional-token usage, which process 0 also writes, with every scored sample, to
    WORKDIR/eval_<tag>.json.

    Each host scores the prompts it fed (its own answers); the scored samples of all hosts are
    gathered, batch by batch and host by host, which is the order of the eval stream, so the
    results do not depend on the number of hosts. Heat maps: see `_HeatMaps`.

    Localisation (a model with visual-op modules, records that carry `target_box`: the cell-scene
    families): for each sample whose completion holds a functional token, the attention of its
    first one over the image (the map the sampler already returns, no second pass) scored by
    `heatmaps.localisation` against the target object's tokens (`heatmaps.target_tokens`): per
    sample `op_target_share` / `op_target_chance` / `op_target_hit`, and in the results their
    means overall and per task (`op_target_share[/task]`, ...) over `op_target_count[/task]`
    samples (the share, chance and hit keys only where that count is > 0)."""
    split = split or c.eval.split
    model_cfg, tokens = policy.model_cfg, policy.tokens
    src = builders.load_split(c, workdir, split)
    picked, uids = _per_task(src, run_config.eval_num_per_task(c, split), c.eval.batch_size)
    names = tokens.functional_names
    maps = _HeatMaps(c, model_cfg, tokens, workdir, tag)
    # One sampler for both passes (the swap pass ignores the attention): compiled once. The modules'
    # attention is computed at every step anyway; returning it (for the heat maps and the
    # localisation metric) only keeps a float32[B, N, P] buffer.
    scfg = sampling.SamplingConfig(
        max_new_tokens=c.eval.max_new_tokens, greedy=True, stop_ids=tokens.stop_ids, pad_id=tokens.pad_id,
        return_op_attention=model_cfg.visual_ops.enabled,
    )
    targets = _targets(src, picked) if model_cfg.visual_ops.enabled else {}
    samples = _decode(policy, c, _Subset(src, picked), f"{split} (eval subset)", scfg, mesh, maps, targets)
    if c.eval.image_swap:
        # The first image_swap_num_per_task prompts of each task are the first ones of the picked prompts too.
        swap_picked = _per_task(src, c.eval.image_swap_num_per_task, c.eval.batch_size)[0] if c.eval.image_swap_num_per_task else picked
        swapped = _decode(policy, c, _ImageSwapped(src, swap_picked, c.eval.batch_size), f"{split} (image swap)", scfg, mesh)
        swap_correct = {row["uid"]: row["correct"] for row in swapped}
        for row in samples:
            if row["uid"] in swap_correct:
                row["image_swap_correct"] = swap_correct[row["uid"]]

    correct, swap, count, swap_count, usage = (collections.Counter() for _ in range(5))
    for row in samples:
        correct[row["task"]] += row["correct"]
        count[row["task"]] += 1
        if "image_swap_correct" in row:
            swap[row["task"]] += row["image_swap_correct"]
            swap_count[row["task"]] += 1
        usage.update(row["functional"])
    n = max(len(samples), 1)
    results = {
        "accuracy": sum(correct.values()) / n,
        **{f"accuracy/{t}": correct[t] / count[t] for t in sorted(count)},
        **({"image_swap": sum(swap.values()) / max(sum(swap_count.values()), 1), "image_swap_samples": sum(swap_count.values()),
            **{f"image_swap/{t}": swap[t] / swap_count[t] for t in sorted(swap_count)}}
           if c.eval.image_swap else {}),
        "functional_per_completion": sum(usage.values()) / n,
        "completions_with_functional": sum(sum(row["functional"].values()) > 0 for row in samples) / n,
        **{f"functional/{k}": usage[k] / n for k in names},
        "num_samples": len(samples),
        **(_localisation_results(samples, {row["task"] for row in samples if row["uid"] in targets}) if targets else {}),
    }
    maps.draw(policy.graphdef, policy.params, policy.tok, src, uids, samples, mesh)
    if jax.process_index() == 0:
        kept = ("uid", "task", "answer", "completion", "correct", "image_swap_correct", *_LOCALISATION_FIELDS)
        written = [{k: row[k] for k in kept if k in row} for row in samples]
        with open(os.path.join(workdir, f"eval_{tag}.json"), "w") as f:
            json.dump({"split": split, "results": results, "samples": written}, f, indent=1)
    log.info("eval %s on %s: accuracy %.3f (image swap %s), functional tokens per completion %.2f", tag, split,
             results["accuracy"], f"{results['image_swap']:.3f}" if c.eval.image_swap else "off",
             results["functional_per_completion"])
    if targets and results["op_target_count"]:
        log.info("eval %s on %s: first functional token's module attention on the target object %.3f (chance %.3f), "
                 "its argmax on it %.3f, over %d completions", tag, split, results["op_target_share"],
                 results["op_target_chance"], results["op_target_hit"], results["op_target_count"])
    return results


_LOCALISATION_FIELDS = ("op_target_share", "op_target_chance", "op_target_hit")


def _targets(src, picked: list[int]) -> dict[str, tuple[tuple[int, ...], tuple[int, int]]]:
    """uid -> (target_box, (width, height) of the first image) of the picked records that carry a
    target box (`records.TARGET_BOX_FIELD`); {} when none does."""
    targets = {}
    for i in picked:
        record = src[i]
        box = record.get(records.TARGET_BOX_FIELD)
        if box:
            with Image.open(io.BytesIO(record["images"][0])) as image:  # reads the header only
                targets[str(record["uid"])] = (tuple(box), image.size)
    return targets


def _localisation_results(samples: list[dict], tasks: set[str]) -> dict:
    """Means of the samples' localisation fields overall and per task of `tasks` (those whose
    records carry a target), with the count of samples measured."""
    out = {}
    for task in (None, *sorted(tasks)):
        rows = [row for row in samples if "op_target_share" in row and task in (None, row["task"])]
        suffix = "" if task is None else f"/{task}"
        out[f"op_target_count{suffix}"] = len(rows)
        if rows:
            out.update({f"{k}{suffix}": sum(float(row[k]) for row in rows) / len(rows) for k in _LOCALISATION_FIELDS})
    return out


def _decode(policy: builders.Policy, c: mlc.ConfigDict, src, source_name: str, scfg: sampling.SamplingConfig, mesh,
            maps: "_HeatMaps | None" = None, targets: dict | None = None) -> list[dict]:
    """Greedy completions of every record of `src` (whole eval batches, in order), scored; each uid
    once (the padding of the last batch repeats earlier records), every host's rows, in stream order.
    targets (`_targets`; needs `scfg.return_op_attention`): the rows of those uids whose completion
    holds a functional token also get the localisation fields of its first one's attention."""
    tok, model_cfg = policy.tok, policy.model_cfg
    names, func_ids, stop = policy.tokens.functional_names, policy.tokens.functional_ids, policy.tokens.stop_ids
    pcfg = builders.make_pipeline_config(c, model_cfg, fmt="rl", batch_size=c.eval.batch_size, shuffle=False, num_epochs=1)
    ds = pipeline.make_dataset(src, tok, policy.tokens, pcfg, model_cfg, source_name=source_name)
    me = jax.process_index()
    mine = []  # per batch: this host's scored samples, its block of the global batch
    for k, host in enumerate(ds):
        batch = pipeline.to_global(host, mesh)
        out = sampling.generate(policy.graphdef, policy.params, batch, None, scfg)
        completions, mask = multihost.gather((out["tokens"], out["mask"]))
        rows = multihost.own_rows(completions.shape[0])
        if targets:
            first_attn, has_map = (x[rows] for x in multihost.gather(_first_op_attention(out["op"], out["op_attention"])))
        scored = []
        for j, (row_tokens, row_mask) in enumerate(zip(completions[rows], mask[rows])):
            ids = row_tokens[row_mask].tolist()
            text = tok.decode([i for i in ids if i not in stop], skip_special_tokens=False)
            scored.append({
                "host": me, "uid": str(host["uid"][j]), "task": host["task"][j], "answer": host["answer"][j],
                "completion": text, "correct": rewards.accuracy_reward(text, host["answer"][j]),
                "functional": {name: ids.count(fid) for name, fid in zip(names, func_ids)},
            })
            uid = scored[-1]["uid"]
            if targets and uid in targets and has_map[j]:
                box, image_size = targets[uid]
                merge = model_cfg.vision.spatial_merge_size
                _, h, w = (int(g) for g in host["grid_thw"][j][0])
                grid = (h // merge, w // merge)
                found = heatmaps.localisation(first_attn[j][: grid[0] * grid[1]], heatmaps.target_tokens(box, image_size, grid))
                scored[-1].update({f"op_target_{k}": v for k, v in found.items()})
        mine.append(scored)
        if maps is not None:
            maps.collect(k, host, out)

    samples, seen = [], set()
    everyone = multihost.gather_objects(mine)  # [host][batch][row]
    for row in (row for per_batch in zip(*everyone) for scored in per_batch for row in scored):
        if row["uid"] not in seen:
            seen.add(row["uid"])
            samples.append(row)
    return samples


def evaluate_and_log(writer, step: int, policy: builders.Policy, c: mlc.ConfigDict, workdir: str, mesh, *, tag: str) -> dict:
    """`evaluate`, its results written to `writer` at `step` as `eval/...`; returns them with that prefix."""
    results = {f"eval/{k}": v for k, v in evaluate(policy, c, workdir, mesh, tag=tag).items()}
    writer.write(step, results)
    return results


def finish_training(writer, step: int, policy: builders.Policy, c: mlc.ConfigDict, workdir: str, mesh, *,
                    stage: str, preempted: bool) -> dict:
    """The end of a training job, after its final save: the final evaluation (of a run that reached
    train.steps), the writer closed, and `checkpoint.Preempted` raised for a run stopped by SIGTERM."""
    results = {}
    if step >= c.train.steps and c.eval.num_per_task > 0 and not preempted:
        results = evaluate_and_log(writer, step, policy, c, workdir, mesh, tag=f"{stage}_step{step}")
    writer.close()
    if preempted:
        raise checkpoint.Preempted(step, workdir)
    return results


def _per_task(src, num_per_task: int, batch_size: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the first `num_per_task` records of every task, padded (with repeats, skipped
    when scoring) to a whole number of batches; and the index of each picked record's uid."""
    taken: dict[str, int] = collections.Counter()
    picked, uids = [], {}
    for i in range(len(src)):
        record = src[i]
        if taken[record["task"]] < num_per_task:
            taken[record["task"]] += 1
            picked.append(i)
            uids[str(record["uid"])] = i
    n = len(picked)
    picked += [picked[k % n] for k in range((-n) % batch_size)]
    return picked, uids


class _Subset:
    """The records `indices` of a random-access source, in that order."""

    def __init__(self, src, indices: list[int]):
        self.src, self.indices = src, indices
        self.source = getattr(src, "source", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.src[self.indices[i]]


class _ImageSwapped(_Subset):
    """The records `indices` of `src`, each with the images of the next record of its batch of
    `batch_size` (the last with the first's): the image-swap control. The prompt keeps its uid,
    question and answer; only what it is shown changes."""

    def __init__(self, src, indices: list[int], batch_size: int):
        super().__init__(src, indices)
        self.batch_size = batch_size

    def __getitem__(self, i):
        first = i - i % self.batch_size
        other = first + (i - first + 1) % min(self.batch_size, len(self.indices) - first)
        return {**self.src[self.indices[i]], "images": self.src[self.indices[other]]["images"]}


class _HeatMaps:
    """PNG heat maps of the visual-op modules' attention for the first `c.eval.heatmaps` samples
    that process 0 holds (it has their images), written by process 0 to WORKDIR/heatmaps/.

    A sample whose greedy completion holds functional tokens gets one panel per token, from the
    sampler (`<tag>_<k>_<task>.png`). One without (common early in training) is drawn from a full
    forward of its REFERENCE trajectory instead (teacher forcing, `<tag>_<k>_<task>_reference.png`),
    so the maps always show where the modules look. The forward runs on every host (the
    parameters are sharded over all of them); the other hosts feed copies of the same records."""

    def __init__(self, c: mlc.ConfigDict, model_cfg, tokens, workdir: str, tag: str):
        self.enabled = model_cfg.visual_ops.enabled and c.eval.heatmaps > 0
        self.c, self.model_cfg, self.tokens, self.names, self.tag = c, model_cfg, tokens, tokens.functional_names, tag
        self.dir = os.path.join(workdir, "heatmaps")
        self.generated: dict[str, tuple] = {}  # uid -> (image, grid_thw, op[N], attention[N, P]) on process 0

    def collect(self, k: int, host: dict, out: dict) -> None:
        """Keeps process 0's first samples' images and op attention from batch k (`host`: this
        process's host batch). A collective (every host calls it for every batch); only the
        first batches, which hold those samples, gather."""
        per_host = len(host["uid"])
        if not self.enabled or k * per_host >= self.c.eval.heatmaps:
            return
        op, attn = multihost.gather((out["op"], out["op_attention"]))
        if jax.process_index() != 0:
            return
        rows = multihost.own_rows(op.shape[0])
        for j, (row_op, row_attn) in enumerate(zip(op[rows], attn[rows])):
            uid = str(host["uid"][j])
            if len(self.generated) < self.c.eval.heatmaps and uid not in self.generated:
                self.generated[uid] = (_first_image(host, j), host["grid_thw"][j][0], row_op, row_attn)

    def draw(self, graphdef, params, tok, src, uids: dict[str, int], samples: list[dict], mesh) -> None:
        """Writes the maps of process 0's first samples (`samples`: every host's, gathered)."""
        if not self.enabled:
            return
        chosen = [row for row in samples if row["host"] == 0][: self.c.eval.heatmaps]
        reference = [row for row in chosen if not sum(row["functional"].values())]
        forced = self._teacher_forced(graphdef, params, tok, src, [uids[row["uid"]] for row in reference], mesh)
        if jax.process_index() != 0:
            return
        os.makedirs(self.dir, exist_ok=True)
        token = dict(zip(self.names, self.tokens.functional_strings))
        entries = []
        for k, row in enumerate(chosen):
            forced_row = forced.get(row["uid"])
            if forced_row is None and row["uid"] not in self.generated:
                continue  # a repeat of another host's sample: scored there
            image, grid, op, attn, position = forced_row or (*self.generated[row["uid"]], None)
            steps = np.flatnonzero(op >= 0)[:6]
            where = "completion token" if position is None else "reference position"
            panels = [heatmaps.upsample(image, HEATMAP_SCALE)] + [
                heatmaps.overlay(image, attn[m], grid, scale=HEATMAP_SCALE,
                                 title=f"{token[self.names[int(op[m])]]} at {where} {m if position is None else position[m]}")
                for m in steps
            ]
            if len(panels) == 1:
                continue  # e.g. a functional token generated last, or a reference without one
            record = src[uids[row["uid"]]]
            png = f"{self.tag}_{k:02d}_{row['task']}{'_reference' if forced_row else ''}.png"
            heatmaps.strip(panels, caption=f"Q: {record['question']}").save(os.path.join(self.dir, png))
            entries.append({
                "png": png, "title": f"{self.tag} #{k} {row['task']} ({row['uid']})", "question": record["question"],
                "answer": row["answer"], "correct": bool(row["correct"]),
                "completion": row["completion"] if position is None else
                f"(no functional token generated; maps from the reference trajectory)\n{record['response']}\n\n"
                f"generated: {row['completion']}",
            })
        heatmaps.add_to_index(self.dir, entries)
        log.info("heat maps %s: %d from generated functional tokens, %d teacher-forced on the reference trajectory "
                 "(no functional token generated)", self.tag, len(chosen) - len(reference), len(reference))

    def _teacher_forced(self, graphdef, params, tok, src, indices: list[int], mesh) -> dict[str, tuple]:
        """uid -> (image, grid_thw, op[M], attention[M, P], position[M]) from a full forward of
        the reference trajectories of src[indices] (on process 0; {} elsewhere)."""
        if not indices:
            return {}
        c = self.c
        per_host = c.eval.batch_size // jax.process_count()
        cfg = dataclasses.replace(
            builders.make_pipeline_config(c, self.model_cfg, fmt="sft", batch_size=per_host, shuffle=False, num_epochs=1),
            sft_target="trajectory", pad_to_multiple=0,
        )
        forced = {}
        for first in range(0, len(indices), per_host):
            chunk = indices[first : first + per_host]
            # Every host builds the same host batch (process_count=1): the global batch holds copies.
            padded = _Subset(src, [chunk[i % len(chunk)] for i in range(per_host)])
            host = next(iter(pipeline.make_dataset(padded, tok, self.tokens, cfg, self.model_cfg, source_name="reference trajectories",
                                                   process_index=0, process_count=1)))
            batch = pipeline.to_global(host, mesh)
            with jax.set_mesh(mesh):
                ops = multihost.gather(_op_attention(graphdef, params, device_batch.model_inputs(batch)))
            if jax.process_index() == 0:  # its block is rows [0, per_host) of the global batch
                for j in range(len(chunk)):
                    forced[str(host["uid"][j])] = (
                        _first_image(host, j), host["grid_thw"][j][0], ops["op"][j], ops["attn"][j], ops["position"][j])
        return forced


@jax.jit
def _first_op_attention(op_rn: jax.Array, attn_rnp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sampler's `op` int32[R, N] / `op_attention` float32[R, N, P] -> the attention float32[R, P]
    of each row's first completion token with a map (its first functional token, unless that was
    the last token, whose op never ran), and bool[R]: whether the row has one. Reduced before the
    gather, so only [R, P] crosses hosts."""
    has_map_rn = op_rn >= 0
    first_r = jnp.argmax(has_map_rn, axis=1)
    return jnp.take_along_axis(attn_rnp, first_r[:, None, None], axis=1)[:, 0], has_map_rn.any(axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _op_attention(graphdef, params, inputs: tuple[tuple, dict]) -> dict:
    """The visual-op modules' aux of a full forward on `device_batch.model_inputs`:
    attn float32[B, M, P], op / position int32[B, M]."""
    args, kw = inputs
    _, _, aux = nnx.merge(graphdef, params)(*args, **kw)
    return aux["ops"]


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
    mesh = builders.make_mesh(c)
    builders.build_data(c, workdir)
    return evaluate(builders.load_policy(c, workdir, mesh), c, workdir, mesh, tag="final")
