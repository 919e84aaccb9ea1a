"""The LA-GRPO update: one compiled, sharded step over a batch of rollouts.

Inside the step: group-relative advantages from the raw rewards, the policy's log-probs of the
sampled completions (one forward), the reference policy's (a second forward, only when
beta > 0), the clipped surrogate + k3 KL aggregated by `loss_type`, the anchored auxiliary term
over functional-token positions (weight alpha), gradients, clipping, the optimizer update and
metrics. The gradient is pulled back through the model from d loss / d log-probs; with
`anchor_share` a second pull-back of the anchor term alone gives its share of the gradient norm.

Einsum letters: B prompts, G completions per prompt, R = B * G rollouts, Tp prompt tokens,
N completion tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atlas_jax.data.batching import LAYOUT_KEYS
from atlas_jax.rl import losses
from atlas_jax.train.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class RLStepConfig:
    """loss: the GRPO / LA-GRPO loss (alpha, beta, clipping, loss_type).
    group_size: G completions per prompt (rollouts of one prompt are contiguous).
    scale_rewards: 'group' | 'batch' | 'none'. anchor_share: also measure the anchor term's
    share of the parameter-gradient norm (one extra backward pass)."""

    loss: losses.GRPOLossConfig
    group_size: int
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    functional_ids: tuple[int, ...] = ()
    anchor_share: bool = True


def rollout_logprobs(model, batch: dict, group_size: int) -> jax.Array:
    """float32[R, N]: log-probs of the completion tokens under `model`.

    batch: `input_ids` int32[R, Tp+N] (left-padded prompt, then completion), `attention_mask`,
    `positions` int32[3, R, Tp+N], `completion_mask` bool[R, N]; images per PROMPT
    (`pixel_values` [B, P, C] + layout arrays), repeated here for the G rollouts of each.
    """
    ids = batch["input_ids"]
    N = batch["completion_mask"].shape[1]
    kw = {}
    if "pixel_values" in batch:
        rep = lambda x: jnp.repeat(x, group_size, axis=0)  # noqa: E731
        kw = dict(pixel_values=rep(batch["pixel_values"]), vision={k: rep(batch[k]) for k in LAYOUT_KEYS})
    logits, _, _ = model(ids, batch["positions"], batch["attention_mask"], **kw)
    logits_rnv = logits[:, -N - 1 : -1]  # position t predicts token t + 1
    logp_rnv = jax.nn.log_softmax(logits_rnv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_rnv, ids[:, -N:, None], axis=-1)[..., 0]


def make_rl_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: RLStepConfig,
    *,
    state_sharding: Any,
    batch_sharding: Any,
    ref_sharding: Any = None,
):
    """The compiled step `(TrainState, ref_params | None, batch) -> (TrainState, metrics)`.

    batch adds to `rollout_logprobs`' inputs: `old_logprobs` float32[R, N] (from the sampler)
    and `rewards` float32[R]. ref_params: the frozen reference policy (None when beta == 0:
    its forward is skipped entirely).
    """
    lc = cfg.loss

    def step(state: TrainState, ref_params, batch: dict):
        mask = batch["completion_mask"]
        tokens = batch["input_ids"][:, -mask.shape[1] :]
        functional = jnp.isin(tokens, jnp.asarray(cfg.functional_ids, jnp.int32)) & mask if cfg.functional_ids else jnp.zeros_like(mask)
        adv = losses.group_advantages(batch["rewards"], cfg.group_size, cfg.scale_rewards, cfg.advantage_eps)
        ref_logp = None
        if lc.beta > 0:
            ref_logp = jax.lax.stop_gradient(rollout_logprobs(nnx.merge(graphdef, ref_params), batch, cfg.group_size))

        logp, pull_back = jax.vjp(lambda p: rollout_logprobs(nnx.merge(graphdef, p), batch, cfg.group_size), state.params)

        def loss_of(lp):
            return losses.grpo_loss(lp, batch["old_logprobs"], adv, mask, functional, lc, ref_logp)

        (loss, metrics), g_logp = jax.value_and_grad(loss_of, has_aux=True)(logp)
        (grads,) = pull_back(g_logp)
        metrics = dict(metrics)
        if cfg.anchor_share and lc.alpha > 0:
            def anchor_of(lp):
                s_bt, _ = losses.per_token_surrogate(lp, batch["old_logprobs"], adv, mask, lc.epsilon_low, lc.epsilon_high)
                return lc.alpha * losses.anchor_term(s_bt, mask, functional)[0]

            (anchor_grads,) = pull_back(jax.grad(anchor_of)(logp))
            metrics["anchor/grad_share"] = optax.tree.norm(anchor_grads) / jnp.maximum(optax.tree.norm(grads), 1e-12)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
            update_norm=optax.tree.norm(updates),
            reward_mean=batch["rewards"].mean(),
            reward_std=batch["rewards"].std(),
        )
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, ref_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
