"""The recipe's statistics (`jobs/results.py`) against references nobody here wrote (scipy's
Wilson interval) and hand-counted baselines; the image-swap control's record rotation."""

import collections
import importlib.util
import os
import re

import numpy as np
import pytest
from scipy import stats

from atlas_jax.data.synthetic import SyntheticSource
from atlas_jax.jobs import evaluate, results


@pytest.mark.parametrize("k,n", [(0, 8), (3, 8), (8, 8), (64, 128), (1000, 1024)])
def test_wilson_interval_is_scipys(k, n):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert results.wilson_interval(k, n) == pytest.approx([ci.low, ci.high], abs=1e-9)


def test_baselines_by_hand():
    train = {"count": collections.Counter({"1": 5, "2": 5, "3": 2}), "side": collections.Counter({"yes": 3, "no": 4})}
    samples = [{"task": "count", "answer": a} for a in ("1", "2", "4", "1")] + [{"task": "side", "answer": a} for a in ("no", "yes")]
    out = results.baselines(train, samples)
    # count: majority "1" (a tie with "2", broken by sorted order) is right on 2 of 4; uniform: 3 of 4 in the set of 3.
    assert out["per_family"]["count"] == {"majority": 0.5, "uniform": 0.25, "majority_answer": "1", "training_samples": 12,
                                          "training_answers": 3}
    assert out["per_family"]["side"]["majority"] == 0.5 and out["per_family"]["side"]["uniform"] == 0.5
    assert out["majority"] == pytest.approx(3 / 6) and out["uniform"] == pytest.approx((3 * 1 / 3 + 2 * 0.5) / 6)


def test_training_answers_read_the_first_records_of_each_family():
    src = SyntheticSource("train", None, seed=4, tasks=["shape_count", "line_side"])
    got = results.training_answers(src, ["shape_count", "line_side"], per_task=5)
    want = {t: collections.Counter(src[2 * i + k]["answer"] for i in range(5)) for k, t in enumerate(["shape_count", "line_side"])}
    assert got == want


def test_summary_per_family_and_image_swap():
    rows = [{"task": "a", "correct": 1.0, "image_swap_correct": 0.0}, {"task": "a", "correct": 0.0, "image_swap_correct": 0.0},
            {"task": "b", "correct": 1.0, "image_swap_correct": 1.0}]
    s = results.summary(rows)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["image_swap"] == pytest.approx(1 / 3) and s["num_samples"] == 3
    assert s["per_family"]["a"]["accuracy"] == 0.5 and s["per_family"]["b"]["image_swap"] == 1.0
    # The control on a subset: its accuracy over the rows it scored, their number beside it.
    del rows[1]["image_swap_correct"]
    s = results.summary(rows)
    assert s["image_swap"] == 0.5 and s["image_swap_samples"] == 2 and s["num_samples"] == 3
    assert s["per_family"]["a"]["image_swap"] == 0.0 and s["per_family"]["a"]["image_swap_samples"] == 1
    assert s["interval"] == pytest.approx(results.wilson_interval(2, 3))


def test_table_shows_where_the_modules_look_when_measured():
    rows = [{"task": "zoom", "answer": "1", "correct": 1.0, "image_swap_correct": 0.0,
             "op_target_share": 0.6, "op_target_chance": 0.2, "op_target_hit": 1.0},
            {"task": "zoom", "answer": "2", "correct": 0.0, "image_swap_correct": 0.0,
             "op_target_share": 0.2, "op_target_chance": 0.1, "op_target_hit": 0.0},
            {"task": "side", "answer": "yes", "correct": 1.0, "image_swap_correct": 1.0}]
    train = {"zoom": collections.Counter({"1": 2}), "side": collections.Counter({"yes": 1})}
    res = {"in_distribution": {"sft": results.summary(rows), "baselines": results.baselines(train, rows)}}
    md = results.table(res, {"sft": "SFT"})
    # Means over the two measured rows only; the family without a target box has no row.
    assert "| overall | 0.400 | 0.500 | 0.150 | 2 |" in md and "| zoom | 0.400 | 0.500 | 0.150 | 2 |" in md
    assert "| side | 0.400" not in md and md.count("share on target") == 1
    blind = {"in_distribution": {"sft": results.summary([{k: v for k, v in r.items() if not k.startswith("op_")} for r in rows]),
                                 "baselines": res["in_distribution"]["baselines"]}}
    assert "share on target" not in results.table(blind, {"sft": "SFT"})


def test_image_swap_rotates_images_within_each_batch():
    src = SyntheticSource("in_distribution", 1, seed=0)  # 8 records, one per family
    swapped = evaluate._ImageSwapped(src, list(range(8)), batch_size=4)
    for i in range(8):
        first = i - i % 4
        record = swapped[i]
        assert record["uid"] == src[i]["uid"] and record["question"] == src[i]["question"]
        assert record["images"] == src[first + (i - first + 1) % 4]["images"] != src[i]["images"]


