"""The LA-GRPO job on 8 fake devices: rollouts, rewards, updates, checkpoint, exact resume."""

import importlib.util
import json
import os

import pytest

from atlas_jax import main as entry, run_config


def _config(**over):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "la_grpo_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("la_grpo")
    c.mesh = (2, 2, 2)
    c.data.synthetic_config = "tiny"
    c.data.num_per_task = 2
    c.rl.steps = 3
    c.rl.prompts_per_step = 4
    c.rl.group_size = 2
    c.rl.max_new_tokens = 12
    c.rl.temperature = 1.5  # a random tiny model: hot sampling so some completions hold functional tokens
    c.rl.lr = 1e-3
    c.rl.beta = 0.02  # exercise the reference model too
    c.rl.rewards = {"functional_usage": 1.0, "format": 0.2}
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.eval.num_per_task = 0
    return run_config.apply_overrides(c, over)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
def test_three_iterations_checkpoint_and_resume_identically(tmp_path):
    data = str(tmp_path / "data")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    entry.run_job(_config(**{"data.data_dir": data}), a)
    entry.run_job(_config(**{"data.data_dir": data, "train.stop_at": 2}), b)
    assert sorted(_rows(b)) == [1, 2]
    entry.run_job(_config(**{"data.data_dir": data}), b)
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3]
    for step in ra:
        for key in ("loss", "reward_mean", "kl", "anchor_loss", "grad_norm", "reward/functional_usage", "completion_length"):
            assert ra[step][key] == rb[step][key], (step, key)
    assert any(r["grad_norm"] > 0 for r in ra.values()), "the updates must not all be zero"
    assert os.path.exists(os.path.join(a, "checkpoints", "3"))
