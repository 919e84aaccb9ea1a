"""The JAX model against `transformers`' Qwen2_5_VLForConditionalGeneration on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax import hf_checkpoint, sharding
from atlas_jax.data.device_batch import model_inputs
from hf_model_fixture import IMAGE, assert_logits_match, example, jax_batch, make_hf_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    torch_model = make_hf_checkpoint(path)
    return path, torch_model


@pytest.fixture(scope="module")
def jax_model(ckpt):
    return hf_checkpoint.from_hf(ckpt[0], mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))


def _check(model, torch_model, examples, pad_left):
    assert_logits_match(model, torch_model, examples, pad_left=pad_left, atol=TOL)


def test_text_only(ckpt, jax_model):
    e = example(np.random.default_rng(0), 17, [], 0)
    _check(jax_model, ckpt[1], [e], pad_left=False)


def test_one_image(ckpt, jax_model):
    e = example(np.random.default_rng(1), 5, [(1, 8, 12)], 6)
    _check(jax_model, ckpt[1], [e], pad_left=False)


def test_two_images_of_different_sizes(ckpt, jax_model):
    e = example(np.random.default_rng(2), 4, [(1, 8, 12), (1, 6, 4)], 5)
    _check(jax_model, ckpt[1], [e], pad_left=False)


@pytest.mark.parametrize("pad_left", [False, True])
def test_padded_batch(ckpt, jax_model, pad_left):
    rng = np.random.default_rng(3)
    examples = [example(rng, 3, [(1, 4, 6)], 9), example(rng, 7, [(1, 8, 8), (1, 4, 4)], 2), example(rng, 11, [], 0)]
    _check(jax_model, ckpt[1], examples, pad_left=pad_left)


def test_hf_positions_equal_ours(ckpt, jax_model):
    """Our host-side M-RoPE ids equal transformers' get_rope_index (left padding included)."""
    rng = np.random.default_rng(4)
    examples = [example(rng, 3, [(1, 4, 6)], 9), example(rng, 2, [(1, 8, 8), (1, 4, 4)], 4)]
    batch = jax_batch(examples, jax_model.cfg, pad_left=True)
    ids = torch.from_numpy(batch["input_ids"]).long()
    grids = torch.tensor([g for e in examples for g in e.grids])
    ref, _ = ckpt[1].model.get_rope_index(
        ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=grids,
        attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
    )
    np.testing.assert_array_equal(batch["positions"], ref.numpy().transpose(1, 0, 2))  # HF: [3, B, T]


def test_vision_tower_alone(ckpt, jax_model):
    rng = np.random.default_rng(5)
    e = example(rng, 0, [(1, 8, 12), (1, 6, 4)], 0)
    batch = jax_batch([e], jax_model.cfg, pad_left=False)
    _, images = model_inputs(jax.tree.map(jnp.asarray, batch))
    got = np.asarray(jax_model.image_features(images["pixel_values"], images["vision"]))
    with torch.no_grad():
        ref = ckpt[1].model.visual(torch.from_numpy(np.concatenate(e.pixel_rows)), grid_thw=torch.tensor(e.grids)).pooler_output
    n = ref.shape[0]
    np.testing.assert_allclose(got[0, :n], ref.numpy(), atol=TOL, rtol=0)


def test_tied_embeddings(tmp_path):
    torch_model = make_hf_checkpoint(str(tmp_path), tie=True, seed=1)
    model = hf_checkpoint.from_hf(str(tmp_path), mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    assert model.lm_head is None
    e = example(np.random.default_rng(6), 5, [(1, 4, 4)], 5)
    _check(model, torch_model, [e], pad_left=False)
