"""The rollout sampler against references it does not share code with: step-by-step argmax of
full (uncached) forwards, log_softmax of full forwards, `transformers`' top-k / top-p warpers,
and a single-device run for the 2x2x2 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from atlas_jax import sampling, sharding
from atlas_jax.data.device_batch import LAYOUT_KEYS, batch_shardings
from atlas_jax.model import presets, vlm
from atlas_jax.sampling import SamplingConfig
from hf_model_fixture import IMAGE, VEND, VSTART, example, jax_batch

FUNC = (310, 311, 312)
T_PROMPT, MAX_PATCHES = 24, 64
N = 6


def tiny_cfg(mode):
    cfg = presets.tiny(vocab_size=320, image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND, video_token_id=301)
    return presets.with_visual_ops(cfg, FUNC, mode=mode, layer=1, num_heads=2, head_dim=16)


def make_model(mode, mesh=None):
    mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = vlm.create(tiny_cfg(mode), mesh, seed=1)
    if model.visual_ops is not None:
        model.visual_ops.gate[...] = jnp.array([0.7, -0.5, 1.1])
    # Larger head rows for the functional tokens, so sampled completions contain some and the
    # visual ops act during decoding (a random model would almost never pick them).
    model.lm_head.kernel[...] = model.lm_head.kernel[...].at[:, list(FUNC)].multiply(4.0)
    return model


def make_batch(seed, n_prompts=2):
    rng = np.random.default_rng(seed)
    shapes = [(3, [(1, 4, 6)], 2), (6, [(1, 4, 4)], 4), (2, [(1, 4, 8)], 1), (5, [(1, 8, 4)], 3)]
    examples = [example(rng, *shapes[i % len(shapes)]) for i in range(n_prompts)]
    examples[0].ids[1] = FUNC[2]  # a functional token in a prompt: its op runs at prefill
    return jax_batch(examples, tiny_cfg("vocab"), pad_left=True, length=T_PROMPT, max_patches=MAX_PATCHES)


@pytest.fixture(scope="module")
def model():
    return make_model("module")


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


@pytest.fixture(scope="module")
def batch():
    return make_batch(0)


@jax.jit
def _full_forward(model, ids, pos, mask, pv, vis):
    logits, _, aux = model(ids, pos, mask, pixel_values=pv, vision=vis)
    return logits, aux


def full_forward(model, batch, tokens_rn, mask_rn, G):
    """Uncached forward over prompt + completion (rows repeated G times). Completion positions
    are computed here from the prompt positions (max valid + 1, counting up)."""
    ids = np.repeat(batch["input_ids"], G, 0)
    pmask = np.repeat(batch["attention_mask"], G, 0)
    ppos = np.repeat(batch["positions"], G, 0)
    start = np.where(pmask[:, None], ppos, 0).max(axis=(1, 2)) + 1
    cpos = np.broadcast_to((start[:, None] + np.arange(tokens_rn.shape[1]))[:, None], (len(start), 3, tokens_rn.shape[1]))
    seq = np.concatenate([ids, tokens_rn], 1)
    mask = np.concatenate([pmask, mask_rn], 1)
    pos = np.concatenate([ppos, cpos], 2).astype(np.int32)
    pv = np.repeat(batch["pixel_values"], G, 0)
    vis = {k: np.repeat(batch[k], G, 0) for k in LAYOUT_KEYS}
    logits, aux = _full_forward(model, seq, pos, mask, pv, vis)
    return np.asarray(logits), jax.tree.map(np.asarray, aux)


def test_greedy_equals_stepwise_argmax_of_full_forwards(model, split, batch):
    out = sampling.generate(*split, batch, None, SamplingConfig(max_new_tokens=N, greedy=True))
    B = batch["input_ids"].shape[0]
    ref = np.zeros((B, N), np.int32)
    ref_lp = np.zeros((B, N), np.float32)
    for n in range(N):  # grow the sequence one argmax at a time; future slots are masked out
        mask = np.arange(N)[None].repeat(B, 0) < n
        logits, _ = full_forward(model, batch, ref, mask, 1)
        step = logits[:, T_PROMPT - 1 + n]
        ref[:, n] = step.argmax(-1)
        ref_lp[:, n] = jax.nn.log_softmax(step)[np.arange(B), ref[:, n]]
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref)
    np.testing.assert_allclose(np.asarray(out["logprobs"]), ref_lp, atol=1e-5, rtol=0)
    assert np.asarray(out["mask"]).all() and np.asarray(out["lengths"]).tolist() == [N] * B
    np.testing.assert_array_equal(np.asarray(out["prompt_ids"]), batch["input_ids"])


def test_sampled_logprobs_and_op_maps_match_full_forward(model, split, batch):
    G, Nl = 2, 8
    cfg = SamplingConfig(max_new_tokens=Nl, num_samples=G, return_op_attention=True)
    out = jax.tree.map(np.asarray, sampling.generate(*split, batch, jax.random.key(3), cfg))
    tokens, mask = out["tokens"], out["mask"]
    fed = np.isin(tokens[:, :-1], FUNC)
    assert fed.any(), "no functional token was sampled: the decode-time visual ops went untested"
    logits, aux = full_forward(model, batch, tokens, mask, G)
    ref_lp = np.take_along_axis(jax.nn.log_softmax(logits[:, T_PROMPT - 1 : -1]), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], np.where(mask, ref_lp, 0), atol=1e-5, rtol=0)
    # Temperature 1, no filters: the sampling distribution is the policy itself.
    np.testing.assert_allclose(out["sample_logprobs"], out["logprobs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["prompt_positions"], np.repeat(batch["positions"], G, 0))
    # Op maps of completion tokens equal the full forward's maps at the same positions.
    ops = aux["ops"]
    for r, n in zip(*np.nonzero(fed)):
        k = list(ops["position"][r]).index(T_PROMPT + n)
        assert out["op"][r, n] == FUNC.index(tokens[r, n]) == ops["op"][r, k]
        np.testing.assert_allclose(out["op_attention"][r, n], ops["attn"][r, k], atol=1e-5)
    assert (out["op"][:, :-1] >= 0).sum() == fed.sum()


def test_stop_tokens_end_sequences(split, batch):
    G = 2
    base = jax.tree.map(np.asarray, sampling.generate(*split, batch, jax.random.key(5), SamplingConfig(max_new_tokens=N, num_samples=G)))
    stop = int(base["tokens"][0, 2])
    out = jax.tree.map(np.asarray, sampling.generate(*split, batch, jax.random.key(5), SamplingConfig(max_new_tokens=N, num_samples=G, stop_ids=(stop, 999), pad_id=7)))
    for r in range(base["tokens"].shape[0]):
        hits = np.nonzero(base["tokens"][r] == stop)[0]
        length = int(hits[0]) + 1 if hits.size else N
        assert out["lengths"][r] == length
        np.testing.assert_array_equal(out["tokens"][r, :length], base["tokens"][r, :length])
        assert (out["tokens"][r, length:] == 7).all()
        np.testing.assert_array_equal(out["mask"][r], np.arange(N) < length)
        assert (out["logprobs"][r, length:] == 0).all()
    assert out["lengths"][0] == 3
    # Every row stops at its second token: the loop ends early.
    stops = tuple(sorted({int(t) for t in base["tokens"][:, 1]}))
    out = sampling.generate(*split, batch, jax.random.key(5), SamplingConfig(max_new_tokens=N, num_samples=G, stop_ids=stops))
    assert int(out["steps"]) == 2
    assert np.asarray(out["lengths"]).max() <= 2 and out["tokens"].shape == (2 * G, N)


def test_logprobs_are_the_tempered_unfiltered_policy(model, split, batch):
    """logprobs: log_softmax(logits / T)[token] whatever top-k / top-p (what the trainer recomputes);
    sample_logprobs: the filtered distribution's, >= logprobs (filtering only removes mass)."""
    G, Nl, temp = 2, 6, 0.7
    cfg = SamplingConfig(max_new_tokens=Nl, num_samples=G, temperature=temp, top_k=20, top_p=0.9)
    out = jax.tree.map(np.asarray, sampling.generate(*split, batch, jax.random.key(4), cfg))
    tokens, mask = out["tokens"], out["mask"]
    logits, _ = full_forward(model, batch, tokens, mask, G)
    ref_lp = np.take_along_axis(jax.nn.log_softmax(logits[:, T_PROMPT - 1 : -1] / temp), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], np.where(mask, ref_lp, 0), atol=1e-5, rtol=0)
    assert (out["sample_logprobs"][mask] >= out["logprobs"][mask] - 1e-5).all()
    assert (out["sample_logprobs"][mask] > out["logprobs"][mask] + 1e-3).any()


