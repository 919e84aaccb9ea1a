"""The run configuration: each setting has one home (its dataclass's default and range check), the
recipe's stages differ only by their `stages.<job>` sections, and the run's token ids are derived
once from the tokenizer."""

import dataclasses
import importlib.util
import os
import re

import ml_collections
import pytest

from atlas_jax import run_config, sampling
from atlas_jax.data import synthetic
from atlas_jax.model.config import ConfigError
from atlas_jax.rl import losses
from atlas_jax.tokenizer import RunTokens
from hf_tokenizer_fixture import make_tokenizer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def test_rl_sections_take_their_defaults_from_the_dataclasses_that_use_them():
    c = run_config.base()
    loss_defaults = {f.name: f.default for f in dataclasses.fields(losses.GRPOLossConfig)}
    assert c.rl.loss.to_dict() == {k: loss_defaults[k] for k in c.rl.loss}
    sample_defaults = {f.name: f.default for f in dataclasses.fields(sampling.SamplingConfig)}
    assert c.rl.sample.to_dict() == {k: sample_defaults[k] for k in run_config.ROLLOUT_SAMPLING}
    # The dataclasses built from the sections carry the sections' values (and the run's ids).
    c.rl.loss.alpha, c.rl.sample.temperature, c.rl.sample.max_new_tokens = 0.3, 0.7, 40
    assert run_config.loss_config(c) == losses.GRPOLossConfig(alpha=0.3, max_completion_length=40)
    tokens = RunTokens(functional=(("line", 9),), stop_ids=(3, 4), pad_id=4, image_id=5, video_id=6,
                       vision_start_id=7, vision_end_id=8)
    got = run_config.rollout_sampling(c, tokens, num_samples=4)
    assert got == sampling.SamplingConfig(max_new_tokens=40, temperature=0.7, stop_ids=(3, 4), pad_id=4, num_samples=4)


@pytest.mark.parametrize("field,value,message", [
    ("rl.loss.alpha", -0.1, r"config\.rl\.loss\.alpha=-0\.1: expected a python float >= 0"),
    ("rl.loss.loss_type", "ppo", r"config\.rl\.loss\.loss_type='ppo': expected one of"),
    ("rl.loss.epsilon_low", 1.5, r"config\.rl\.loss\.epsilon_low=1\.5: expected < 1"),
    ("rl.sample.top_p", 0.0, r"config\.rl\.sample\.top_p=0\.0: expected in \(0, 1\]"),
    ("rl.sample.temperature", 0.0, r"config\.rl\.sample\.temperature=0\.0: expected > 0"),
    ("rl.sample.max_new_tokens", 0, r"config\.rl\.sample\.max_new_tokens=0: expected >= 1"),
    ("rl.scale_rewards", "global", r"config\.rl\.scale_rewards='global'"),
    ("model.dtype", "float8", r"config\.model\.dtype='float8': expected one of"),
    ("mesh", (0, 1, 1), r"config\.mesh=\(0, 1, 1\): expected \(data, fsdp, tensor\) sizes >= 1"),
    ("seed", -1, r"config\.seed=-1"),
    ("model.visual_ops.num_heads", 0, r"config\.model\.visual_ops\.num_heads=0: expected >= 1"),
    ("model.visual_ops.layer", 99, r"config\.model\.visual_ops\.layer=99: expected -1 \(the middle\) or a decoder layer 0\.\.3"),
    ("train.log_every", 0, r"config\.train\.log_every=0: expected >= 1"),
    ("optim.lr", float("inf"), r"config\.optim\.lr=inf: expected a finite number > 0"),
    ("optim.warmup_steps", -1, r"config\.optim\.warmup_steps=-1"),
    ("optim.clip_norm", -1.0, r"config\.optim\.clip_norm=-1\.0"),
    ("optim.b1", 1.5, r"config\.optim\.b1=1\.5: expected in \[0, 1\)"),
    ("optim.b2", -0.1, r"config\.optim\.b2=-0\.1"),
    ("optim.weight_decay", -0.01, r"config\.optim\.weight_decay=-0\.01"),
    ("train.steps", -5, r"config\.train\.steps=-5"),
    ("data.image_size", 56, r"config\.data\.image_size=56: expected a multiple of 28, >= 112"),
    ("data.max_length", 0, r"config\.data\.max_length=0: expected a positive token count"),
    ("data.max_patches", 30, r"config\.data\.max_patches=30: expected a positive multiple of merge_size\*\*2=4"),
    ("data.perception_every", -1, r"config\.data\.perception_every=-1: expected 0, or > 0 in an SFT job"),
    ("data.tasks", ("zoom_color", "no_such_family"), r"config\.data\.tasks=\('zoom_color', 'no_such_family'\): expected distinct names among \['shape_count'"),
    ("data.tasks", ("zoom_color", "zoom_color"), r"config\.data\.tasks=.*expected distinct names"),
    ("data.pad_to_multiple", -8, r"config\.data\.pad_to_multiple=-8: expected >= 0"),
    ("data.sft_target", "answer", r"config\.data\.sft_target='answer': expected 'trajectory', 'answer_only' or 'mixed'"),
    ("data.answer_only_share", -0.5, r"config\.data\.answer_only_share=-0\.5: expected a fraction in \[0, 1\]"),
    ("rl.sample.top_k", -3, r"config\.rl\.sample\.top_k=-3"),
    ("rl.rewards.accuracy", float("nan"), r"config\.rl\.rewards\.accuracy=nan"),
    ("rl.custom_rewards", ("no_such_module_xyz:f=1",), r"config\.rl\.custom_rewards\[0\]='no_such_module_xyz:f=1': cannot import"),
    ("rl.custom_rewards", ("atlas_jax.rl.rewards:extract_boxed",), r"config\.rl\.custom_rewards\[0\]=.*expected fn\(completion_text"),
    ("rl.reward_errors", "ignore", r"config\.rl\.reward_errors='ignore': expected raise \| zero"),
    ("rl.filter_groups", "std", r"config\.rl\.filter_groups='std'"),
    ("rl.max_extra_rounds", -1, r"config\.rl\.max_extra_rounds=-1"),
    ("rl.overlong_buffer", 0, r"config\.rl\.overlong_buffer=0"),
    ("checkpoint.init_from", "/no/such/run", r"config\.checkpoint\.init_from='/no/such/run': expected an existing run directory"),
    ("model.init_from_hf", "/no/such/ckpt", r"config\.model\.init_from_hf='/no/such/ckpt': expected a Hugging Face checkpoint"),
])
def test_a_bad_field_is_rejected_once_by_name(field, value, message):
    c = run_config.apply_overrides(run_config.base(), {field: value})
    with pytest.raises(ConfigError, match=message):
        run_config.validate(c, 8)


