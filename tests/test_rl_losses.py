"""GRPO / LA-GRPO loss and advantages against an independent PyTorch reference.

The reference below is written in TRL's style (per_token_loss, completion_mask, torch.std) from
TRL's published GRPOTrainer definitions, and compared with the JAX loss and with its gradient
w.r.t. the current log-probs (jax.grad vs torch autograd), in float32.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax.sharding import batch_sharding, make_mesh
from atlas_jax.rl.losses import (BatchTotals, GRPOLossConfig, Rollouts, anchor_term, finish_metrics, group_advantages, grpo_loss,
                                 grpo_loss_part, per_token_surrogate)
from atlas_jax.rl.losses import per_token_kl as losses_per_token_kl

B, T, G = 8, 12, 4
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- torch reference (TRL style)


def torch_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards == "group":
        std_rewards = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = rewards.std().expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def torch_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
               functional_mask, loss_type, beta, epsilon_low, epsilon_high, alpha, max_completion_length):
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    surrogate = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = surrogate
    per_token_kl = None
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        num_items_in_batch = completion_mask.sum()
        loss = (per_token_loss * completion_mask).sum() / num_items_in_batch.clamp(min=1.0)
    # LA-GRPO anchor: the surrogate averaged over functional completion tokens of the whole batch.
    anchor_mask = functional_mask * completion_mask
    anchor = (surrogate * anchor_mask).sum() / anchor_mask.sum().clamp(min=1.0)
    grpo_only = loss
    if alpha != 0.0:
        loss = loss + alpha * anchor

    token_count = completion_mask.sum().clamp(min=1.0)
    adv = advantages.unsqueeze(1)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (adv < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (adv > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics = {
        "clip_ratio/low_mean": (is_low_clipped.float() * completion_mask).sum() / token_count,
        "clip_ratio/high_mean": (is_high_clipped.float() * completion_mask).sum() / token_count,
        "clip_ratio/region_mean": (is_region_clipped.float() * completion_mask).sum() / token_count,
        "ratio/mean": (coef_1 * completion_mask).sum() / token_count,
        "anchor_loss": anchor,
        "num_functional": anchor_mask.sum(),
        "logp_gap/mean_abs": ((per_token_logps - old_per_token_logps).abs() * completion_mask).sum() / token_count,
    }
    if alpha != 0.0:  # the anchor's share of the gradient w.r.t. the token log-probs
        grpo_norm = torch.autograd.grad(grpo_only, per_token_logps, retain_graph=True)[0].norm()
        anchor_norm = torch.autograd.grad(alpha * anchor, per_token_logps, retain_graph=True)[0].norm()
        metrics["grad_logp/grpo_norm"] = grpo_norm
        metrics["grad_logp/anchor_norm"] = anchor_norm
        metrics["anchor/grad_share_logp"] = anchor_norm / (grpo_norm + anchor_norm)
    if per_token_kl is not None:
        metrics["kl"] = (per_token_kl * completion_mask).sum() / token_count
    return loss, metrics


# ---------------------------------------------------------------------------- inputs


def make_inputs(seed, clipping):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.8, (B, T)).astype(np.float32)
    # Far from logp -> many ratios outside [0.8, 1.2]; close -> none.
    old = (logp + rng.normal(0, 0.6 if clipping else 0.01, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    lengths[3] = 0  # a completion with no tokens at all (must not divide by zero)
    mask = np.arange(T)[None] < lengths[:, None]
    functional = (rng.random((B, T)) < 0.15) & mask
    functional[0, 0] = True
    functional[5, T - 1] = True  # a padded position: never counted
    rewards = rng.normal(0, 1, B).astype(np.float32)
    return dict(logp=logp, old=old, ref=ref, mask=mask, functional=functional, rewards=rewards)


def rollouts(x, adv, with_ref=False, **kw):
    return Rollouts(x["old"], adv, x["mask"], x["functional"], x["ref"] if with_ref else None, **kw)


def jax_value_and_grad(x, adv, cfg, with_ref):
    def f(lp):
        return grpo_loss(lp, rollouts(x, adv, with_ref), cfg)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(x["logp"]))


def torch_value_and_grad(x, adv, cfg):
    lp = torch.tensor(x["logp"], requires_grad=True)
    loss, metrics = torch_loss(
        lp, torch.tensor(x["old"]), torch.tensor(x["ref"]), torch.tensor(np.asarray(adv)),
        torch.tensor(x["mask"], dtype=torch.float32), torch.tensor(x["functional"], dtype=torch.float32),
        cfg.loss_type, cfg.beta, cfg.epsilon_low, cfg.epsilon_high, cfg.alpha, cfg.max_completion_length or T,
    )
    loss.backward()
    return loss.detach().numpy(), lp.grad.numpy(), {k: v.detach().numpy() for k, v in metrics.items()}


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "loss_type,beta,clipping,alpha",
    [(lt, b, c, a) for lt, b, c in itertools.product(("grpo", "bnpo", "dapo", "dr_grpo"), (0.0, 0.04), (True, False))
     for a in ((0.0, 0.5) if b == 0.04 else (0.0,))],
)
def test_loss_and_grad_match_torch_reference(loss_type, beta, clipping, alpha):
    seed = ("grpo", "bnpo", "dapo", "dr_grpo").index(loss_type) * 10 + int(beta > 0) * 2 + int(clipping)
    x = make_inputs(seed=seed, clipping=clipping)
    adv = np.asarray(group_advantages(x["rewards"], G))
    cfg = GRPOLossConfig(loss_type=loss_type, beta=beta, epsilon_high=0.28, alpha=alpha,
                         max_completion_length=16 if loss_type == "dr_grpo" else None)
    (loss, metrics), grad = jax_value_and_grad(x, adv, cfg, with_ref=beta > 0)
    ref_loss, ref_grad, ref_metrics = torch_value_and_grad(x, adv, cfg)

    np.testing.assert_allclose(loss, ref_loss, **TOL)
    np.testing.assert_allclose(grad, ref_grad, **TOL)
    assert np.abs(ref_grad).max() > 1e-3  # the comparison is not between two zero arrays
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, err_msg=name, **TOL)
    if alpha:
        assert 0.0 < metrics["anchor/grad_share_logp"] < 1.0
    clip_fraction = float(metrics["clip_ratio/region_mean"])
    assert (clip_fraction > 0.1) if clipping else (clip_fraction == 0.0)
    # The reported parts add up to the loss (aggregation is linear).
    np.testing.assert_allclose(metrics["pg_loss"] + metrics["kl_loss"] + alpha * metrics["anchor_loss"], loss, **TOL)


def test_dapo_normalises_by_the_whole_batch_tokens_given():
    x = make_inputs(seed=3, clipping=True)
    adv = group_advantages(x["rewards"], G)
    cfg = GRPOLossConfig(loss_type="dapo")
    sum_loss, _ = grpo_loss(x["logp"], rollouts(x, adv, totals=BatchTotals(B, 1.0, 1.0)), cfg)
    bnpo, _ = grpo_loss(x["logp"], rollouts(x, adv), GRPOLossConfig(loss_type="bnpo"))
    np.testing.assert_allclose(sum_loss / x["mask"].sum(), bnpo, **TOL)


@pytest.mark.parametrize("loss_type,importance_level", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                                        ("bnpo", "sequence"), ("grpo", "sequence")])
def test_micro_batch_parts_add_up_to_the_whole_batch(loss_type, importance_level):
    """Row parts given the whole batch's totals: their losses, d loss / d logp and metric shares
    add up to the whole batch's (what the micro-batched update step relies on)."""
    x = make_inputs(seed=11, clipping=True)
    adv = group_advantages(x["rewards"], G)
    entropy = np.random.default_rng(0).uniform(0.5, 2.0, (B, T)).astype(np.float32)
    cfg = GRPOLossConfig(loss_type=loss_type, importance_level=importance_level, beta=0.04, alpha=0.5, entropy_coef=0.01)
    whole = rollouts(x, adv, with_ref=True)
    f = lambda lp, r, h: grpo_loss_part(lp, r, cfg, h)  # noqa: E731
    (loss, want), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]), whole, entropy)
    want = finish_metrics(want, adv)
    totals = BatchTotals.of(x["mask"], x["functional"])
    rows = np.arange(B).reshape(-1, 2).T  # 2 strided parts of B/2 rows, as the step splits them
    parts = [jax.value_and_grad(f, has_aux=True)(
        jnp.asarray(x["logp"][i]), Rollouts(*(np.asarray(a)[i] for a in whole[:5]), totals), entropy[i])
        for i in rows]
    shares = jax.tree.map(lambda *v: sum(v), *[m for (_, m), _ in parts])
    got = finish_metrics(shares, adv)
    np.testing.assert_allclose(sum(l for (l, _), _ in parts), loss, rtol=1e-6, atol=1e-7)
    got_grad = np.zeros((B, T), np.float32)
    for i, (_, g) in zip(rows, parts):
        got_grad[i] = g
    np.testing.assert_allclose(got_grad, grad, rtol=1e-6, atol=1e-8)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------- LA-GRPO anchor