def test_top_k_one_equals_greedy(split, batch):
    greedy = sampling.generate(*split, batch, None, SamplingConfig(max_new_tokens=N, greedy=True))
    topk = sampling.generate(*split, batch, jax.random.key(9), SamplingConfig(max_new_tokens=N, top_k=1, temperature=0.7))
    np.testing.assert_array_equal(np.asarray(topk["tokens"]), np.asarray(greedy["tokens"]))
    np.testing.assert_allclose(np.asarray(topk["sample_logprobs"]), 0.0, atol=1e-6)


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: set(np.nonzero(np.isfinite(np.asarray(sampling.top_p_filter(logits, p))[0]))[0])  # noqa: E731
    assert kept(0.8) == {1, 3, 4}  # 0.5 + 0.2 < 0.8, so 0.15 joins
    assert kept(0.69) == {1, 3}
    assert kept(0.3) == {1}  # the top token is always kept
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Random rows against transformers' warpers (the reference implementations).
    x = np.random.default_rng(0).standard_normal((16, 50)).astype(np.float32) * 2
    for p in (0.3, 0.75, 0.95):
        ref = TopPLogitsWarper(p)(None, torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(x), p))), np.isfinite(ref))
    for k in (1, 5, 49):
        ref = TopKLogitsWarper(k)(None, torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(np.isfinite(np.asarray(sampling.top_k_filter(jnp.asarray(x), k))), np.isfinite(ref))


def test_sampling_is_seeded_and_samples_differ(split, batch):
    cfg = SamplingConfig(max_new_tokens=N, num_samples=2)
    a = np.asarray(sampling.generate(*split, batch, jax.random.key(5), cfg)["tokens"])
    b = np.asarray(sampling.generate(*split, batch, jax.random.key(5), cfg)["tokens"])
    c = np.asarray(sampling.generate(*split, batch, jax.random.key(6), cfg)["tokens"])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a[0] != a[1]).any() and (a[2] != a[3]).any()  # the G samples of each prompt


