"""The README's main command, run as a user runs it: `python -m atlas_jax.main` on the
whole-recipe config, in a fresh process, shrunk by command-line overrides (SFT -> LA-GRPO ->
evaluation on every condition with the image-swap control -> results.json / results.md with
baselines, curves, heat maps and their index), then rerun to check it resumes."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from atlas_jax.data.synthetic import CELL_SCENE_TASKS, generate

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL = {
    "data.batch_size": 8,
    "train.steps": 4,
    "stages.sft.train.steps": 4,
    "train.log_every": 1,
    "optim.warmup_steps": 1,
    "stages.la_grpo.train.steps": 2,
    "rl.prompts_per_step": 4,
    "rl.group_size": 2,
    "rl.sample.max_new_tokens": 12,
    "stages.la_grpo.eval.every": 1,
    "eval.num_per_task": 1,
    "eval.num_per_task_by_condition.in_distribution": 2,  # the config's larger headline split, shrunk
    "eval.image_swap_num_per_task": 1,  # the control on a subset: 1 of the 2 in-distribution prompts per family
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


@pytest.mark.slow
def test_readme_main_command_runs_the_whole_recipe_and_resumes(tmp_path):
    workdir = str(tmp_path / "atlas")
    out = _main(workdir)

    # results.json: every condition, both checkpoints, the baselines; results.md and stdout show it.
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "results.md")) as f:
        written = f.read()
    assert list(results) == ["in_distribution", "shifted", "hard"]
    assert "## hard (extrapolation: reported apart from the headline)" in written and "## shifted" in out
    assert written.startswith("# Results (in_distribution 2, shifted 1, hard 1 prompts per family; image swap on the first 1 of each)")
    evals = {("sft", "in_distribution"): "sft/eval_sft_step4.json", ("rl", "in_distribution"): "la_grpo/eval_rl_step2.json"}
    for cond in ("shifted", "hard"):
        evals.update({("sft", cond): f"sft/eval_sft_{cond}.json", ("rl", cond): f"la_grpo/eval_rl_{cond}.json"})
    train = _training_answers(results["in_distribution"]["baselines"]["per_family"]["zoom_color"]["training_samples"])
    for cond, res in results.items():
        assert set(res) == {"sft", "rl", "rl_minus_sft", "baselines"}
        scored = {}
        for key in ("sft", "rl"):
            with open(os.path.join(workdir, evals[key, cond])) as f:
                ev = json.load(f)
            scored[key] = {s["uid"]: s["correct"] for s in ev["samples"]}
            assert ev["split"] == cond and len(ev["samples"]) == len(CELL_SCENE_TASKS) * (2 if cond == "in_distribution" else 1)
            # The image-swap control scored each family's first prompt only.
            first = {f: rows[0]["uid"] for f, rows in _by_family(ev["samples"]).items()}
            assert {s["uid"] for s in ev["samples"] if "image_swap_correct" in s} == set(first.values())
            _assert_summary(res[key], ev["samples"])
            for family, rows in _by_family(ev["samples"]).items():
                _assert_summary(res[key]["per_family"][family], rows)
            assert f"| overall | {res[key]['accuracy']:.3f} [" in written
        # RL - SFT paired on the same prompts.
        assert scored["rl"].keys() == scored["sft"].keys()
        want = np.mean([scored["rl"][u] - scored["sft"][u] for u in scored["sft"]])
        assert res["rl_minus_sft"]["difference"] == pytest.approx(want)
        lo, hi = res["rl_minus_sft"]["interval"]
        assert lo <= want <= hi
        # Baselines recomputed here from the training answers and the evaluated answers.
        samples = ev["samples"]
        base = res["baselines"]
        majority = {t: max(sorted(c), key=c.__getitem__) for t, c in train.items()}
        want_majority = [float(s["answer"] == majority[s["task"]]) for s in samples]
        want_uniform = [(s["answer"] in train[s["task"]]) / len(train[s["task"]]) for s in samples]
        assert base["majority"] == pytest.approx(np.mean(want_majority))
        assert base["uniform"] == pytest.approx(np.mean(want_uniform))
        for family, rows in _by_family(samples).items():
            assert base["per_family"][family]["majority_answer"] == majority[family]
            assert base["per_family"][family]["uniform"] == pytest.approx(
                np.mean([(s["answer"] in train[family]) / len(train[family]) for s in rows]))

    # Curves, rollout metrics, held-out evaluation during RL, heat maps with their index, checkpoints.
    for png in ("sft_loss", "sft_token_accuracy", "rl_reward", "rl_accuracy", "rl_functional_tokens"):
        assert os.path.getsize(os.path.join(workdir, "plots", f"{png}.png")) > 1000, png
    with open(os.path.join(workdir, "la_grpo", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert sorted(r["step"] for r in rows if "reward_mean" in r) == [1, 2]
    assert {r["step"] for r in rows if "eval/accuracy" in r and "eval/image_swap" in r} == {1, 2}
    with open(os.path.join(workdir, "la_grpo", "heatmaps", "index.html")) as f:
        index = f.read()
    pngs = re.findall(r'<img src="([^"]+)">', index)
    assert pngs and all(os.path.exists(os.path.join(workdir, "la_grpo", "heatmaps", p)) for p in pngs)
    assert "Question:" in index and "<pre>" in index
    assert os.path.isdir(os.path.join(workdir, "sft", "checkpoints", "4"))
    assert os.path.isdir(os.path.join(workdir, "la_grpo", "checkpoints", "2"))

    # Rerunning the command resumes: no stage trains again, the recipe's own evaluations are not
    # redone (the trainers repeat their final one, on the same parameters), and the results are unchanged.
    trained = {p: _train_rows(workdir, p) for p in ("sft", "la_grpo")}
    assert len(trained["sft"]) == 4 and len(trained["la_grpo"]) == 2
    made = [p for (_, cond), p in evals.items() if cond != "in_distribution"]
    stamps = {p: os.path.getmtime(os.path.join(workdir, p)) for p in made}
    _main(workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    for p, rows in trained.items():
        assert _train_rows(workdir, p) == rows, p
    assert {p: os.path.getmtime(os.path.join(workdir, p)) for p in made} == stamps


def _by_family(samples):
    out = {}
    for s in samples:
        out.setdefault(s["task"], []).append(s)
    return out


def _assert_summary(summary, samples):
    """Accuracy, image swap (over the samples it scored) and the Wilson interval (scipy's) of
    `samples`, as the summary has them."""
    k, n = sum(s["correct"] for s in samples), len(samples)
    assert summary["accuracy"] == pytest.approx(k / n) and summary["num_samples"] == n
    swapped = [s["image_swap_correct"] for s in samples if "image_swap_correct" in s]
    assert summary["image_swap"] == pytest.approx(np.mean(swapped)) and summary["image_swap_samples"] == len(swapped)
    ci = stats.binomtest(int(round(k)), n).proportion_ci(confidence_level=0.95, method="wilson")
    assert summary["interval"] == pytest.approx([ci.low, ci.high], abs=1e-4)


def _training_answers(per_family):
    """{family: Counter of answers} of the first `per_family` training samples of each of the main
    job's families (seed 0)."""
    return {t: collections.Counter(generate(t, "train", i, seed=0).answer for i in range(per_family)) for t in CELL_SCENE_TASKS}


def _train_rows(workdir, stage):
    """The metrics rows of training steps (those holding a loss) of one stage."""
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]