def test_alpha_zero_is_plain_grpo_bit_for_bit():
    x = make_inputs(seed=7, clipping=True)
    adv = group_advantages(x["rewards"], G)
    no_functional = np.zeros_like(x["functional"])
    plain = GRPOLossConfig(beta=0.04)
    (l0, _), g0 = jax_value_and_grad(x, adv, plain, with_ref=True)
    (l1, _), g1 = jax_value_and_grad({**x, "functional": no_functional}, adv, plain, with_ref=True)
    # An anchor weight on a batch without functional tokens adds exactly 0 too.
    (l2, _), g2 = jax_value_and_grad({**x, "functional": no_functional}, adv,
                                     GRPOLossConfig(beta=0.04, alpha=0.7), with_ref=True)
    ref_loss, _, _ = torch_value_and_grad(x, adv, plain)
    assert np.array_equal(l0, l1) and np.array_equal(g0, g1)
    assert np.array_equal(l0, l2) and np.array_equal(g0, g2)
    np.testing.assert_allclose(l0, ref_loss, **TOL)
    # ...and alpha > 0 with functional tokens present does change it.
    (l3, _), _ = jax_value_and_grad(x, adv, GRPOLossConfig(beta=0.04, alpha=0.7), with_ref=True)
    assert not np.allclose(l3, l0)