def test_the_recipe_config_names_a_bad_evaluation_setting():
    from atlas_jax import run_config
    from atlas_jax.model.config import ConfigError

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "atlas_synthetic.py")
    spec = importlib.util.spec_from_file_location("atlas_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    run_config.validate(c, 1, paths=False)
    assert c.eval.num_per_task >= 128 and tuple(c.eval.conditions) == ("in_distribution", "shifted", "hard")
    for field, value, message in (("split", "validation", "config.eval.split='validation': expected one of"),
                                  ("conditions", ("shifted", "test"), "config.eval.conditions"),
                                  ("num_per_task", 0, "config.eval.num_per_task=0: expected >= 1"),
                                  ("image_swap_num_per_task", -1, "config.eval.image_swap_num_per_task=-1: expected an integer >= 0")):
        bad = c.copy_and_resolve_references()
        bad.eval[field] = value
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_config.validate(bad, 1, paths=False)


def test_paired_bootstrap_with_one_seed_is_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.6).astype(float)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)  # mostly the same prompts right: pairing narrows the interval
    mean, (lo, hi) = results.paired_bootstrap(a[None], b[None], reps=4000)
    ref = stats.bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True, vectorized=False, n_resamples=4000,
                          method="percentile", random_state=0).confidence_interval
    assert mean == pytest.approx(np.mean(a - b))
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.012)
    unpaired = 1.96 * np.sqrt(a.var() / 400 + b.var() / 400)
    assert hi - lo < 0.8 * 2 * unpaired


def test_paired_difference_matches_prompts_by_uid_and_is_scipys_paired_bootstrap_per_family():
    rng = np.random.default_rng(5)
    tasks = ["zoom"] * 150 + ["side"] * 250
    sft = [{"uid": f"u{i}", "task": t, "correct": float(rng.random() < 0.5)} for i, t in enumerate(tasks)]
    flips = rng.random(len(sft))
    rl = [{**r, "correct": float(r["correct"] if f < 0.85 else 1.0)} for r, f in zip(sft, flips)]  # RL fixes some prompts
    d = results.paired_difference(list(reversed(rl)), sft)  # another order: rows are matched by uid, not position
    a, b = (np.array([r["correct"] for r in rows]) for rows in (rl, sft))
    assert d["difference"] == pytest.approx(np.mean(a - b)) and d["difference"] > 0 and d["num_samples"] == 400
    for family, idx in (("zoom", slice(0, 150)), ("side", slice(150, None))):
        ref = stats.bootstrap((a[idx], b[idx]), lambda x, y: np.mean(x - y), paired=True, vectorized=False,
                              n_resamples=2000, method="percentile", random_state=0).confidence_interval
        got = d["per_family"][family]
        assert got["difference"] == pytest.approx(np.mean(a[idx] - b[idx])) and got["num_samples"] == len(a[idx])
        assert got["interval"] == pytest.approx([ref.low, ref.high], abs=0.015)
    assert d["interval"][0] > 0  # every change is a fix: the interval excludes zero

    # The table shows it as its own column, overall and per family.
    train = {"zoom": collections.Counter({"1": 2}), "side": collections.Counter({"yes": 1})}
    for rows in (sft, rl):
        for r in rows:
            r["answer"], r["image_swap_correct"] = "1", 0.0
    res = {"in_distribution": {"sft": results.summary(sft), "rl": results.summary(rl), "rl_minus_sft": d,
                               "baselines": results.baselines(train, sft)}}
    md = results.table(res, {"sft": "SFT", "rl": "GRPO"})
    lo, hi = d["interval"]
    assert "GRPO - SFT (paired) [95% CI]" in md and f"| {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in md
    header, rule = md.splitlines()[2:4]
    assert header.count("|") == rule.count("|")

    with pytest.raises(ValueError, match="different prompts .1 uids only in the first, 0 only in the second"):
        results.paired_difference(rl, sft[1:])


def test_paired_bootstrap_counts_the_spread_between_seeds():
    # Two seeds whose arms differ by +0.2 and -0.2 on every prompt: the mean difference is 0, and
    # resampling the seeds must put both signs inside the interval; a prompt-only bootstrap would not.
    a = np.array([[1.0] * 50 + [0.0] * 50, [0.0] * 50 + [1.0] * 50])
    b = np.array([[1.0] * 30 + [0.0] * 70, [0.0] * 30 + [1.0] * 70])
    mean, (lo, hi) = results.paired_bootstrap(a, b)
    assert mean == pytest.approx(0.0)
    assert lo <= -0.15 and hi >= 0.15
    same, (slo, shi) = results.paired_bootstrap(a, a)
    assert same == slo == shi == 0.0
