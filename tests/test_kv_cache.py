"""Cached decoding equals the full forward, with images and open visual-op gates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import sharding
from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import presets, vlm
from hf_model_fixture import IMAGE, VEND, VSTART, example, jax_batch

FUNC = (310, 311, 312)


def tiny_cfg(mode, max_positions=16):
    cfg = presets.tiny(vocab_size=320, image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND, video_token_id=301)
    return presets.with_visual_ops(cfg, FUNC, mode=mode, layer=1, num_heads=2, head_dim=16, max_positions=max_positions)


def _open_gates(model):
    if model.visual_ops is not None:
        model.visual_ops.gate[...] = jnp.array([0.7, -0.5, 1.1])


@pytest.mark.parametrize(
    "mode,max_positions,cont,scan",
    [("vocab", 16, 8, False), ("module", 16, 8, False), ("module", 3, 6, False), ("module", 16, 8, True)],
    ids=["vocab", "module", "module_capped", "module_scanned"],
)
def test_decode_matches_full_forward(mode, max_positions, cont, scan):
    """capped: 5 functional tokens per sample, 1 in the prefilled prompt and 4 decoded, with the
    modules acting on the first 3 only: the cache's count keeps decoding on the same 3.
    scanned: the layers run as scans around the visual operations, the cache updated in place."""
    cfg = tiny_cfg(mode, max_positions).replace(scan_layers=scan)
    model = vlm.create(cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), seed=1)
    _open_gates(model)
    rng = np.random.default_rng(0)
    examples = []
    for n_before, grids in ((3, [(1, 4, 6)]), (6, [(1, 8, 8), (1, 4, 4)])):
        e = example(rng, n_before, grids, 2)
        e.ids += [FUNC[0], 5, 6, FUNC[2], 7, FUNC[1], FUNC[1], 9]  # continuation with functional tokens
        examples.append(e)
    batch = jax_batch(examples, cfg, pad_left=True)
    (ids, pos, mask), images = model_inputs(jax.tree.map(jnp.asarray, batch))
    pv, vis = images["pixel_values"], images["vision"]
    full, _, _ = model(ids, pos, mask, pixel_values=pv, vision=vis)

    T = ids.shape[1]
    T0 = T - cont
    cache = model.init_cache(ids.shape[0], T + 3)
    logits, cache, _ = model(ids[:, :T0], pos[..., :T0], mask[:, :T0], pixel_values=pv, vision=vis, cache=cache)
    np.testing.assert_allclose(logits, full[:, :T0], atol=1e-5, rtol=0)

    step = jax.jit(lambda m, i, p, k, c: m(i, p, k, cache=c)[:2])
    for t in range(T0, T):
        logits, cache = step(model, ids[:, t : t + 1], pos[..., t : t + 1], mask[:, t : t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}")
    assert int(cache.index) == T