def test_anchor_gradient_only_at_functional_positions():
    x = make_inputs(seed=11, clipping=False)
    adv = group_advantages(x["rewards"], G)

    def anchor_only(lp):
        s_bt, _ = per_token_surrogate(lp, x["old"], adv, x["mask"], 0.2, 0.2)
        return anchor_term(s_bt, x["mask"], x["functional"])[0]

    grad = np.asarray(jax.grad(anchor_only)(jnp.asarray(x["logp"])))
    at_functional = x["functional"] & x["mask"]
    assert np.all(grad[~at_functional] == 0.0)
    assert np.all(grad[at_functional][adv.repeat(T).reshape(B, T)[at_functional] != 0] != 0.0)
    # d/dlogp of the unclipped anchor is -A * rho / |M_func| at each functional position.
    rho = np.exp(x["logp"] - x["old"])
    expected = np.where(at_functional, -np.asarray(adv)[:, None] * rho / at_functional.sum(), 0.0)
    np.testing.assert_allclose(grad, expected, **TOL)
    # Through the full loss: what alpha adds to the gradient lives on functional positions only.
    _, g_plain = jax_value_and_grad(x, adv, GRPOLossConfig(), with_ref=False)
    _, g_anchored = jax_value_and_grad(x, adv, GRPOLossConfig(alpha=0.5), with_ref=False)
    added = np.asarray(g_anchored - g_plain)
    np.testing.assert_allclose(added[~at_functional], 0.0, atol=1e-7)
    np.testing.assert_allclose(added, 0.5 * expected, **TOL)


def test_no_functional_tokens_gives_zero_anchor_and_finite_values():
    x = make_inputs(seed=5, clipping=True)
    x["functional"] = np.zeros_like(x["functional"])
    x["logp"][~x["mask"]] = -np.inf  # padded positions may hold anything: they must not leak NaN
    adv = group_advantages(x["rewards"], G)
    (loss, metrics), grad = jax_value_and_grad(x, adv, GRPOLossConfig(alpha=1.0, beta=0.04), with_ref=True)
    assert metrics["anchor_loss"] == 0.0 and metrics["num_functional"] == 0.0
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and all(np.isfinite(v) for v in metrics.values())
    assert np.all(grad[~x["mask"]] == 0.0)


def test_functional_counts_exclude_padding():
    x = make_inputs(seed=2, clipping=False)
    adv = group_advantages(x["rewards"], G)
    _, metrics = grpo_loss(x["logp"], rollouts(x, adv), GRPOLossConfig())
    expected = (x["functional"] & x["mask"]).sum()
    assert metrics["num_functional"] == expected
    np.testing.assert_allclose(metrics["functional_per_completion"], expected / B, **TOL)


