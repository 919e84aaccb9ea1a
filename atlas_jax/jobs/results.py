"""The recipe's results: per evaluation condition and checkpoint, accuracy with a Wilson 95%
interval and the image-swap control, next to the trivial baselines; as results.json and a table.

    results = {"in_distribution": {"sft": summary(samples), "rl": ...,
                                   "rl_minus_sft": paired_difference(rl_samples, samples),
                                   "baselines": baselines(train, samples)},
               "shifted": {...}, "hard": {...}}

`samples` are an evaluation's scored rows (`evaluate.evaluate`'s eval_<tag>.json): task, answer,
correct, image_swap_correct, and where measured the localisation fields op_target_share /
op_target_chance / op_target_hit (`heatmaps.localisation`). The baselines use the training
answer distribution (the first TRAIN_ANSWER_RECORDS training records of each family):
`majority` always answers the family's most frequent training answer; `uniform` guesses
uniformly among the family's training answers (its expected accuracy). Neither looks at the
image; the image-swap control shows what the model gets from the question alone (it must fall
toward them).
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence

import numpy as np

TRAIN_ANSWER_RECORDS = 128  # per family: training answers the baselines are computed from
Z95 = statistics.NormalDist().inv_cdf(0.975)  # two-sided 95%


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float]:
    """[lo, hi]: the Wilson score interval of a binomial proportion successes / n (n > 0)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_bootstrap(a_sp: np.ndarray, b_sp: np.ndarray | None = None, *, reps: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """(mean, percentile 95% interval) of a's accuracy, or of a - b paired, from per-prompt scores
    float[S training seeds, P prompts] (the same prompts in every row and in both arms): each draw
    resamples the seeds, then the prompts, with replacement, the same draws for a and b, so the
    interval holds both the spread between training runs and that between prompts."""
    x = np.asarray(a_sp, np.float64) if b_sp is None else np.asarray(a_sp, np.float64) - np.asarray(b_sp, np.float64)
    s, p = x.shape
    rng = np.random.default_rng(seed)
    means = np.empty(reps)
    for r in range(reps):
        means[r] = x[rng.integers(0, s, s)][:, rng.integers(0, p, p)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), [float(lo), float(hi)]


def training_answers(src, tasks: Sequence[str], per_task: int = TRAIN_ANSWER_RECORDS) -> dict[str, collections.Counter]:
    """{task: Counter of answers} over the first `per_task` records of each of `tasks` in `src` (a
    random-access training split, read in order until each task has them or the split ends)."""
    counts = {task: collections.Counter() for task in tasks}
    missing = set(tasks)
    for i in range(len(src)):
        if not missing:
            break
        record = src[i]
        task = record["task"]
        if task in missing:
            counts[task][record["answer"]] += 1
            if sum(counts[task].values()) == per_task:
                missing.discard(task)
    return counts


def majority_answer(counts: collections.Counter) -> str:
    """The most frequent answer; ties go to the first in sorted order (reproducible)."""
    return max(sorted(counts), key=counts.__getitem__)


def baselines(train: dict[str, collections.Counter], samples: Sequence[dict]) -> dict:
    """Expected accuracy of the image-blind baselines on `samples`, overall and per family."""
    hits: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for row in samples:
        counts = train.get(row["task"], collections.Counter())
        majority = float(bool(counts) and row["answer"] == majority_answer(counts))
        uniform = (row["answer"] in counts) / max(len(counts), 1)
        hits[row["task"]].append((majority, uniform))
    per_family = {
        task: {"majority": _mean(h[0] for h in rows), "uniform": _mean(h[1] for h in rows),
               "majority_answer": majority_answer(train[task]) if train.get(task) else "",
               "training_samples": sum(train.get(task, {}).values()), "training_answers": len(train.get(task, ()))}
        for task, rows in sorted(hits.items())
    }
    every = [h for rows in hits.values() for h in rows]
    return {"majority": _mean(h[0] for h in every), "uniform": _mean(h[1] for h in every), "per_family": per_family}


def summary(samples: Sequence[dict]) -> dict:
    """Accuracy, its Wilson 95% interval and the image-swap accuracy, overall and per family; and
    where some rows were measured, the means of their localisation fields over op_target_count rows."""

    def part(rows):
        n = len(rows)
        correct = sum(r["correct"] for r in rows)
        out = {"accuracy": correct / n, "interval": wilson_interval(correct, n), "num_samples": n}
        swapped = [r["image_swap_correct"] for r in rows if "image_swap_correct" in r]  # all, or the control's subset
        if swapped:
            out["image_swap"], out["image_swap_samples"] = _mean(swapped), len(swapped)
        measured = [r for r in rows if "op_target_share" in r]
        if measured:
            fields = ("op_target_share", "op_target_chance", "op_target_hit")
            out.update({k: _mean(float(r[k]) for r in measured) for k in fields})
            out["op_target_count"] = len(measured)
        return out

    by_task = collections.defaultdict(list)
    for row in samples:
        by_task[row["task"]].append(row)
    return {**part(list(samples)), "per_family": {t: part(rows) for t, rows in sorted(by_task.items())}}


def paired_difference(a_rows: Sequence[dict], b_rows: Sequence[dict], *, seed: int = 0) -> dict:
    """a - b in accuracy on the same prompts (rows matched by uid), overall and per family, each with
    its paired bootstrap 95% interval (`paired_bootstrap` over the prompts): whether one checkpoint
    beats another beyond the noise of which prompts were drawn, which two separate intervals overstate."""
    a, b = ({r["uid"]: r for r in rows} for rows in (a_rows, b_rows))
    if a.keys() != b.keys():
        raise ValueError(f"paired_difference: the two evaluations scored different prompts "
                         f"({len(a.keys() - b.keys())} uids only in the first, {len(b.keys() - a.keys())} only in the second)")

    def part(uids):
        scores = [[float(a[u]["correct"]) for u in uids]], [[float(b[u]["correct"]) for u in uids]]
        difference, interval = paired_bootstrap(*scores, seed=seed)
        return {"difference": difference, "interval": interval, "num_samples": len(uids)}

    by_task = collections.defaultdict(list)
    for uid, row in sorted(a.items()):
        by_task[row["task"]].append(uid)
    return {**part(sorted(a)), "per_family": {t: part(uids) for t, uids in sorted(by_task.items())}}


def table(results: dict, checkpoints: dict[str, str]) -> str:
    """Markdown, one section per condition: a row per family (and overall), for each checkpoint
    (`checkpoints`: key in results -> column name) accuracy [95% interval] and the image-swap
    accuracy, the paired difference of the last checkpoint minus the first where results hold it
    (key '<last>_minus_<first>', `paired_difference`), then the majority and uniform baselines; and
    where the modules' attention was measured, the localisation table (`_localisation_table`)."""
    out = []
    for condition, res in results.items():
        label = " (extrapolation: reported apart from the headline)" if condition == "hard" else ""
        head = [f"{name} accuracy [95% CI] | {name} image swap" for name in checkpoints.values()]
        (first, first_name), (last, last_name) = list(checkpoints.items())[0], list(checkpoints.items())[-1]
        paired = res.get(f"{last}_minus_{first}") if last != first else None
        if paired:
            head.append(f"{last_name} - {first_name} (paired) [95% CI]")
        out += [f"## {condition}{label}", "", "| family | " + " | ".join(head) + " | majority | uniform | n |",
                "|---" * (2 * len(checkpoints) + bool(paired) + 4) + "|"]
        base = res["baselines"]
        families = sorted(base["per_family"])
        for family in ["overall", *families]:
            cells = []
            for key in checkpoints:
                s = res[key] if family == "overall" else res[key]["per_family"][family]
                lo, hi = s["interval"]
                cells.append(f"{s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {s.get('image_swap', float('nan')):.3f}")
            if paired:
                d = paired if family == "overall" else paired["per_family"][family]
                cells.append(f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
            b = base if family == "overall" else base["per_family"][family]
            n = next(iter(res[k] for k in checkpoints))
            n = n["num_samples"] if family == "overall" else n["per_family"][family]["num_samples"]
            out.append(f"| {family} | " + " | ".join(cells) + f" | {b['majority']:.3f} | {b['uniform']:.3f} | {n} |")
        out += ["", *_localisation_table(res, checkpoints)]
    return "\n".join(out)


def _localisation_table(res: dict, checkpoints: dict[str, str]) -> list[str]:
    """Where the visual-op modules look, for the checkpoints that measured it: per family with a
    target box, the first functional token's attention share on the target's image tokens, how
    often its argmax lands there, and the share uniform attention would give (chance)."""
    measured = {k: name for k, name in checkpoints.items() if "op_target_count" in res[k]}
    if not measured:
        return []
    head = [f"{name} share on target | {name} argmax on target" for name in measured.values()]
    out = ["Visual-op attention on the target object (chance: the target's share of the image tokens):", "",
           "| family | " + " | ".join(head) + " | chance | n |", "|---" * (2 * len(measured) + 3) + "|"]
    first = next(iter(measured))
    families = [f for f, s in res[first]["per_family"].items() if "op_target_count" in s]
    for family in ["overall", *families]:
        rows = [res[k] if family == "overall" else res[k]["per_family"].get(family, {}) for k in measured]
        cells = [f"{s['op_target_share']:.3f} | {s['op_target_hit']:.3f}" if "op_target_count" in s else "- | -" for s in rows]
        ref = rows[0]
        out.append(f"| {family} | " + " | ".join(cells) + f" | {ref['op_target_chance']:.3f} | {ref['op_target_count']} |")
    return [*out, ""]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)