def test_no_recompile_for_a_new_batch_of_the_same_shapes(split, batch):
    cfg = SamplingConfig(max_new_tokens=N, num_samples=2)
    sampling.generate(*split, batch, jax.random.key(0), cfg)
    before = sampling._generate_jit._cache_size()
    other = make_batch(1)
    assert (other["input_ids"] != batch["input_ids"]).any()
    out = sampling.generate(*split, other, jax.random.key(1), cfg)
    # Temperature, top-p and stop ids are traced: changing them reuses the program too.
    sampling.generate(*split, other, jax.random.key(1), SamplingConfig(max_new_tokens=N, num_samples=2, temperature=0.5, stop_ids=(4,)))
    assert sampling._generate_jit._cache_size() == before
    assert out["tokens"].shape == (4, N)


def test_2x2x2_mesh_with_batch_sharded_inputs_matches_one_device():
    batch = make_batch(2, n_prompts=4)
    single = make_model("vocab")
    mesh = sharding.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(single)
    state8 = jax.device_put(state, sharding.state_shardings(state, mesh))
    rows = ("data", "fsdp")
    sharded = jax.device_put(batch, batch_shardings(batch, mesh))
    for cfg in (SamplingConfig(max_new_tokens=N, greedy=True), SamplingConfig(max_new_tokens=N, num_samples=2, top_p=0.9)):
        ref = sampling.generate(graphdef, state, batch, jax.random.key(2), cfg)
        out = sampling.generate(graphdef, state8, sharded, jax.random.key(2), cfg)
        np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref["tokens"]))
        np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(ref["logprobs"]), atol=1e-5)
        assert out["tokens"].sharding.spec[0] == rows


def test_pipeline_layout_batches_and_config_errors(split, batch):
    # A pipeline batch's host metadata is not read: the same tokens.
    flat = batch | {"answer": ["1", "2"], "task": ["a", "b"]}
    cfg = SamplingConfig(max_new_tokens=N, greedy=True)
    np.testing.assert_array_equal(
        np.asarray(sampling.generate(*split, flat, None, cfg)["tokens"]),
        np.asarray(sampling.generate(*split, batch, None, cfg)["tokens"]),
    )
    with pytest.raises(KeyError, match="positions"):
        sampling.generate(*split, {k: v for k, v in flat.items() if k != "positions"}, None, cfg)
    with pytest.raises(KeyError, match="rope_hw"):
        sampling.generate(*split, {k: v for k, v in flat.items() if k != "rope_hw"}, None, cfg)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="rng"):
        sampling.generate(*split, batch, None, SamplingConfig(max_new_tokens=4))