# ---------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_torch(scale_rewards):
    rewards = np.random.default_rng(0).normal(0.5, 1.0, 4 * G).astype(np.float32)
    ours = group_advantages(rewards, G, scale_rewards)
    ref = torch_advantages(torch.tensor(rewards), G, scale_rewards).numpy()
    np.testing.assert_allclose(ours, ref, **TOL)


def test_all_equal_group_gives_zero_advantages():
    rewards = np.array([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3], np.float32)
    for scale in ("group", "batch", "none"):
        adv = np.asarray(group_advantages(rewards, G, scale))
        assert np.all(np.isfinite(adv))
        assert np.all(adv[:4] == 0.0) and np.all(adv[8:] == 0.0), scale
        assert np.all(adv[4:8] != 0.0)
    adv_1 = group_advantages(np.array([1.0, 2.0, 3.0], np.float32), 1)
    assert np.array_equal(adv_1, np.zeros(3, np.float32))
    assert np.array_equal(group_advantages(np.array([2.0], np.float32), 1, "batch"), np.zeros(1, np.float32))


# ---------------------------------------------------------------------------- compilation and errors


def test_loss_compiles_and_runs_sharded_over_8_devices():
    x = make_inputs(seed=1, clipping=True)
    cfg = GRPOLossConfig(loss_type="bnpo", beta=0.04, alpha=0.5)
    mesh = make_mesh((2, 4, 1))  # batch rows over ('data', 'fsdp'), as the update step shards them

    @jax.jit
    def step(rewards, logp, old, ref, mask, functional):
        adv = group_advantages(rewards, G)
        f = lambda lp: grpo_loss(lp, Rollouts(old, adv, mask, functional, ref), cfg)  # noqa: E731
        return jax.value_and_grad(f, has_aux=True)(logp)

    args = [jax.device_put(x[k], batch_sharding(mesh, x[k].ndim))
            for k in ("rewards", "logp", "old", "ref", "mask", "functional")]
    (loss, metrics), grad = step(*args)
    (loss_1, _), grad_1 = step(*[np.asarray(a) for a in args])
    np.testing.assert_allclose(loss, loss_1, **TOL)
    np.testing.assert_allclose(grad, grad_1, **TOL)
    assert step._cache_size() == 2  # sharded and unsharded inputs; no retrace per metric
    lowered = jax.jit(grpo_loss, static_argnames="cfg").lower(
        x["logp"], rollouts(x, np.zeros(B, np.float32), with_ref=True), cfg=cfg)
    assert "exp" in lowered.as_text()


def test_config_and_input_errors_name_the_field():
    x = make_inputs(seed=0, clipping=False)
    adv = np.zeros(B, np.float32)
    with pytest.raises(ValueError, match="ref_logp_bt"):
        grpo_loss(x["logp"], rollouts(x, adv), GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="epsilon_high"):
        GRPOLossConfig(epsilon_high=-0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(max_completion_length=0)
    with pytest.raises(ValueError, match="mask_bt"):
        grpo_loss(x["logp"], rollouts({**x, "mask": x["mask"][:, :-1]}, adv), GRPOLossConfig())
    with pytest.raises(ValueError, match="advantages_b"):
        grpo_loss(x["logp"], rollouts(x, adv[:-1]), GRPOLossConfig())
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.zeros(6, np.float32), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(np.zeros(8, np.float32), 4, "global")


# ---------------------------------------------------------------------------- GSPO, KL estimators, entropy


def torch_loss_options(lp, old, ref, adv, mask, functional, entropy, *, loss_type, beta, alpha, level, estimator,
                       entropy_coef, eps_low=0.2, eps_high=0.28, clamp=10.0):
    """TRL's sequence-level importance sampling (GSPO) and verl's KL estimators / entropy bonus,
    written out independently; the LA-GRPO anchor always uses per-token ratios."""
    log_ratio = lp - old
    if level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a).expand_as(lp)
    if beta:
        if estimator == "k1":
            kl = lp - ref
        elif estimator == "k2":
            kl = 0.5 * (lp - ref) ** 2
        else:
            kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token_loss = per_token_loss + beta * torch.clamp(kl, -clamp, clamp)
    if entropy_coef:
        per_token_loss = per_token_loss - entropy_coef * entropy
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # bnpo
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    token_coef = torch.exp(log_ratio)
    token_surrogate = -torch.min(token_coef * a, torch.clamp(token_coef, 1 - eps_low, 1 + eps_high) * a)
    anchor_mask = functional * mask
    anchor = (token_surrogate * anchor_mask).sum() / anchor_mask.sum().clamp(min=1.0)
    return loss + alpha * anchor