def test_a_condition_can_have_its_own_evaluation_size():
    c = run_config.base()
    assert [run_config.eval_num_per_task(c, s) for s in ("in_distribution", "hard")] == [16, 16]
    c.eval.num_per_task_by_condition = ml_collections.ConfigDict({"in_distribution": 64})
    run_config.validate(c, 8)
    assert [run_config.eval_num_per_task(c, s) for s in ("in_distribution", "hard")] == [64, 16]
    c.eval.num_per_task_by_condition.shifted = 0
    with pytest.raises(ConfigError, match=r"config\.eval\.num_per_task_by_condition\.shifted=0: expected an integer >= 1"):
        run_config.validate(c, 8)
    c.eval.num_per_task_by_condition = ml_collections.ConfigDict({"in_distrbution": 64})
    with pytest.raises(ConfigError, match=r"config\.eval\.num_per_task_by_condition=\['in_distrbution'\]: expected keys among"):
        run_config.validate(c, 8)


def test_overlong_buffer_is_bounded_by_the_sampled_length_when_the_reward_is_on():
    c = run_config.apply_overrides(run_config.base(), {"rl.sample.max_new_tokens": 12, "rl.overlong_buffer": 16})
    run_config.validate(c, 8)  # the overlong reward is off: the buffer is not used
    c.rl.rewards.overlong = 0.5
    with pytest.raises(ConfigError, match=r"config\.rl\.overlong_buffer=16: expected in \[1, rl\.sample\.max_new_tokens=12\]"):
        run_config.validate(c, 8)


