"""Dense perception pretraining (issue 12): the data's determinism and targets, the shipped
checkpoint (files, checksums, loading as a Qwen2.5-VL checkpoint, seeing), and the job's
determinism on two short runs."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from atlas_jax.data.synthetic import canvas, perception


# ----------------------------------------------------------------------------- data
def test_samples_are_pure_functions_of_their_arguments():
    a, b = perception.generate("train", 7, seed=3), perception.generate("train", 7, seed=3)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert (a.question, a.response, a.answer) == (b.question, b.response, b.answer)
    other = [perception.generate("train", 8, seed=3), perception.generate("held_out", 7, seed=3), perception.generate("train", 7, seed=4)]
    assert all(o.images[0].tobytes() != a.images[0].tobytes() for o in other)


def test_source_is_unlimited_random_access():
    src = perception.PerceptionSource("train", seed=1)
    assert len(src) >= 2**31 - 1
    assert src[123456789].response == perception.generate("train", 123456789, seed=1).response
    with pytest.raises(IndexError, match="perception/train"):
        src[-1]
    with pytest.raises(ValueError, match="split 'validation' is unknown"):
        perception.generate("validation", 0)


def test_task_stream_with_perception_mixed_in():
    """perception_every=3: records 0, 3, 6, ... are perception questions (sample i // 3 of the
    perception train stream); the others are the plain task stream's records, in its order."""
    from atlas_jax.data.synthetic import SyntheticSource

    plain, mixed = SyntheticSource("train", None, seed=2), SyntheticSource("train", None, seed=2, perception_every=3)
    rows = [mixed[i] for i in range(30)]
    for i in range(0, 30, 3):
        want = perception.generate("train", i // 3, seed=2)
        assert rows[i]["task"] == want.task and rows[i]["question"] == want.question and rows[i]["response"] == want.response
    assert [r["uid"] for i, r in enumerate(rows) if i % 3] == [plain[j]["uid"] for j in range(20)]
    with pytest.raises(ValueError, match="unlimited train split only"):
        SyntheticSource("in_distribution", 4, perception_every=3)
    with pytest.raises(ValueError, match="unlimited train split only"):
        SyntheticSource("train", None, perception_every=-1)
    # The run config's knob reaches the SFT job's training stream, never its evaluation splits.
    from atlas_jax import builders, run_config

    c = run_config.apply_overrides(run_config.base(), {"data.perception_every": 3, "seed": 2})
    run_config.validate(c, 1, paths=False)
    train, held_out = builders.load_split(c, "/unused", "train"), builders.load_split(c, "/unused", "in_distribution")
    assert train[3]["task"].startswith("perception/") and train[4]["uid"] == plain[2]["uid"]
    assert not any(held_out[i]["task"].startswith("perception/") for i in range(8))


def test_description_names_every_object_as_drawn():
    """The dense target states each object's position, colour and shape in reading order, the digit
    and the count; the pixels at each object's centre hold its exact colour."""
    described = 0
    for i in range(60):
        sample, scene = perception.generate_with_scene("train", i, seed=0)
        pixels = np.asarray(sample.images[0])
        objects = scene["objects"]
        assert 1 <= len(objects) <= perception.MAX_OBJECTS
        assert [o["cell"] for o in objects] == sorted(o["cell"] for o in objects)
        assert len({o["color"] for o in objects}) == len(objects)
        for o in objects:
            x, y = (round(v) for v in o["center"])
            assert tuple(pixels[y, x]) == canvas.PALETTE[o["color"]]
            grid = scene["grid"]  # 3 x 3 cells, or the 2 x 2 quadrants of the families' scenes
            assert int(o["center"][0] // (112 / grid)) == o["cell"] % grid and int(o["center"][1] // (112 / grid)) == o["cell"] // grid
            words = perception.POSITIONS if grid == 3 else ("top left", "top right", "bottom left", "bottom right")
            assert o["where"] == words[o["cell"]]
        if scene["kind"] == "describe":
            described += 1
            for o in objects:
                assert f"{o['where'].capitalize()}: " in sample.response
                assert f" {o['color']} {o['kind']}." in sample.response
            for d in scene["digits"]:
                assert f"The digit {d['digit']} is at the {perception.POSITIONS[d['cell']]}." in sample.response
            assert sample.response.endswith("\\boxed{%d}" % len(objects)) and sample.answer == str(len(objects))
        else:
            assert sample.response == "\\boxed{%s}" % sample.answer
    assert 15 <= described <= 45  # DESCRIBE_SHARE = 0.5


def test_question_answers_follow_the_scene():
    seen = set()
    for i in range(200):
        sample, scene = perception.generate_with_scene("held_out", i, seed=0)
        kind, objects = scene["kind"], scene["objects"]
        seen.add(kind)
        by_position = {o["where"]: o for o in objects}
        if kind == "count":
            assert sample.answer == str(len(objects))
        elif kind in ("color_at", "shape_at"):
            where = sample.question.split("at the ")[1].rstrip("?")
            assert sample.answer == by_position[where]["color" if kind == "color_at" else "kind"]
        elif kind == "where_color":
            color = sample.question.split("the ")[1].split(" object")[0]
            assert by_position[sample.answer]["color"] == color
        elif kind == "digit":
            assert sample.answer == (scene["digits"][0]["digit"] if scene["digits"] else "none")
    assert seen == {"describe", *perception.QUESTION_KINDS}


# ----------------------------------------------------------------------------- the shipped checkpoint
def _config(name: str, **over):
    import importlib.util

    from atlas_jax import run_config

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_config.apply_overrides(mod.get_config(), over)


def test_shipped_files_match_their_manifest_and_the_package_data():
    from atlas_jax import pretrained

    manifest = pretrained.verify(pretrained.PERCEIVE_TINY)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(manifest["sha256"])
    assert manifest["command"].startswith("python -m atlas_jax.main --config=configs/perceive_synthetic.py")
    assert os.path.getsize(os.path.join(pretrained.PERCEIVE_TINY, "model.safetensors")) < 8 * 2**20
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"atlas_jax.pretrained" = ["perceive_tiny/*"]' in pyproject


def test_shipped_checkpoint_loads_like_qwen_and_sees(tmp_path):
    """The main job's config loads it through `model.init_from_hf` (tokenizer from the checkpoint,
    functional tokens added in its spare rows, visual-op gates closed), and on held-out perception
    prompts the loaded model answers far above the image-blind prior, and falls with swapped images."""
    from flax import nnx

    from atlas_jax import builders, pretrained, sharding, tokenizer as tokenizer_lib
    from atlas_jax.jobs import perceive

    c = _config("atlas_synthetic", **{"eval.batch_size": 16})
    assert c.model.init_from_hf == pretrained.PERCEIVE_TINY
    base = tokenizer_lib.load_tokenizer(pretrained.PERCEIVE_TINY)
    with open(os.path.join(pretrained.PERCEIVE_TINY, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert hf_config["eos_token_id"] == base.convert_tokens_to_ids("<|im_end|>")
    assert len(base) < hf_config["vocab_size"]  # spare rows, as Qwen2.5-VL's 151665 of 152064

    mesh = sharding.make_mesh((-1, 1, 1))
    tok = builders.make_tokenizer(c, str(tmp_path))
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)
    assert tokens.functional_ids == tuple(range(len(base), len(base) + 5))
    text = "Inside the outlined region the red objects are 2 circles <|Shape|> so \\boxed{2}."
    assert tok.decode(tokenizer_lib.encode_trusted(tok, text)) == text
    model = builders.make_model(c, tok, tokens, mesh)
    assert model.cfg.text.vocab_size == hf_config["vocab_size"] and model.cfg.visual_ops.enabled

    graphdef, params = nnx.split(model)
    policy = builders.Policy(tok, tokens, model.cfg, graphdef, params)
    held = [perception.generate("held_out", i, seed=1) for i in range(48)]
    report = perceive.check(policy, _config("perceive_synthetic", **{"eval.batch_size": 16, "seed": 1}), held, mesh)
    assert report["accuracy"] >= report["prior"] + 0.25, report
    assert report["image_swap"] <= report["accuracy"] - 0.2, report
    assert report["token_accuracy"] > report["token_accuracy_image_swap"] + 0.05, report


# ----------------------------------------------------------------------------- the command
@pytest.mark.slow  # two runs of the job: ~2 min on 2 cores
def test_two_short_runs_of_the_command_write_identical_checkpoints(tmp_path):
    """Bit-for-bit across machines is not promised (XLA's CPU code differs with the CPU, the
    device count and the jax version, and float sums with it), so the shipped files are not
    re-derived here; two runs of the same command on the same machine are identical, file by file."""
    from atlas_jax import main as entry, pretrained

    over = {"train.steps": 2, "train.log_every": 1, "data.batch_size": 8, "eval.batch_size": 8, "eval.num_per_task": 8,
            "checkpoint.async_save": False, "tokenizer.vocab_size": 400}
    manifests = []
    for run in ("a", "b"):
        entry.run_job(_config("perceive_synthetic", **over), str(tmp_path / run))
        manifests.append(pretrained.verify(str(tmp_path / run / "hf")))
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert manifests[0]["steps"] == 2 and manifests[0]["held_out_check"]["num_samples"] == 8
    assert json.loads((tmp_path / "a" / "hf" / "config.json").read_text())["model_type"] == "qwen2_5_vl"


# ----------------------------------------------------------------------------- the learning-rate split
def test_vision_tower_learning_rate_split():
    """`optim.vision_lr_scale` scales the tower's Adam step (a parameter group) and nothing else;
    a frozen tower stays frozen; a non-positive scale is refused by name."""
    import jax
    from flax import nnx

    from atlas_jax import run_config, sharding
    from atlas_jax.model import presets, vlm
    from atlas_jax.model.config import ConfigError
    from atlas_jax.train import optimizer

    params = nnx.state(vlm.create(presets.tiny(), sharding.make_mesh((-1, 1, 1))), nnx.Param)
    ones = jax.tree.map(lambda x: x * 0 + 1, params)
    for freeze, scale, want_vision in ((False, 0.1, 1e-3), (True, 0.1, 0.0), (False, 1.0, 1e-2)):
        tx = optimizer.make_optimizer(params, lr=1e-2, warmup_steps=0, total_steps=10, clip_norm=0.0,
                                      train=optimizer.trainable(freeze), vision_lr_scale=scale)
        updates, _ = tx.update(ones, tx.init(params), params)
        tower, rest = nnx.split_state(updates, nnx.PathContains("vision"), ...)
        assert all(np.allclose(abs(x), want_vision, rtol=1e-3) for x in jax.tree.leaves(tower))
        assert all(np.allclose(abs(x), 1e-2, rtol=1e-3) for x in jax.tree.leaves(rest))
    c = run_config.apply_overrides(run_config.base(), {"optim.vision_lr_scale": 0.0})
    with pytest.raises(ConfigError, match="optim.vision_lr_scale"):
        run_config.validate(c, 1, paths=False)


def test_tiny_decoder_can_tell_image_columns_and_rows_apart():
    """M-RoPE gives an image token's width index the head's lowest frequencies: with Qwen's
    theta the tiny model's 4 x 4 merged tokens one column apart are rotated by < 0.01 rad, so no
    query can prefer the left object to the right one. The preset's theta must separate them."""
    import jax.numpy as jnp

    from atlas_jax.model import presets, rope

    t = presets.tiny().text

    def step_angle(axis):  # largest rotation (rad) between two image tokens one step apart on `axis`
        pos = np.zeros((1, 3, 2), np.int32)
        pos[0, axis, 1] = 1
        cos, sin = rope.mrope_cos_sin(jnp.asarray(pos), t.head_dim, t.rope_theta, t.mrope_section)
        angle = np.arctan2(np.asarray(sin), np.asarray(cos))
        return float(np.abs(angle[0, 1] - angle[0, 0]).max())

    assert step_angle(2) >= 0.3 and step_angle(1) >= 0.5, (step_angle(1), step_angle(2))
    wide = rope.mrope_cos_sin(jnp.asarray(np.array([[[0, 0], [0, 0], [0, 1]]], np.int32)), t.head_dim, 10000.0, t.mrope_section)
    assert np.abs(np.arctan2(np.asarray(wide[1]), np.asarray(wide[0]))[0, 1]).max() < 0.01  # what theta 10000 gave
