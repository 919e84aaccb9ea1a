"""The NNX vision tower against transformers' Qwen2_5_VisionTransformerPretrainedModel (torch, CPU).

A tiny HF tower (depth 4, width 32, 2 heads, window 56 px = 2x2 merged units, full attention in
blocks 1 and 3) with every parameter randomised (so norm scales and biases matter) is loaded
into `VisionTower`; HF's `pooler_output` on the flat patch sequence of one sample is the
reference for our padded per-sample rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from atlas_jax import sharding
from atlas_jax.model.config import VisionConfig
from atlas_jax.hf_checkpoint import CheckpointError, load_state_dict, state_dict as hf_state_dict, vision_entries
from atlas_jax.model.vision import VisionTower
from atlas_jax.model.vision_layout import batch_vision_layout, vision_layout

TINY = dict(
    depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=48, window_size=56
)
CFG = VisionConfig(**TINY, fullatt_block_indexes=(1, 3))
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_tower():
    hc = Qwen2_5_VLVisionConfig(**TINY, fullatt_block_indexes=[1, 3])
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name
            p.copy_(torch.randn_like(p) * (0.1 if is_norm else 0.05) + (1.0 if is_norm else 0.0))
    return model


def load_vision(tower, weights):
    load_state_dict(tower, vision_entries(CFG), weights)


@pytest.fixture(scope="module")
def state_dict(hf_tower):
    return {k: v.numpy() for k, v in hf_tower.state_dict().items()}


@pytest.fixture(scope="module")
def tower(state_dict):
    t = VisionTower(CFG, rngs=nnx.Rngs(0))
    load_vision(t, state_dict)
    return t


def pixels(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, CFG.patch_dim)).astype(np.float32)


def hf_pooled(hf_tower, grids, px):
    with torch.no_grad():
        out = hf_tower(torch.from_numpy(px), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


def padded_batch(samples, max_patches):
    """samples: [(grids, px)] -> (pixel_values [B, P, C], layout of jnp arrays)."""
    pv = np.zeros((len(samples), max_patches, CFG.patch_dim), np.float32)
    for b, (_, px) in enumerate(samples):
        pv[b, : len(px)] = px
    layout = batch_vision_layout([g for g, _ in samples], CFG, max_patches)
    return jnp.asarray(pv), {k: jnp.asarray(v) for k, v in layout.items()}


@pytest.mark.parametrize(
    "grids",
    [
        [(1, 8, 12)],  # 4x6 merged units: whole 2x2 windows
        [(1, 8, 12), (1, 6, 4)],  # second image 3x2 units: HF pads its windows
        [(2, 6, 10)],  # two frames: one full-attention segment per frame, partial windows
    ],
    ids=["one_image", "two_images", "two_frames"],
)
def test_matches_hf(hf_tower, tower, grids):
    px = pixels(grids, seed=1)
    ref = hf_pooled(hf_tower, grids, px)
    pv, layout = padded_batch([(grids, px)], max_patches=len(px) + 16)
    out = np.asarray(tower(pv, layout))
    assert out.shape == (1, (len(px) + 16) // 4, CFG.out_hidden_size)
    assert np.abs(ref).max() > 0.1  # a reference that could hide a wrong mapping would be ~0
    np.testing.assert_allclose(out[0, : len(ref)], ref, atol=TOL, rtol=0)
    assert np.all(out[0, len(ref) :] == 0)


def test_batch_with_padding_equals_each_sample_alone(hf_tower, tower):
    samples = [[(1, 8, 12)], [(1, 6, 4), (1, 4, 6)]]
    data = [(g, pixels(g, seed=10 + i)) for i, g in enumerate(samples)]
    pv, layout = padded_batch(data, max_patches=112)
    out = np.asarray(jax.jit(lambda gd, st, x, lay: nnx.merge(gd, st)(x, lay))(*nnx.split(tower), pv, layout))
    for b, (grids, px) in enumerate(data):
        ref = hf_pooled(hf_tower, grids, px)
        np.testing.assert_allclose(out[b, : len(ref)], ref, atol=TOL, rtol=0)
        assert np.all(out[b, len(ref) :] == 0), f"sample {b}: padding units must be zero"


def test_jit_and_remat_equal_eager(state_dict, tower):
    grids = [(1, 8, 12), (1, 6, 4)]
    pv, layout = padded_batch([(grids, pixels(grids, seed=2))], max_patches=128)
    eager = np.asarray(tower(pv, layout))
    jitted = np.asarray(nnx.jit(lambda m, x, lay: m(x, lay))(tower, pv, layout))
    np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=0)

    remat_tower = VisionTower(CFG, rngs=nnx.Rngs(1), remat="full")
    load_vision(remat_tower, state_dict)

    def loss(m):
        return jnp.sum(m(pv, layout) ** 2)

    g_plain = nnx.jit(nnx.grad(loss))(tower)
    g_remat = nnx.jit(nnx.grad(loss))(remat_tower)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_is_close(hf_tower, state_dict):
    grids = [(1, 8, 12)]
    px = pixels(grids, seed=3)
    ref = hf_pooled(hf_tower, grids, px)
    bf = VisionTower(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    load_vision(bf, state_dict)
    pv, layout = padded_batch([(grids, px)], max_patches=96)
    out = bf(pv, layout)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))[0, : len(ref)]
    assert np.all(np.isfinite(out))
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


def test_hf_state_dict_round_trip(state_dict, tower):
    back = hf_state_dict(tower, vision_entries(CFG), prefix="visual.")
    assert set(back) == {"visual." + k for k in state_dict}
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back["visual." + k], v)


def test_load_rejects_mismatched_weights(state_dict):
    t = VisionTower(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.weight"):
        load_vision(t, {k: v for k, v in state_dict.items() if k != "blocks.3.attn.qkv.weight"})
    bad = dict(state_dict, **{"merger.mlp.2.bias": np.zeros(7, np.float32)})
    with pytest.raises(CheckpointError, match=r"merger\.mlp\.2\.bias"):
        load_vision(t, bad)


# ------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("grids", [[(1, 8, 12), (1, 6, 4)], [(2, 6, 10), (1, 10, 2)]])
def test_layout_equals_hf_index_functions(grids):
    max_patches = sum(t * h * w for t, h, w in grids) + 24
    lay = vision_layout(grids, CFG, max_patches)
    g = torch.tensor(grids)
    ref_index, ref_cu_windows = get_vision_window_index(g, CFG.spatial_merge_size, CFG.window_size, CFG.patch_size)
    n = len(ref_index)
    np.testing.assert_array_equal(lay["window_index"][:n], ref_index.numpy())
    np.testing.assert_array_equal(lay["window_index"][n:], np.arange(n, max_patches // 4))
    np.testing.assert_array_equal(lay["unit_valid"], np.arange(max_patches // 4) < n)

    ref_pos = get_vision_position_ids(g, CFG.spatial_merge_size).numpy()
    np.testing.assert_array_equal(lay["rope_hw"][: 4 * n], ref_pos)
    assert np.all(lay["rope_hw"][4 * n :] == 0)

    # Segment ids -> cumulative boundaries must reproduce HF's cu_seqlens lists.
    for key, ref_cu in [("full_segments", get_vision_cu_seqlens(g)), ("window_segments", ref_cu_windows)]:
        seg = lay[key]
        assert np.all(seg[4 * n :] == 0) and np.all(seg[: 4 * n] > 0)
        change = np.flatnonzero(np.diff(seg[: 4 * n])) + 1
        np.testing.assert_array_equal(np.concatenate([[0], change, [4 * n]]), ref_cu.numpy(), err_msg=key)
        assert len(np.unique(seg[: 4 * n])) == len(ref_cu) - 1  # ids are distinct per segment


def test_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"144 patches.*max_patches=128"):
        vision_layout([(1, 8, 12), (1, 8, 6)], CFG, 128)
    with pytest.raises(ValueError, match=r"max_patches=126.*multiple of merge_unit=4"):
        vision_layout([(1, 2, 2)], CFG, 126)
    with pytest.raises(ValueError, match=r"grid_thw\[1\]=\(1, 5, 4\)"):
        vision_layout([(1, 2, 2), (1, 5, 4)], CFG, 128)
    with pytest.raises(ValueError, match=r"sample 1: .*max_patches=16"):
        batch_vision_layout([[(1, 2, 2)], [(1, 4, 6)]], CFG, 16)


# ------------------------------------------------------------------------------- mesh
def test_sharded_forward_equals_single_device(state_dict, tower):
    mesh = sharding.make_mesh((2, 2, 2))
    sharded = sharding.sharded_init(lambda: VisionTower(CFG, rngs=nnx.Rngs(0)), mesh)
    load_vision(sharded, state_dict)
    qkv = sharded.blocks[0].attn.qkv.kernel[...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    assert not qkv.sharding.is_fully_replicated

    samples = [[(1, 8, 12)], [(1, 6, 4), (1, 4, 6)], [(2, 4, 4)], [(1, 2, 2)]]
    pv, layout = padded_batch([(g, pixels(g, seed=20 + i)) for i, g in enumerate(samples)], max_patches=112)
    single = np.asarray(tower(pv, layout))

    pv = jax.device_put(pv, sharding.batch_sharding(mesh, pv.ndim))
    layout = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in layout.items()}
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x, lay: m(x, lay))(sharded, pv, layout)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
