"""The LA-GRPO step: in-step advantages + pulled-back gradient equal a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atlas_jax import sampling, sharding
from atlas_jax.jobs import la_grpo as job
from atlas_jax.data.device_batch import LAYOUT_KEYS, model_inputs
from atlas_jax.model import vlm
from atlas_jax.model.rope import next_position
from atlas_jax.rl import losses
from atlas_jax.train import la_grpo, train_state
from hf_model_fixture import example, jax_batch
from test_kv_cache import FUNC, tiny_cfg

G, N = 2, 6


def _rollouts(cfg, with_func=True, seed=0):
    """2 prompts x G completions: left-padded prompt + completion, images per prompt."""
    rng = np.random.default_rng(seed)
    prompts = [example(rng, 3, [(1, 4, 4)], 2), example(rng, 5, [(1, 4, 6)], 1)]
    pb = jax_batch(prompts, cfg, pad_left=True)
    B, Tp = pb["input_ids"].shape
    comp = rng.integers(0, 256, (B * G, N)).astype(np.int32)
    if with_func:
        comp[0, 1], comp[1, 3], comp[3, 0] = FUNC[0], FUNC[2], FUNC[1]
    cmask = np.ones((B * G, N), bool)
    cmask[1, 4:] = False
    comp[1, 4:] = 0
    rep = lambda x: np.repeat(x, G, axis=0)  # noqa: E731
    start = np.stack([next_position(pb["positions"][b], pb["attention_mask"][b]) for b in range(B)])
    cpos = rep(start)[:, None] + np.arange(N)[None]
    batch = {
        "input_ids": np.concatenate([rep(pb["input_ids"]), comp], 1),
        "attention_mask": np.concatenate([rep(pb["attention_mask"]), cmask], 1),
        "positions": np.concatenate([rep(pb["positions"]), np.broadcast_to(cpos[:, None], (B * G, 3, N))], 2).astype(np.int32),
        "completion_mask": cmask,
        "pixel_values": pb["pixel_values"],
        **{k: pb[k] for k in LAYOUT_KEYS},
        "old_logprobs": (rng.standard_normal((B * G, N)) * 0.1 - 3).astype(np.float32),
        "rewards": np.array([1.0, 0.0, 0.5, 0.5], np.float32),
    }
    return batch


def _setup(alpha, beta=0.0, loss_type="grpo", entropy_coef=0.0, importance_level="token"):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = tiny_cfg("module")
    model = vlm.create(cfg, mesh, seed=2)
    model.visual_ops.gate[...] = jnp.full(3, 0.5)
    tx = optax.sgd(0.1)
    graphdef, state, shardings = train_state.create(model, tx, mesh)
    lc = losses.GRPOLossConfig(loss_type=loss_type, alpha=alpha, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                               entropy_coef=entropy_coef, importance_level=importance_level)
    return cfg, graphdef, state, shardings, tx, lc


def _jax(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _dense_logprobs_entropy(model, batch, temperature):
    """The tempered policy's log-probs and entropy from the model's own dense head ([R, N, V] logits)."""
    args, images = model_inputs(batch)
    images = jax.tree.map(lambda x: jnp.repeat(x, G, axis=0), images)
    logits, _, _ = model(*args, **images)
    logp_rnv = jax.nn.log_softmax(logits[:, -N - 1 : -1].astype(jnp.float32) / temperature, axis=-1)
    picked = jnp.take_along_axis(logp_rnv, batch["input_ids"][:, -N:, None], axis=-1)[..., 0]
    return picked, -jnp.sum(jnp.exp(logp_rnv) * logp_rnv, axis=-1)


@pytest.mark.parametrize("alpha,beta,loss_type,entropy_coef,temperature",
                         [(0.0, 0.0, "grpo", 0.0, 1.0), (0.5, 0.04, "dr_grpo", 0.0, 1.0), (1.0, 0.0, "bnpo", 0.0, 1.0),
                          (0.5, 0.04, "grpo", 0.05, 0.7)])
def test_step_equals_direct_gradient_of_the_loss(alpha, beta, loss_type, entropy_coef, temperature):
    cfg, graphdef, state, shardings, tx, lc = _setup(alpha, beta, loss_type, entropy_coef)
    batch = _jax(_rollouts(cfg))
    ref_params = jax.tree.map(lambda x: x * 1.01, state.params) if beta > 0 else None
    params0 = jax.tree.map(jnp.copy, state.params)

    # Direct: advantages written out (TRL: unbiased std), plain jax.grad of the whole loss.
    r = np.asarray(batch["rewards"]).reshape(-1, G)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)

    def loss_fn(p):
        logp, entropy = _dense_logprobs_entropy(nnx.merge(graphdef, p), batch, temperature)
        ref = _dense_logprobs_entropy(nnx.merge(graphdef, ref_params), batch, temperature)[0] if beta > 0 else None
        tokens = batch["input_ids"][:, -N:]
        func = jnp.isin(tokens, jnp.asarray(FUNC)) & batch["completion_mask"]
        rollouts = losses.Rollouts(batch["old_logprobs"], jnp.asarray(adv), batch["completion_mask"], func, ref)
        return losses.grpo_loss(logp, rollouts, lc, entropy)

    (loss_ref, metrics_ref), g = jax.value_and_grad(loss_fn, has_aux=True)(params0)
    want = optax.apply_updates(params0, jax.tree.map(lambda x: -0.1 * x, g))

    step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, temperature=temperature, functional_ids=FUNC,
                                state_sharding=shardings, batch_sharding=None, ref_sharding=None)
    state, m = step(state, ref_params, batch)
    assert abs(float(m["loss"]) - float(loss_ref)) < 1e-6
    assert abs(float(m["entropy"]) - float(metrics_ref["entropy"])) < 1e-5 and float(m["entropy"]) > 0.1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert step._cache_size() == 1  # advantages, loss, update: one compiled program
    if alpha > 0:
        assert 0 < float(m["anchor/grad_share"]) < 10
    assert int(m["num_functional"]) == 3


@pytest.mark.parametrize("loss_type,importance_level,alpha,beta",
                         [("grpo", "token", 0.5, 0.04), ("dapo", "sequence", 0.5, 0.0), ("dr_grpo", "sequence", 0.0, 0.04)])
def test_micro_batched_step_equals_the_whole_batch_step(loss_type, importance_level, alpha, beta):
    """4 micro-batches of 1 rollout (the reference forward too): the loss, every metric and the
    updated parameters are the whole-batch step's."""
    results = []
    for micro_batch in (0, 1):
        cfg, graphdef, state, shardings, tx, lc = _setup(alpha, beta, loss_type, 0.01, importance_level)
        batch = _jax(dict(_rollouts(cfg), rewards=np.array([1.0, 0.0, 0.25, 0.75], np.float32)))
        ref_params = jax.tree.map(lambda x: x * 1.01, state.params) if beta > 0 else None
        step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, temperature=0.8, functional_ids=FUNC, micro_batch=micro_batch,
                                    state_sharding=shardings, batch_sharding=None)
        state, m = step(state, ref_params, batch)
        results.append((jax.device_get(state.params), jax.device_get(m)))
    (want_params, want), (got_params, got) = results
    assert float(want["grad_norm"]) > 1e-3 and abs(float(want["loss"])) > 1e-4 and (beta == 0 or float(want["kl"]) > 1e-6)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_micro_batch_must_divide_the_rollouts():
    cfg, graphdef, state, shardings, tx, lc = _setup(0.0)
    step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, micro_batch=3, state_sharding=shardings, batch_sharding=None)
    with pytest.raises(ValueError, match="micro_batch=3: expected 0 or a divisor of the 4 rollouts"):
        step(state, None, _jax(_rollouts(cfg)))


