"""The LA-GRPO job on 8 fake devices: rollouts, rewards, updates, checkpoint, exact resume."""

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import main as entry, run_config
from atlas_jax.jobs import la_grpo as la_grpo_job
from atlas_jax.model.config import ConfigError


def _config(**over):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "la_grpo_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("la_grpo")
    c.mesh = (2, 2, 2)
    c.data.synthetic_config = "tiny"
    c.data.num_per_task = 2
    c.train.steps = 3
    c.rl.prompts_per_step = 4
    c.rl.group_size = 2
    c.rl.filter_groups = "none"  # the plain update; the dynamic-sampling tests turn it on
    c.rl.sample.max_new_tokens = 12
    c.rl.sample.temperature = 1.5  # a random tiny model: hot sampling so some completions hold functional tokens
    c.optim.lr = 1e-3
    c.rl.loss.beta = 0.02  # exercise the reference model too
    c.rl.rewards = {"functional_usage": 1.0, "format": 0.2}
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.eval.num_per_task = 0
    return run_config.apply_overrides(c, over)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("la_grpo_data"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> str:
    """Three rollout batches, one update each, in one go."""
    workdir = str(tmp_path_factory.mktemp("la_grpo_a"))
    entry.run_job(_config(**{"data.data_dir": data}), workdir)
    return workdir


@pytest.mark.slow
def test_three_iterations_checkpoint_and_resume_identically(tmp_path, data, uninterrupted):
    a, b = uninterrupted, str(tmp_path / "b")
    entry.run_job(_config(**{"data.data_dir": data, "train.stop_at": 2}), b)
    assert sorted(_rows(b)) == [1, 2]
    entry.run_job(_config(**{"data.data_dir": data}), b)
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3]
    for step in ra:
        for key in ("loss", "reward_mean", "kl", "anchor_loss", "grad_norm", "reward/functional_usage", "completion_length"):
            assert ra[step][key] == rb[step][key], (step, key)
        assert ra[step]["data/skipped_records"] == 0
    assert any(r["grad_norm"] > 0 for r in ra.values()), "the updates must not all be zero"
    assert os.path.exists(os.path.join(a, "checkpoints", "3"))


