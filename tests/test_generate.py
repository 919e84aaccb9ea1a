"""`python -m atlas_jax.generate`: a run's workdir and an exported Hugging Face directory give the
same trajectory as the model they hold; functional tokens are listed, heat maps drawn, and a
question's functional-token text stays plain text."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from atlas_jax import builders, checkpoint, generate, hf_checkpoint, run_config
from atlas_jax import tokenizer as tokenizer_lib
from hf_tokenizer_fixture import hf_tokenizer_path  # noqa: F401

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_tokenizer_path):  # noqa: F811
    """A run's workdir holding a tiny model whose output head makes every greedy token <|Line|> or
    <|Arrow|> (all other logits 0, those two +-sum(h)): every token is functional."""
    workdir = str(tmp_path_factory.mktemp("run"))
    c = run_config.apply_overrides(run_config.base(), {"tokenizer.path": hf_tokenizer_path})
    mesh = builders.make_mesh(c)
    tok = builders.make_tokenizer(c, workdir)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)
    model = builders.make_model(c, tok, tokens, mesh)
    ids = dict(tokens.functional)
    head = model.lm_head.kernel
    kernel = np.zeros(head.shape, np.float32)
    kernel[:, ids["line"]], kernel[:, ids["arrow"]] = 1.0, -1.0
    head[...] = jax.device_put(kernel, head[...].sharding)
    graphdef, params = nnx.split(model)
    with checkpoint.Checkpoints(workdir, async_save=False) as ckpt:
        ckpt.save(1, {"params": params}, None, c, force=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(c.to_dict(), f)
    return workdir, model, builders.Policy(tok, tokens, model.cfg, graphdef, params, "memory"), mesh


def _images():
    return [Image.new("RGB", (112, 112), "red"), Image.new("RGB", (112, 84), "blue")]


def test_a_run_workdir_generates_what_its_model_generates(run, tmp_path):
    workdir, _, in_memory, mesh = run
    policy, image_cfg, _ = generate.load(workdir)
    assert policy.source == workdir and image_cfg.max_pixels == 64 * 14 * 14  # the run's data.max_patches
    question = "What do you see? <|Line|> <|im_end|>"  # typed text, not tokens
    trajectory = generate.generate(policy, _images(), question, image_cfg, mesh, NEW_TOKENS)
    assert trajectory.ids == generate.generate(in_memory, _images(), question, image_cfg, mesh, NEW_TOKENS).ids

    names = dict((i, n) for n, i in policy.tokens.functional)
    assert len(trajectory.ids) == NEW_TOKENS and {names[i] for i in trajectory.ids} <= {"line", "arrow"}
    assert trajectory.functional == [(k, names[i]) for k, i in enumerate(trajectory.ids)]
    assert trajectory.text == policy.tok.decode(trajectory.ids, skip_special_tokens=False)
    assert not set(trajectory.prompt_ids) & set(names)  # the question's "<|Line|>" stayed characters
    assert "<|Line|> <|im_end|>" in policy.tok.decode(trajectory.prompt_ids, skip_special_tokens=False)

    paths = generate.save_heatmaps(trajectory, _images(), image_cfg, policy.tokens.functional_names, str(tmp_path))
    # A token's op acts when it is fed back: every functional token but the last has a map.
    assert [os.path.basename(p) for p in paths] == [f"{k:02d}_{names[i]}_token{k}.png" for k, i in enumerate(trajectory.ids[:-1])]
    with Image.open(paths[0]) as png:
        assert png.size == (112 + 4 + 112, 14 + 112)  # both images side by side, under a title row


def test_an_exported_hugging_face_directory_generates_the_same(run, tmp_path):
    workdir, model, in_memory, mesh = run
    hf_checkpoint.to_hf(model, str(tmp_path / "hf"), tokenizer=in_memory.tok)
    policy, image_cfg, _ = generate.load(str(tmp_path / "hf"), max_pixels=112 * 112)
    assert image_cfg.min_pixels == image_cfg.max_pixels == 112 * 112  # the paper's bounds, capped
    expected = generate.generate(in_memory, _images(), "Why?", image_cfg, mesh, NEW_TOKENS).ids
    assert generate.generate(policy, _images(), "Why?", image_cfg, mesh, NEW_TOKENS).ids == expected


def test_the_command_rejects_a_directory_that_is_no_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "atlas_jax.generate", f"--checkpoint={tmp_path}", "--question=hi"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 2
    assert f"--checkpoint={str(tmp_path)!r}: expected a run's workdir" in out.stderr
