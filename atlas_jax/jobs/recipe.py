"""The whole ATLAS recipe on one command: data -> SFT -> LA-GRPO -> evaluation -> results.

    python -m atlas_jax.main --config=configs/atlas_synthetic.py --workdir=/tmp/atlas

Stages run in WORKDIR/sft and WORKDIR/la_grpo (each resumable on its own: rerunning the
command skips finished work) over one shared dataset in WORKDIR/data. Each stage's config is the
recipe's with its `stages.<job>` settings applied (`run_config.stage`), e.g. the RL stage's
`stages.la_grpo.optim.lr`. At the end it prints a
table of held-out accuracy per task and functional-token usage for the SFT and the LA-GRPO
checkpoints, writes it to WORKDIR/results.md, and draws the curves in WORKDIR/plots/.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import ml_collections as mlc

from atlas_jax import plots, run_config
from atlas_jax.jobs import la_grpo, sft

log = logging.getLogger("atlas_jax")


def _latest_eval(workdir: str, prefix: str) -> dict | None:
    files = glob.glob(os.path.join(workdir, f"eval_{prefix}*.json"))
    if not files:
        return None
    newest = max(files, key=lambda f: int("".join(ch for ch in os.path.basename(f).split("step")[-1] if ch.isdigit()) or 0))
    with open(newest) as f:
        return json.load(f)["results"]


def results_table(results: dict[str, dict]) -> str:
    """Markdown: one row per metric (accuracy overall / per task, functional usage), one column per checkpoint."""
    names = list(results)
    keys = sorted({k for r in results.values() for k in r if k != "num_samples"},
                  key=lambda k: (not k.startswith("accuracy"), k != "accuracy", k))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{results[n].get(k, float('nan')):.3f}" for n in names) + " |")
    lines.append("| samples | " + " | ".join(str(results[n].get("num_samples", "")) for n in names) + " |")
    return "\n".join(lines)


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

    # ------------------------------------------------------------------ results
    results = {"SFT": _latest_eval(sft_dir, "sft"), "LA-GRPO" if alpha > 0 else "GRPO": _latest_eval(rl_dir, "rl")}
    results = {k: v for k, v in results.items() if v is not None}
    table = results_table(results)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(f"# Held-out results ({c.eval.split} split)\n\n{table}\n")
        _plot(workdir, sft_dir, rl_dir)
        print(f"\nHeld-out results ({c.eval.split}, {c.eval.num_per_task} per task):\n{table}\n")
        print(f"plots: {os.path.join(workdir, 'plots')}  heat maps: {os.path.join(rl_dir, 'heatmaps')}")
    return results


def _plot(workdir: str, sft_dir: str, rl_dir: str) -> None:
    out = os.path.join(workdir, "plots")
    s, r = plots.read_metrics(sft_dir), plots.read_metrics(rl_dir)
    plots.curves(os.path.join(out, "sft_loss.png"), "SFT loss", {"loss": plots.series(s, "loss")})
    plots.curves(os.path.join(out, "sft_token_accuracy.png"), "SFT next-token accuracy",
                 {"functional tokens": plots.series(s, "accuracy_functional"), "other tokens": plots.series(s, "accuracy_other")})
    plots.curves(os.path.join(out, "rl_reward.png"), "LA-GRPO reward (rollouts)",
                 {k: plots.series(r, k) for k in ("reward_mean", "reward/accuracy", "reward/functional_usage", "reward/format")})
    plots.curves(os.path.join(out, "rl_accuracy.png"), "LA-GRPO accuracy",
                 {"rollouts": plots.series(r, "train_accuracy"), "held-out (eval)": plots.series(r, "eval/accuracy")})
    plots.curves(os.path.join(out, "rl_functional_tokens.png"), "functional tokens per completion",
                 {"rollouts": plots.series(r, "functional_per_completion")})