def test_alpha_zero_is_plain_grpo_and_no_functional_tokens_gives_zero_anchor():
    outs = []
    for alpha, with_func in ((0.0, True), (0.7, False), (0.0, False)):
        cfg, graphdef, state, shardings, tx, lc = _setup(alpha)
        batch = _jax(_rollouts(cfg, with_func=with_func))
        step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, functional_ids=FUNC, state_sharding=shardings, batch_sharding=None)
        state, m = step(state, None, batch)
        outs.append((jax.device_get(state.params), m))
    (_, m0), (p1, m1), (p2, m2) = outs
    assert float(m1["anchor_loss"]) == 0.0 and np.isfinite(float(m1["loss"]))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)  # alpha has no effect without functional tokens


def test_equal_rewards_give_zero_update_and_no_nan():
    cfg, graphdef, state, shardings, tx, lc = _setup(0.5)
    batch = _rollouts(cfg)
    batch["rewards"] = np.ones(4, np.float32)
    step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, functional_ids=FUNC, state_sharding=shardings, batch_sharding=None)
    _, m = step(state, None, _jax(batch))
    assert float(m["grad_norm"]) == 0.0 and float(m["loss"]) == 0.0


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_first_update_ratio_is_one_at_any_temperature_with_filters_on(temperature):
    """The sampler's old log-probs and the step's are of one tempered distribution: at the first
    update every sampled token's importance ratio is 1 (top-k / top-p do not enter either side)."""
    cfg, graphdef, state, shardings, tx, lc = _setup(0.5, beta=0.04)
    rng = np.random.default_rng(1)
    prompts = _jax(jax_batch([example(rng, 3, [(1, 4, 4)], 2), example(rng, 5, [(1, 4, 6)], 1)], cfg, pad_left=True))
    scfg = sampling.SamplingConfig(max_new_tokens=N, temperature=temperature, top_k=20, top_p=0.9, num_samples=G)
    out = sampling.generate(graphdef, state.params, prompts, jax.random.key(0), scfg)
    rl_batch = job._rollout_batch(out, prompts, jnp.array([1.0, 0.0, 0.5, 0.25]))
    step = la_grpo.make_rl_step(graphdef, tx, lc, group_size=G, temperature=temperature, functional_ids=FUNC,
                                state_sharding=shardings, batch_sharding=None)
    _, m = step(state, jax.tree.map(jnp.copy, state.params), rl_batch)
    assert float(m["logp_gap/mean_abs"]) < 1e-5
    assert abs(float(m["kl"])) < 1e-6  # reference = policy: the same convention on the KL side
