"""Reinforcement learning pieces: the GRPO / LA-GRPO loss math and the reward functions.

Both are pure (jnp functions of arrays; Python functions of strings and token ids) so that the
compiled update step and the rollout loop are built on top of them and tested alone.
"""

from atlas_jax.rl.losses import (
    LOSS_TYPES,
    SCALE_REWARDS,
    BatchTotals,
    GRPOLossConfig,
    Rollouts,
    aggregate,
    anchor_part,
    anchor_term,
    finish_metrics,
    group_advantages,
    grpo_loss,
    grpo_loss_part,
    pg_part,
    per_token_kl,
    per_token_surrogate,
)
from atlas_jax.rl.rewards import (
    DEFAULT_REWARDS,
    RewardError,
    RewardFunction,
    accuracy_reward,
    combine,
    expected_usage_reward,
    extract_boxed,
    format_reward,
    functional_usage_reward,
    spam_penalty,
    verbosity_penalty,
)