def test_recipe_stages_are_the_recipe_config_plus_their_own_section():
    c = _load("atlas_synthetic.py")
    run_config.validate(c, 1)
    sft, rl = run_config.stage(c, "sft"), run_config.stage(c, "la_grpo", **{"checkpoint.init_from": "/runs/sft"})
    assert "stages" not in sft and "stages" not in rl
    assert (sft.job, sft.train.steps, sft.optim.lr, sft.eval.every, sft.data.perception_every) == ("sft", 1000, 3e-3, 0, 3)
    assert rl.data.perception_every == 0 and tuple(sft.data.tasks) == tuple(rl.data.tasks) == synthetic.CELL_SCENE_TASKS
    assert (rl.job, rl.train.steps, rl.optim.lr, rl.optim.warmup_steps, rl.eval.every) == ("la_grpo", 120, 5e-4, 5, 0)
    assert (rl.rl.sample.temperature, rl.rl.group_size, rl.rl.filter_groups) == (0.5, 8, "reward")
    assert rl.checkpoint.init_from == "/runs/sft" and rl.rl.loss.alpha == 0.1
    # Everything else is shared, and equals the standalone LA-GRPO config's budget.
    standalone = _load("la_grpo_synthetic.py", "la_grpo")
    for key in ("train.steps", "optim.lr", "optim.warmup_steps", "rl.prompts_per_step", "rl.group_size",
                "rl.sample.max_new_tokens", "rl.sample.temperature", "rl.filter_groups", "rl.loss.alpha", "data.max_length"):
        section, name = key.rsplit(".", 1)
        assert rl[section][name] == standalone[section][name], key
    # A bad value in a stage is caught before anything runs, naming the stage's field.
    c.stages.la_grpo.optim.lr = -1.0
    with pytest.raises(ConfigError, match=r"config\.optim\.lr=-1\.0"):
        run_config.validate(c, 1)


def test_run_tokens_are_the_tokenizers_ids(tmp_path):
    tok = make_tokenizer(tmp_path)
    tokens = RunTokens.of(tok, ("line", "manip"))
    assert tokens.functional_names == ("line", "manip")
    assert tokens.functional_ids == tuple(tok.convert_tokens_to_ids(t) for t in ("<|Line|>", "<|Manip|>"))
    assert tokens.stop_ids == (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    assert tokens.pad_id == tok.pad_token_id
    assert tokens.image_id == tok.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(KeyError, match="<\\|Line\\|>"):
        RunTokens.of(make_tokenizer(tmp_path, functional=False), ("line",))


def test_cli_reports_bad_input_in_one_line_with_exit_status_2(tmp_path):
    """`python -m atlas_jax.main` with a bad override: one readable line on stderr, exit status 2,
    no traceback (and the traceback with --verbose), before any work is done."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cases = {
        "--config.optim.lrr=1": r"unknown key 'optim\.lrr': config\.optim has no field 'lrr' .*did you mean 'lr'\?",
        "--config.optimizer.lr=1": r"the config has no field 'optimizer' .*did you mean 'optim'\?",
        "--config.rl.sample.temperature=0": r"config\.rl\.sample\.temperature=0\.0: expected > 0",
        "--config.checkpoint.init_from=/no/such/run": r"config\.checkpoint\.init_from='/no/such/run'",
    }
    workdir = tmp_path / "run"
    for override, message in cases.items():
        cmd = [sys.executable, "-m", "atlas_jax.main", "--config=configs/sft_synthetic.py", f"--workdir={workdir}", override]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (override, proc.stderr[-2000:])
        assert re.search(message, lines[0]), (override, lines[0])
    assert not workdir.exists() or not any(workdir.iterdir())  # rejected before any work
    verbose = subprocess.run([*cmd, "--verbose"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_pod_configs_validate_for_their_slices_and_la_grpo_ignores_data_batch_size():
    """Each 7B config divides the slice it is sized for (`:v5e` = 64 chips, default 32); an
    LA-GRPO run batches rl.prompts_per_step prompts, so data.batch_size need not divide it."""
    for name in ("sft_qwen25vl_7b.py", "la_grpo_qwen25vl_7b.py"):
        run_config.validate(_load(name), 32, paths=False)
        run_config.validate(_load(name, "v5e"), 64, paths=False)
    rl = _load("la_grpo_qwen25vl_7b.py")
    rl.data.batch_size = 16
    run_config.validate(rl, 32, paths=False)
    sft = _load("sft_qwen25vl_7b.py")
    sft.data.batch_size = 16
    with pytest.raises(ConfigError, match=r"config\.data\.batch_size=16: expected a positive multiple of .*=32"):
        run_config.validate(sft, 32, paths=False)
