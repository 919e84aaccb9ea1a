"""The LA-GRPO update: one compiled, sharded step over a batch of rollouts.

Inside the step: group-relative advantages from the raw rewards, the policy's log-probs of the
sampled completions and its entropy at their positions (one forward; all of the sampler's
tempered distribution, `rollout_logprobs`), the reference policy's (a second forward, only when
beta > 0), the clipped surrogate + k3 KL aggregated by `loss_type`, the anchored auxiliary term
over functional-token positions (weight alpha), gradients, clipping, the optimizer update and
metrics. The gradient is pulled back through the model from d loss / d log-probs; with
`anchor_share` a second pull-back of the anchor term alone gives its share of the gradient norm.

Einsum letters: B prompts, G completions per prompt, R = B * G rollouts, Tp prompt tokens,
N completion tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atlas_jax.data.device_batch import model_inputs
from atlas_jax.model import lora
from atlas_jax.rl import losses
from atlas_jax.train import token_logprobs
from atlas_jax.train.train_state import TrainState


def rollout_logprobs(model, batch: dict, group_size: int, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(float32[R, N] log-probs of the completion tokens, float32[R, N] entropy at each completion
    position) under `model`'s policy at `temperature`: softmax(logits / temperature), the
    sampler's distribution before its top-k / top-p filters (see `sampling`).

    batch: `input_ids` int32[R, Tp+N] (left-padded prompt, then completion), `attention_mask`,
    `positions` int32[R, 3, Tp+N], `completion_mask` bool[R, N]; images per PROMPT
    (`pixel_values` [B, P, C] + layout arrays), repeated here for the G rollouts of each.
    The output head runs only at the N positions that predict completion tokens, a chunk at a
    time (`token_logprobs`).
    """
    ids = batch["input_ids"]
    N = batch["completion_mask"].shape[1]
    args, images = model_inputs(batch)
    images = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), images)
    hidden, _, _ = model(*args, head=False, **images)
    hidden_rnd = hidden[:, -N - 1 : -1]  # position t predicts token t + 1
    return token_logprobs.tempered_logprobs_entropy(hidden_rnd, model.output_head(), ids[:, -N:], temperature)


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
    state_sharding: Any,
    batch_sharding: Any,
    ref_sharding: Any = None,
    train: nnx.filterlib.Filter = nnx.Param,
    reference_adapters_off: bool = False,
):
    """The compiled step `(TrainState, ref_params | None, batch) -> (TrainState, metrics)`.

    batch adds to `rollout_logprobs`' inputs: `old_logprobs` float32[R, N] (from the sampler)
    and `rewards` float32[R]. ref_params: the frozen reference policy (None when beta == 0:
    its forward is skipped entirely).
    group_size: G completions per prompt (rollouts of one prompt are contiguous); temperature:
    the sampler's (policy, reference and old log-probs are all of the tempered distribution);
    scale_rewards: 'group' | 'batch' | 'none' (see `losses.group_advantages`); functional_ids:
    the tokens the anchor term covers; anchor_share: also measure the anchor term's share of the
    parameter-gradient norm (one extra backward pass, when alpha > 0); train: the parameters
    differentiated and updated (`optimizer.trainable`), no backward pass runs through the rest;
    reference_adapters_off: the reference policy is the policy with its LoRA adapters zeroed
    (`lora.adapters_off`: the base model, no second copy of the weights; ref_params is None).
    """
    lc = loss_cfg

    def step(state: TrainState, ref_params, batch: dict):
        mask = batch["completion_mask"]
        tokens = batch["input_ids"][:, -mask.shape[1] :]
        functional = jnp.isin(tokens, jnp.asarray(functional_ids, jnp.int32)) & mask if functional_ids else jnp.zeros_like(mask)
        adv = losses.group_advantages(batch["rewards"], group_size, scale_rewards)
        ref_logp = None
        if lc.beta > 0:
            ref_state = lora.adapters_off(state.params) if reference_adapters_off else ref_params
            ref_logp = jax.lax.stop_gradient(rollout_logprobs(nnx.merge(graphdef, ref_state), batch, group_size, temperature)[0])
        rollouts = losses.Rollouts(batch["old_logprobs"], adv, mask, functional, ref_logp)

        trained, frozen = nnx.split_state(state.params, train, ...)
        (logp, entropy), pull_back = jax.vjp(
            lambda t: rollout_logprobs(nnx.merge(graphdef, t, frozen), batch, group_size, temperature), trained)
        (loss, metrics), g_logp_entropy = jax.value_and_grad(losses.grpo_loss, argnums=(0, 3), has_aux=True)(
            logp, rollouts, lc, entropy)
        (grads,) = pull_back(g_logp_entropy)
        metrics = dict(metrics)
        if anchor_share and lc.alpha > 0:
            (anchor_grads,) = pull_back((jax.grad(losses.anchor_part)(logp, rollouts, lc), jnp.zeros_like(entropy)))
            metrics["anchor/grad_share"] = optax.tree.norm(anchor_grads) / jnp.maximum(optax.tree.norm(grads), 1e-12)
        updates, opt_state = tx.update(nnx.merge_state(grads, jax.tree.map(jnp.zeros_like, frozen)), state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
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
