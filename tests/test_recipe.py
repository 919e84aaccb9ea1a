"""The README's main command, run as a user runs it: `python -m atlas_jax.main` on the
whole-recipe config, in a fresh process, shrunk by command-line overrides (SFT -> LA-GRPO ->
evaluation -> results table, curves and heat maps), then rerun to check it resumes."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL = {
    "data.num_per_task": 2,
    "data.batch_size": 8,
    "train.steps": 4,
    "train.log_every": 1,
    "optim.warmup_steps": 1,
    "stages.la_grpo.train.steps": 2,
    "rl.prompts_per_step": 4,
    "rl.group_size": 2,
    "rl.sample.max_new_tokens": 12,
    "stages.la_grpo.eval.every": 1,
    "eval.num_per_task": 1,
    "eval.batch_size": 8,
    "eval.max_new_tokens": 24,
    "eval.heatmaps": 1,
}


def _main(workdir, **over):
    """Runs the entry point as the README does; returns its stdout."""
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **over}.items()]
    cmd = [sys.executable, "-m", "atlas_jax.main", "--config=configs/atlas_synthetic.py", f"--workdir={workdir}", *flags]
    # One CPU device, as on a user's laptop (the test session's 8 fake devices are not inherited).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout


def _table(text):
    """{metric: [value per column]} from the markdown results table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("metric", "---", "samples") and not cells[0].startswith("-"):
            rows[cells[0]] = [float(x) for x in cells[1:]]
    return rows


@pytest.mark.slow
def test_readme_main_command_runs_the_whole_recipe_and_resumes(tmp_path):
    workdir = str(tmp_path / "atlas")
    out = _main(workdir)

    # The printed table is the one written to results.md: SFT and LA-GRPO columns, every task.
    with open(os.path.join(workdir, "results.md")) as f:
        written = f.read()
    assert "| metric | SFT | LA-GRPO |" in written and "| metric | SFT | LA-GRPO |" in out
    table = _table(written)
    tasks = sorted(k.split("/", 1)[1] for k in table if k.startswith("accuracy/"))
    assert len(tasks) == 8, tasks
    for name, (sft, rl) in table.items():
        if name.startswith("accuracy"):
            assert 0.0 <= sft <= 1.0 and 0.0 <= rl <= 1.0, (name, sft, rl)
    assert re.search(r"\| samples \| 8 \| 8 \|", written)

    # The table's numbers are the evaluation files' numbers (SFT: the last SFT step; LA-GRPO: the last batch).
    with open(os.path.join(workdir, "sft", "eval_sft_step4.json")) as f:
        sft_eval = json.load(f)["results"]
    with open(os.path.join(workdir, "la_grpo", "eval_rl_step2.json")) as f:
        rl_eval = json.load(f)["results"]
    assert table["accuracy"] == pytest.approx([sft_eval["accuracy"], rl_eval["accuracy"]], abs=5e-4)

    # Curves, rollout metrics, held-out evaluation during RL, and the final checkpoints.
    for png in ("sft_loss", "sft_token_accuracy", "rl_reward", "rl_accuracy", "rl_functional_tokens"):
        assert os.path.getsize(os.path.join(workdir, "plots", f"{png}.png")) > 1000, png
    with open(os.path.join(workdir, "la_grpo", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert sorted(r["step"] for r in rows if "reward_mean" in r) == [1, 2]
    assert {r["step"] for r in rows if "eval/accuracy" in r} == {1, 2}
    assert os.path.isdir(os.path.join(workdir, "sft", "checkpoints", "4"))
    assert os.path.isdir(os.path.join(workdir, "la_grpo", "checkpoints", "2"))

    # Rerunning the command resumes: no stage trains again, and the results are unchanged.
    trained = {p: _train_rows(workdir, p) for p in ("sft", "la_grpo")}
    assert len(trained["sft"]) == 4 and len(trained["la_grpo"]) == 2
    _main(workdir)
    with open(os.path.join(workdir, "results.md")) as f:
        assert _table(f.read()) == table
    for p, rows in trained.items():
        assert _train_rows(workdir, p) == rows, p


def _train_rows(workdir, stage):
    """The metrics rows of training steps (those holding a loss) of one stage."""
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]