@pytest.mark.slow
def test_an_edited_data_position_is_detected_and_the_run_resumes_from_the_step_before(tmp_path, data, uninterrupted, caplog):
    b = str(tmp_path / "b")
    entry.run_job(_config(**{"data.data_dir": data, "train.stop_at": 2}), b)
    # Step 2's data-iterator position moved on by a few records: a valid state of the same size.
    (victim,) = Path(b, "checkpoints", "2", "data_iter").glob("process_0-of-*.json")
    text = victim.read_text()
    edited = re.sub(r'("next_index": \d*)(\d)', lambda m: m[1] + str((int(m[2]) + 3) % 10), text, count=1)
    assert edited != text and len(edited) == len(text)
    victim.write_text(edited)

    with caplog.at_level(logging.WARNING, logger="atlas_jax.checkpoint"):
        entry.run_job(_config(**{"data.data_dir": data}), b)
    assert "skipping checkpoint step 2" in caplog.text and f"{victim} does not match its checksum" in caplog.text
    # Resumed from step 1: the rollouts and updates of the uninterrupted run, each step logged once.
    with open(os.path.join(b, "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f)] == [1, 2, 3]
    assert _rows(b) == _rows(uninterrupted)


@pytest.mark.slow
def test_two_updates_per_rollout_batch_log_the_pre_update_gap_and_resume(tmp_path, data, uninterrupted):
    over = {"data.data_dir": data, "rl.num_iterations": 2, "train.steps": 2, "optim.warmup_steps": 0}  # the first update moves
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    entry.run_job(_config(**over), a)
    entry.run_job(_config(**over, **{"train.stop_at": 1}), b)
    assert sorted(_rows(b)) == [1]
    entry.run_job(_config(**over), b)
    ra, rb, once = _rows(a), _rows(b), _rows(uninterrupted)
    assert sorted(ra) == sorted(rb) == [1, 2]
    assert sorted(os.listdir(os.path.join(a, "checkpoints")))[-1] == "4"  # 2 rollout batches x 2 updates

    # Rollout batch 1 is sampled from the same parameters as in the one-update run: the same
    # rollouts, and the logged gap is the first update's (sampler vs trainer, nothing else) ...
    assert ra[1]["reward_mean"] == once[1]["reward_mean"]
    assert ra[1]["loss/first"] == once[1]["loss"]
    assert ra[1]["logp_gap/mean_abs"] == once[1]["logp_gap/mean_abs"] < 1e-4
    # ... while the second update sees the log-probs the first one moved.
    for row in ra.values():
        assert row["logp_gap/last_update"] > 10 * row["logp_gap/mean_abs"]
        assert row["loss"] == pytest.approx((row["loss/first"] + row["loss/last"]) / 2)
    for step in ra:
        assert ra[step] == rb[step], step


def test_micro_batch_must_divide_the_rollouts_over_every_batch_shard():
    run_config.validate(_config(**{"rl.micro_batch": 4}), 8, paths=False)  # 8 rollouts, data*fsdp = 4
    for bad in (3, 2, -4):
        with pytest.raises(ConfigError, match=rf"config\.rl\.micro_batch={bad}: expected 0 \(all rollouts at once\) or a divisor "
                                              r"of rl\.prompts_per_step \* rl\.group_size = 8 that is a multiple of data\*fsdp=4"):
            run_config.validate(_config(**{"rl.micro_batch": bad}), 8, paths=False)


def test_micro_batched_resume_without_reference_reads_no_init_params_and_compiles_the_update_once(
        tmp_path, data, monkeypatch, caplog):
    """beta = 0: a resumed run restores its policy and needs no reference, so it never reads
    `checkpoint.init_from`; the update step compiles once (the loop reuses the program compiled
    for the memory report)."""
    over = {"data.data_dir": data, "train.steps": 2, "rl.loss.beta": 0.0, "rl.micro_batch": 4}
    b = str(tmp_path / "b")
    entry.run_job(_config(**over, **{"train.stop_at": 1}), b)
    reads = []
    monkeypatch.setattr(la_grpo_job.checkpoint, "init_from", lambda *args, **kw: reads.append(args))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        entry.run_job(_config(**over, **{"checkpoint.init_from": b}), b)  # any run directory: it is not read
    assert reads == []
    rows = _rows(b)
    assert sorted(rows) == [1, 2] and rows[2]["kl"] == 0.0 and np.isfinite(rows[2]["loss"])
    assert caplog.text.count("Finished XLA compilation of jit(step)") == 1


def always_half(completion, answer, token_ids, /, *, task, functional_ids):
    """A user's reward, named on the command line as 'test_la_grpo_job:always_half=0.1'."""
    return 0.5


def first_token_rule(completion, answer, token_ids, /, *, task, functional_ids):
    """A user's reward that differs within groups about half the time (G = 2)."""
    return float(token_ids[0] % 3 == 0)


RECORDED: list[float] = []


def recorded_first_token_rule(completion, answer, token_ids, /, *, task, functional_ids):
    """`first_token_rule`, each value also appended to RECORDED (one call per rollout, in row order)."""
    RECORDED.append(first_token_rule(completion, answer, token_ids, task=task, functional_ids=functional_ids))
    return RECORDED[-1]


def test_dynamic_sampling_rounds_and_dropped_groups_match_an_independent_count(tmp_path, data):
    """Filtering on the reward takes extra rollout rounds while fewer than prompts_per_step groups
    have unequal rewards; the logged rounds and dropped groups equal a count from the reward calls."""
    c = _config(**{"data.data_dir": data, "train.steps": 2, "rl.filter_groups": "reward", "rl.max_extra_rounds": 2,
                   "rl.custom_rewards": ("test_la_grpo_job:recorded_first_token_rule",)})
    c.rl.rewards = {"accuracy": 0.0}
    RECORDED.clear()
    entry.run_job(c, str(tmp_path))
    B, G = c.rl.prompts_per_step, c.rl.group_size
    calls = np.asarray(RECORDED).reshape(-1, B, G)  # [rounds of all steps, prompts, G]
    informative = calls.max(-1) > calls.min(-1)
    rows, used = _rows(str(tmp_path)), 0
    for step in (1, 2):
        rounds = 1
        while informative[used : used + rounds].sum() < B and rounds <= c.rl.max_extra_rounds:
            rounds += 1
        dropped = int((~informative[used : used + rounds]).sum())
        assert (rows[step]["dynamic/rounds"], rows[step]["dynamic/groups_dropped"]) == (rounds, dropped), step
        assert rows[step]["dynamic/filled_with_dropped"] == max(0, B - (rounds * B - dropped))
        used += rounds
    assert used == len(calls) and used > 2  # every round is accounted for, and some step took extra rounds


def test_groups_are_chosen_informative_first_then_filled():
    rewards = np.array([1, 1, 0, 1, 2, 2, 0, 0], np.float32)  # groups of 2: flat, mixed, flat, flat
    np.testing.assert_array_equal(la_grpo_job.informative_groups(rewards, 2), [False, True, False, False])
    extra = np.array([True, False, True, False])
    groups, filled = la_grpo_job.choose_groups([la_grpo_job.informative_groups(rewards, 2), extra], 4)
    np.testing.assert_array_equal(groups, [1, 4, 6, 0])  # round 0's group 1, round 1's groups 0 and 2, then a flat one
    assert filled == 1
    assert la_grpo_job.choose_groups([extra, extra], 4) == (pytest.approx([0, 2, 4, 6]), 0)


def test_take_groups_and_mask_truncated_pick_the_right_rows():
    G, N = 2, 3
    def batch(offset):
        return {"input_ids": jnp.arange(8 * N).reshape(8, N) + offset, "completion_mask": jnp.ones((8, N), bool),
                "rewards": jnp.arange(8.0) + offset, "pixel_values": jnp.arange(4.0)[:, None] + offset}
    out = la_grpo_job._take_groups([batch(0), batch(100)], np.array([3, 5]), G)
    np.testing.assert_array_equal(out["rewards"], [6, 7, 102, 103])
    np.testing.assert_array_equal(out["pixel_values"][:, 0], [3, 101])
    np.testing.assert_array_equal(out["input_ids"][:, 0], [18, 21, 106, 109])
    b = batch(0)
    b["completion_mask"] = b["completion_mask"].at[1, 2].set(False)  # row 1 stopped early
    masked = la_grpo_job._mask_truncated(b, (11, 99))  # row 3 ends on a stop id (row k ends on 3k + 2)
    np.testing.assert_array_equal(np.asarray(masked["completion_mask"]).any(1), [False, True, False, True, False, False, False, False])
    np.testing.assert_array_equal(masked["completion_mask"][1], [True, True, False])


def test_dynamic_sampling_overlong_custom_rewards_and_metrics(tmp_path, data):
    c = _config(**{"data.data_dir": data, "train.steps": 2, "rl.filter_groups": "reward", "rl.max_extra_rounds": 2,
                   "rl.mask_truncated": True, "rl.overlong_buffer": 4, "rl.reward_errors": "zero",
                   "rl.custom_rewards": ("test_la_grpo_job:always_half=0.1", "test_la_grpo_job:first_token_rule")})
    c.rl.rewards = {"functional_usage": 1.0, "format": 0.2, "overlong": 0.5}
    entry.run_job(c, str(tmp_path))
    rows = _rows(str(tmp_path))
    B = c.rl.prompts_per_step
    for row in rows.values():
        assert row["reward/test_la_grpo_job:always_half"] == 0.5 and row["reward/test_la_grpo_job:always_half_std"] == 0.0
        assert row["reward/errors"] == 0
        assert row["completion_length/min"] <= row["completion_length"] <= row["completion_length/max"] <= 12
        assert 0 <= row["truncated_frac"] <= 1 and -1 <= row["reward/overlong"] <= 0
        assert (row["reward/overlong"] < 0) == (row["completion_length/max"] > 8)
        assert row["entropy"] >= 0 and "clip_ratio/low_mean" in row and "kl" in row
        if row["truncated_frac"] == 1:  # a random tiny model never stops: mask_truncated leaves no loss
            assert row["grad_norm"] == 0 and row["loss"] == 0
        rounds, dropped = row["dynamic/rounds"], row["dynamic/groups_dropped"]
        assert 1 <= rounds <= 3 and dropped >= round(row["frac_reward_zero_std"] * B)
        assert row["dynamic/filled_with_dropped"] == max(0, B - (rounds * B - dropped))
        if rounds == 1:
            assert dropped == round(row["frac_reward_zero_std"] * B)
