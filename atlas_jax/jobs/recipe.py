"""The whole ATLAS recipe on one command: data -> SFT -> LA-GRPO -> evaluation -> results.

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

Stages run in WORKDIR/sft and WORKDIR/la_grpo (each resumable on its own: rerunning the
command skips finished work, evaluations included). Each stage's config is the recipe's with its
`stages.<job>` settings applied (`run_config.stage`), e.g. the RL stage's `stages.la_grpo.optim.lr`.

Then both final checkpoints are evaluated on every condition of `eval.conditions`
(`run_config.eval_num_per_task` prompts per family each; the trainers' own final evaluation
serves for `eval.split`), each with the image-swap control, and compared with the majority and uniform
baselines of the training answers (`results.py`). WORKDIR/results.json holds
{condition: {"sft": ..., "rl": ..., "rl_minus_sft": ..., "baselines": ...}} (rl_minus_sft: paired
on the same prompts, with its bootstrap interval), WORKDIR/results.md the same as tables
(printed too); curves go to WORKDIR/plots/, heat maps to <stage>/heatmaps/index.html.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import ml_collections as mlc

from atlas_jax import builders, plots, run_config
from atlas_jax.jobs import evaluate, la_grpo, results as results_lib, sft

log = logging.getLogger("atlas_jax")


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    data_dir = c.data.data_dir or os.path.join(workdir, "data")
    sft_dir, rl_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "la_grpo")

    # ------------------------------------------------------------------ SFT
    sft_c = run_config.stage(c, "sft", **{"data.data_dir": data_dir})
    log.info("== stage 1/2: SFT (%d steps) in %s", sft_c.train.steps, sft_dir)
    sft.main(sft_c, sft_dir)

    # ------------------------------------------------------------------ LA-GRPO
    rl_c = run_config.stage(c, "la_grpo", **{"data.data_dir": data_dir, "checkpoint.init_from": sft_dir})
    alpha = rl_c.rl.loss.alpha
    log.info("== stage 2/2: LA-GRPO (%d rollout batches, alpha=%g) in %s", rl_c.train.steps, alpha, rl_dir)
    la_grpo.main(rl_c, rl_dir)

    # ------------------------------------------------------------------ evaluation: each checkpoint on each condition
    mesh = builders.make_mesh(c)
    stages = {"sft": (sft_c, sft_dir, f"sft_step{sft_c.train.steps}"), "rl": (rl_c, rl_dir, f"rl_step{rl_c.train.steps}")}
    evaluated = {cond: {} for cond in c.eval.conditions}
    for key, (stage_c, stage_dir, trainer_tag) in stages.items():
        policy = None  # loaded once per stage, and only if an evaluation is missing
        for cond in c.eval.conditions:
            path = _evaluation_file(stage_c, stage_dir, trainer_tag, key, cond)
            if not os.path.exists(path):
                policy = policy or builders.load_policy(stage_c, stage_dir, mesh)
                evaluate.evaluate(policy, stage_c, stage_dir, mesh, tag=f"{key}_{cond}", split=cond)
            with open(path) as f:
                evaluated[cond][key] = json.load(f)["samples"]

    # ------------------------------------------------------------------ baselines, results
    families = sorted({row["task"] for per_key in evaluated.values() for rows in per_key.values() for row in rows})
    train = results_lib.training_answers(builders.load_split(sft_c, sft_dir, "train"), families)
    results = {
        cond: {**{key: results_lib.summary(rows) for key, rows in per_key.items()},
               "rl_minus_sft": results_lib.paired_difference(per_key["rl"], per_key["sft"]),
               "baselines": results_lib.baselines(train, per_key["sft"])}
        for cond, per_key in evaluated.items()
    }
    columns = {"sft": "SFT", "rl": "LA-GRPO" if alpha > 0 else "GRPO"}
    table = results_lib.table(results, columns)
    sizes = ", ".join(f"{cond} {run_config.eval_num_per_task(c, cond)}" for cond in c.eval.conditions) + " prompts per family"
    swap_n = c.eval.image_swap_num_per_task
    if c.eval.image_swap and swap_n and any(swap_n < run_config.eval_num_per_task(c, cond) for cond in c.eval.conditions):
        sizes += f"; image swap on the first {swap_n} of each"
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(f"# Results ({sizes})\n\n{table}\n")
        _plot(workdir, sft_dir, rl_dir)
        print(f"\nResults ({sizes}):\n\n{table}")
        print(f"results: {os.path.join(workdir, 'results.json')}  plots: {os.path.join(workdir, 'plots')}  "
              f"heat maps: {os.path.join(rl_dir, 'heatmaps', 'index.html')}")
    return results


def _latest_eval(workdir: str, prefix: str) -> dict | None:
    """The results of the newest (by step) eval_<prefix>*.json in `workdir` (`bench/results_table.py`)."""
    files = glob.glob(os.path.join(workdir, f"eval_{prefix}*.json"))
    if not files:
        return None
    newest = max(files, key=lambda f: int("".join(ch for ch in os.path.basename(f).split("step")[-1] if ch.isdigit()) or 0))
    with open(newest) as f:
        return json.load(f)["results"]


def results_table(results: dict[str, dict]) -> str:
    """Markdown of evaluations' flat results (`evaluate.evaluate`'s): one row per metric (accuracy
    overall / per task, image swap, functional usage), one column per checkpoint (the notebook's)."""
    names = list(results)
    keys = sorted({k for r in results.values() for k in r if k != "num_samples"},
                  key=lambda k: (not k.startswith("accuracy"), k != "accuracy", k))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{results[n].get(k, float('nan')):.3f}" for n in names) + " |")
    lines.append("| samples | " + " | ".join(str(results[n].get("num_samples", "")) for n in names) + " |")
    return "\n".join(lines)


def _evaluation_file(stage_c: mlc.ConfigDict, stage_dir: str, trainer_tag: str, key: str, condition: str) -> str:
    """Where the scored samples of the stage's final checkpoint on `condition` are: the trainer's
    own final evaluation when it was on that split, else <stage>/eval_<key>_<condition>.json (made
    by the recipe; kept, so a rerun does not redo it)."""
    path = os.path.join(stage_dir, f"eval_{trainer_tag}.json")
    if condition == stage_c.eval.split and os.path.exists(path):
        return path
    return os.path.join(stage_dir, f"eval_{key}_{condition}.json")


def _plot(workdir: str, sft_dir: str, rl_dir: str) -> None:
    out = os.path.join(workdir, "plots")
    s, r = plots.read_metrics(sft_dir), plots.read_metrics(rl_dir)
    plots.curves(os.path.join(out, "sft_loss.png"), "SFT loss", {"loss": plots.series(s, "loss")})
    plots.curves(os.path.join(out, "sft_token_accuracy.png"), "SFT next-token accuracy",
                 {"functional tokens": plots.series(s, "accuracy_functional"), "other tokens": plots.series(s, "accuracy_other")})
    plots.curves(os.path.join(out, "rl_reward.png"), "LA-GRPO reward (rollouts)",
                 {k: plots.series(r, k) for k in ("reward_mean", "reward/accuracy", "reward/functional_usage", "reward/format")})
    plots.curves(os.path.join(out, "rl_accuracy.png"), "LA-GRPO accuracy",
                 {"rollouts": plots.series(r, "train_accuracy"), "held-out (eval)": plots.series(r, "eval/accuracy"),
                  "held-out, image swapped": plots.series(r, "eval/image_swap")})
    plots.curves(os.path.join(out, "rl_functional_tokens.png"), "functional tokens per completion",
                 {"rollouts": plots.series(r, "functional_per_completion")})
