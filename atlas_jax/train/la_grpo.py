"""The LA-GRPO update: one compiled, sharded step over a batch of rollouts.

Inside the step: group-relative advantages from the raw rewards, the policy's log-probs of the
sampled completions and its entropy at their positions (one forward; all of the sampler's
tempered distribution, `rollout_logprobs`), the reference policy's (a second forward, only when
beta > 0), the clipped surrogate + k3 KL aggregated by `loss_type`, the anchored auxiliary term
over functional-token positions (weight alpha), gradients, clipping, the optimizer update and
metrics. The gradient is pulled back through the model from d loss / d log-probs; with
`anchor_share` a second pull-back of the anchor term alone gives its share of the gradient norm.
The forwards and backward run `micro_batch` rollouts at a time in a loop inside the step
(gradients summed; every loss normaliser is the whole batch's, `losses.BatchTotals`), so the
rollouts per update are bounded by time, not memory.

Einsum letters: B prompts, G completions per prompt, R = B * G rollouts, Tp prompt tokens,
N completion tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atlas_jax.data.device_batch import LAYOUT_KEYS, model_inputs
from atlas_jax.model import lora
from atlas_jax.rl import losses
from atlas_jax.train import token_logprobs
from atlas_jax.train.train_state import TrainState


def per_rollout(batch: dict, group_size: int) -> dict:
    """The batch with one row per rollout: its per-prompt arrays (`pixel_values`, the layout arrays)
    repeated for the G rollouts of each prompt, so every array is [R, ...] and rows split freely."""
    per_prompt = ("pixel_values",) + LAYOUT_KEYS
    return {k: jnp.repeat(x, group_size, axis=0) if k in per_prompt else x for k, x in batch.items()}


def rollout_logprobs(model, rows: dict, temperature: float = 1.0, *,
                     head_chunk: int = token_logprobs.CHUNK) -> tuple[jax.Array, jax.Array]:
    """(float32[R, N] log-probs of the completion tokens, float32[R, N] entropy at each completion
    position) under `model`'s policy at `temperature`: softmax(logits / temperature), the
    sampler's distribution before its top-k / top-p filters (see `sampling`).

    rows (`per_rollout`): `input_ids` int32[R, Tp+N] (left-padded prompt, then completion),
    `attention_mask`, `positions` int32[R, 3, Tp+N], `completion_mask` bool[R, N], images per
    rollout (`pixel_values` [R, P, C] + layout arrays). The output head runs only at the N
    positions that predict completion tokens, `head_chunk` positions at a time (`token_logprobs`).
    """
    ids = rows["input_ids"]
    N = rows["completion_mask"].shape[1]
    args, images = model_inputs(rows)
    hidden, _, _ = model(*args, head=False, **images)
    hidden_rnd = hidden[:, -N - 1 : -1]  # position t predicts token t + 1
    return token_logprobs.tempered_logprobs_entropy(hidden_rnd, model.output_head(), ids[:, -N:], temperature, chunk=head_chunk)


def split_rows(rows: dict, num_micro: int) -> dict:
    """[R, ...] -> [num_micro, R / num_micro, ...] for every array, micro-batch i holding rows
    i, i + num_micro, ...: strided, so that each device's block of rows (the batch axis is sharded
    in contiguous blocks) gives rows to every micro-batch and slicing one needs no communication."""
    return {k: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1) for k, x in rows.items()}


def make_rl_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_cfg: losses.GRPOLossConfig,
    *,
    group_size: int,
    temperature: float = 1.0,
    scale_rewards: str = "group",
    functional_ids: tuple[int, ...] = (),
    anchor_share: bool = True,
    micro_batch: int = 0,
    state_sharding: Any,
    batch_sharding: Any,
    ref_sharding: Any = None,
    train: nnx.filterlib.Filter = nnx.Param,
    reference_adapters_off: bool = False,
    head_chunk: int = token_logprobs.CHUNK,
):
    """The compiled step `(TrainState, ref_params | None, batch) -> (TrainState, metrics)`.

    batch: `rollout_logprobs`' inputs with images per PROMPT (`pixel_values` [B, P, C] + layout
    arrays), plus `old_logprobs` float32[R, N] (from the sampler) and `rewards` float32[R].
    ref_params: the frozen reference policy (None when beta == 0: its forward is skipped entirely).
    group_size: G completions per prompt (rollouts of one prompt are contiguous); temperature:
    the sampler's (policy, reference and old log-probs are all of the tempered distribution);
    scale_rewards: 'group' | 'batch' | 'none' (see `losses.group_advantages`); functional_ids:
    the tokens the anchor term covers; anchor_share: also measure the anchor term's share of the
    parameter-gradient norm (one extra backward pass, when alpha > 0); micro_batch: rows per
    forward / backward pass (0 = all R at once; must divide R): the reference forward and the
    policy's forward + backward run a micro-batch at a time in a loop inside the step, gradients
    summed, every normaliser the whole batch's, so loss, metrics and update are the whole
    batch's; train: the parameters differentiated and updated (`optimizer.trainable`; `tx` is
    made for the same filter), no backward pass runs through the rest and it passes through the
    step unchanged; reference_adapters_off: the reference policy is the
    policy with its LoRA adapters zeroed (`lora.adapters_off`: the base model, no second copy of
    the weights; ref_params is None); head_chunk: positions the output head runs on at a time in
    the policy's and the reference's log-probs (`rollout_logprobs`; the same values at any size).
    """
    lc = loss_cfg

    def micro_grads(trained, frozen, rows: dict, totals: losses.BatchTotals):
        """(gradient, the anchor term's gradient | None, `grpo_loss_part`'s shares) of one micro-batch."""
        rollouts = losses.Rollouts(rows["old_logprobs"], rows["advantages"], rows["completion_mask"], rows["functional"],
                                   rows.get("ref_logprobs"), totals)
        (logp, entropy), pull_back = jax.vjp(
            lambda t: rollout_logprobs(nnx.merge(graphdef, t, frozen), rows, temperature, head_chunk=head_chunk), trained)
        (_, shares), g_logp_entropy = jax.value_and_grad(losses.grpo_loss_part, argnums=(0, 3), has_aux=True)(
            logp, rollouts, lc, entropy)
        (grads,) = pull_back(g_logp_entropy)
        anchor_grads = None
        if anchor_share and lc.alpha > 0:
            (anchor_grads,) = pull_back((jax.grad(losses.anchor_part)(logp, rollouts, lc), jnp.zeros_like(entropy)))
        return grads, anchor_grads, shares

    def step(state: TrainState, ref_params, batch: dict):
        rows = per_rollout(batch, group_size)
        mask = rows["completion_mask"]
        R = mask.shape[0]
        if micro_batch < 0 or R % (micro_batch or R):
            raise ValueError(f"micro_batch={micro_batch}: expected 0 or a divisor of the {R} rollouts of the batch")
        tokens = rows["input_ids"][:, -mask.shape[1] :]
        rows["functional"] = jnp.isin(tokens, jnp.asarray(functional_ids, jnp.int32)) & mask if functional_ids else jnp.zeros_like(mask)
        rows["advantages"] = losses.group_advantages(rows["rewards"], group_size, scale_rewards)
        totals = losses.BatchTotals.of(mask, rows["functional"])
        micro = split_rows(rows, R // (micro_batch or R))
        if lc.beta > 0:
            ref_state = lora.adapters_off(state.params) if reference_adapters_off else ref_params
            micro["ref_logprobs"] = jax.lax.stop_gradient(jax.lax.map(
                lambda mb: rollout_logprobs(nnx.merge(graphdef, ref_state), mb, temperature, head_chunk=head_chunk)[0], micro))

        trained, frozen = nnx.split_state(state.params, train, ...)
        trained_sh, _ = nnx.split_state(state_sharding.params, train, ...)

        def sharded_like_params(out):
            """Gradients laid out as their parameters: left to itself, XLA keeps the anchor term's
            second gradient tree whole on every chip (measured: +1.3x the parameters' float32 bytes)."""
            grads, anchor, shares = out
            constrain = lambda g: jax.tree.map(jax.lax.with_sharding_constraint, g, trained_sh)  # noqa: E731
            return constrain(grads), None if anchor is None else constrain(anchor), shares

        def accumulate(carry, mb):
            return jax.tree.map(jnp.add, carry, sharded_like_params(micro_grads(trained, frozen, mb, totals))), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(micro_grads, trained, frozen, first, totals))
        (grads, anchor_grads, shares), _ = jax.lax.scan(accumulate, sharded_like_params(zeros), micro)
        metrics = losses.finish_metrics(shares, rows["advantages"])
        if anchor_grads is not None:
            metrics["anchor/grad_share"] = optax.tree.norm(anchor_grads) / jnp.maximum(optax.tree.norm(grads), 1e-12)
        updates, opt_state = tx.update(grads, state.opt_state, trained)  # the frozen rest passes through
        params = nnx.merge_state(optax.apply_updates(trained, updates), frozen)
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
            update_norm=optax.tree.norm(updates),
            reward_mean=batch["rewards"].mean(),
            reward_std=batch["rewards"].std(),
        )
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, ref_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