@pytest.mark.parametrize("level,estimator,entropy_coef,loss_type", [
    ("sequence", "k3", 0.0, "grpo"), ("sequence", "k1", 0.01, "bnpo"), ("token", "k2", 0.0, "bnpo"),
    ("token", "k1", 0.05, "grpo"), ("sequence", "k2", 0.0, "grpo"),
])
def test_importance_level_kl_estimator_and_entropy_match_torch_reference(level, estimator, entropy_coef, loss_type):
    x = make_inputs(seed=21, clipping=True)
    entropy = np.random.default_rng(3).uniform(0.0, 3.0, (B, T)).astype(np.float32)
    adv = np.asarray(group_advantages(x["rewards"], G))
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.04, alpha=0.3, importance_level=level, kl_estimator=estimator,
                         entropy_coef=entropy_coef)

    def f(lp, ent):
        return grpo_loss(lp, rollouts(x, adv, with_ref=True), cfg, ent)

    (loss, metrics), (g_lp, g_ent) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x["logp"]), jnp.asarray(entropy))
    lp, ent = torch.tensor(x["logp"], requires_grad=True), torch.tensor(entropy, requires_grad=True)
    ref_loss = torch_loss_options(
        lp, torch.tensor(x["old"]), torch.tensor(x["ref"]), torch.tensor(adv), torch.tensor(x["mask"], dtype=torch.float32),
        torch.tensor(x["functional"], dtype=torch.float32), ent, loss_type=loss_type, beta=0.04, alpha=0.3,
        level=level, estimator=estimator, entropy_coef=entropy_coef)
    ref_loss.backward()
    np.testing.assert_allclose(loss, ref_loss.detach().numpy(), **TOL)
    np.testing.assert_allclose(g_lp, lp.grad.numpy(), **TOL)
    np.testing.assert_allclose(g_ent, np.zeros_like(entropy) if ent.grad is None else ent.grad.numpy(), **TOL)
    assert np.abs(lp.grad.numpy()).max() > 1e-3
    assert (np.abs(g_ent).max() > 0) == (entropy_coef > 0)
    expected_entropy = (entropy * x["mask"]).sum() / x["mask"].sum()
    np.testing.assert_allclose(metrics["entropy"], expected_entropy, **TOL)
    parts = metrics["pg_loss"] + metrics["kl_loss"] + metrics["entropy_loss"] + 0.3 * metrics["anchor_loss"]
    np.testing.assert_allclose(parts, loss, **TOL)


def test_sequence_level_ratio_is_one_per_completion():
    """GSPO: every token of a completion carries the same ratio, exp(mean of its log-ratio)."""
    x = make_inputs(seed=4, clipping=True)
    adv = group_advantages(x["rewards"], G)
    _, rho = per_token_surrogate(x["logp"], x["old"], adv, x["mask"], 0.2, 0.28, "sequence")
    rho = np.asarray(rho)
    for b in range(B):
        m = x["mask"][b]
        if m.any():
            want = np.exp((x["logp"][b][m] - x["old"][b][m]).mean())
            np.testing.assert_allclose(rho[b][m], want, rtol=1e-5)
        assert np.all(rho[b][~m] == 1.0)


def test_kl_clamp_bounds_huge_bf16_gaps():
    logp = np.array([[-30.0, -1.0]], np.float32)
    ref = np.array([[-0.5, -1.0]], np.float32)  # exp(ref - logp) = exp(29.5): k3 ~ 6.5e12 without the clamp
    kl = np.asarray(losses_per_token_kl(logp, ref, np.ones((1, 2), bool), "k3", 10.0))
    assert kl[0, 0] == 10.0 and kl[0, 1] == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="importance_level"):
        GRPOLossConfig(importance_level="group")
    with pytest.raises(ValueError, match="entropy_bt"):
        grpo_loss(logp, Rollouts(logp, np.zeros(1, np.float32), np.ones((1, 2), bool), np.zeros((1, 2), bool)),
                  GRPOLossConfig(entropy_coef=0.1))
