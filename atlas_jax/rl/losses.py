"""GRPO and LA-GRPO losses: pure jnp functions of arrays, for one compiled update step.

Legend: B = completions in the (global) batch = num_prompts * G, completions of one prompt
contiguous; G = group size (completions per prompt); T = padded completion length.

The definitions follow TRL's `GRPOTrainer` (token-level importance ratio):

    rho_t   = exp(logp_t - old_logp_t)
    s_t     = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A)      (per-token surrogate)
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                      (KL estimator)
    l_t     = s_t + beta * k3_t

aggregated by `loss_type` over the completion mask, plus the LA-GRPO anchor: the same s_t
averaged over the batch's sampled functional-token positions only, weighted by a static alpha.

Every normaliser is the whole batch's: a micro-batch of rows passes the batch's `BatchTotals`, so
the micro-batches' losses, gradients and metric shares (`grpo_loss_part`) add up to the whole
batch's exactly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------- advantages


def _unbiased_std(x, axis=None):
    """torch.std's default (Bessel-corrected, ddof=1); 0 where there is a single element, where
    torch would return NaN: one sample carries no spread to normalise by."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis, keepdims=True))
    centred = x - jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(centred * centred, axis=axis, keepdims=True) / (n - 1))


def group_advantages(rewards_b, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages A_i = (r_i - mean_group r) / (std + eps).

    rewards_b: float[B], B = num_prompts * group_size, the G completions of one prompt contiguous.
    scale_rewards: 'group' (std of the completion's group), 'batch' (std of all B rewards, as TRL's
      'batch') or 'none' (A = r - mean_group, no division, no eps: Dr. GRPO).
    The std is TRL's: torch.std, i.e. unbiased (ddof=1). A group whose rewards are all equal carries
    no learning signal and gets advantages of exactly 0 in every mode (plain float32 arithmetic
    would leave a rounding residue of mean-r, amplified by 1/eps); G=1 gives zeros, never NaN.
    Returns float32[B].
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_REWARDS}")
    r_b = jnp.asarray(rewards_b, jnp.float32)
    if r_b.ndim != 1:
        raise ValueError(f"rewards_b has shape {r_b.shape}; expected float[B] (one reward per completion)")
    if isinstance(group_size, np.integer):
        group_size = int(group_size)
    if not isinstance(group_size, int) or group_size < 1 or r_b.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size!r} must be a positive int dividing the number of rewards {r_b.shape[0]}"
        )
    r_pg = r_b.reshape(-1, group_size)
    centred_pg = r_pg - jnp.mean(r_pg, axis=1, keepdims=True)
    if scale_rewards == "group":
        centred_pg = centred_pg / (_unbiased_std(r_pg, axis=1) + eps)
    elif scale_rewards == "batch":
        centred_pg = centred_pg / (_unbiased_std(r_b) + eps)
    flat_p = (jnp.max(r_pg, axis=1, keepdims=True) == jnp.min(r_pg, axis=1, keepdims=True))
    return jnp.where(flat_p, 0.0, centred_pg).reshape(-1)


# ---------------------------------------------------------------------------- loss config


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """Static (hashable) loss configuration; the config section `rl.loss` maps onto it 1:1 (its
    defaults are this class's), and `max_completion_length` is filled from `rl.sample`.

    loss_type: 'grpo' (per-sequence token mean, then mean over sequences), 'bnpo' (token mean over
      the batch), 'dapo' (token sum / completion tokens in the global batch), 'dr_grpo'
      (token sum / (B * max_completion_length)).
    epsilon_low / epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high] (DAPO: 0.2 / 0.28).
    beta: weight of the KL to the reference policy; 0 means no reference is needed.
    alpha: LA-GRPO anchor weight; 0 is plain GRPO, bit for bit.
    importance_level: 'token' (one ratio per token, TRL's default) or 'sequence' (GSPO: the
      length-normalised sequence ratio exp(mean_t(logp - old)), clipped per sequence). The anchor
      term always uses per-token ratios: its point is a direct signal at functional positions.
    kl_estimator: 'k1' (logp - ref), 'k2' ((logp - ref)^2 / 2) or 'k3' (exp(ref - logp) - (ref -
      logp) - 1, unbiased and >= 0); each per-token value clamped to [-kl_clamp, kl_clamp] (bf16
      log-probs can make exp(ref - logp) overflow).
    entropy_coef: weight of an entropy bonus (loss -= entropy_coef * aggregated entropy); 0 = none.
    max_completion_length: dr_grpo's normaliser; None means the padded length T.
    """

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0
    alpha: float = 0.0
    importance_level: str = "token"
    kl_estimator: str = "k3"
    kl_clamp: float = 10.0
    entropy_coef: float = 0.0
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_level={self.importance_level!r}: expected one of {IMPORTANCE_LEVELS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: expected one of {KL_ESTIMATORS}")
        if not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp={self.kl_clamp!r}: expected > 0")
        for name in ("epsilon_low", "epsilon_high", "beta", "alpha", "entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}={value!r}: expected a python float >= 0")
        if self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low={self.epsilon_low}: expected < 1 (the ratio floor 1-eps must stay > 0)")
        mcl = self.max_completion_length
        if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, int) or mcl < 1):
            raise ValueError(f"max_completion_length={mcl!r}: expected a positive int or None")


class BatchTotals(NamedTuple):
    """The whole batch's normalisers, for a loss that sees a part of it (a micro-batch of rows).

    Given them, `grpo_loss_part` returns that part's share of the loss and of each additive metric,
    and the parts' shares add up to the whole batch's values (every normaliser is global).
    completions: float32[] completions (rows); tokens: float32[] completion tokens;
    functional: float32[] completion positions holding a functional token.
    """

    completions: jax.Array | float
    tokens: jax.Array | float
    functional: jax.Array | float

    @classmethod
    def of(cls, mask_bt, functional_bt=None) -> BatchTotals:
        """The totals of a whole batch: mask_bt, functional_bt bool[B, T]."""
        m_bt = jnp.asarray(mask_bt).astype(bool)
        f_bt = jnp.zeros_like(m_bt) if functional_bt is None else jnp.asarray(functional_bt).astype(bool) & m_bt
        return cls(jnp.float32(m_bt.shape[0]), jnp.sum(m_bt, dtype=jnp.float32), jnp.sum(f_bt, dtype=jnp.float32))


class Rollouts(NamedTuple):
    """What the loss treats as data about a batch of B completions of T padded tokens.

    old_logp_bt: float[B, T] log-probs of the sampled tokens under the rollout policy.
    advantages_b: float[B]. mask_bt: bool[B, T] completion tokens (no prompt, no padding).
    functional_bt: bool[B, T] the sampled token is a functional token.
    ref_logp_bt: float[B, T] reference-policy log-probs; required when beta > 0.
    totals: the whole batch's normalisers when these B rows are a part of it (a micro-batch);
      None = these rows are the whole batch.
    """

    old_logp_bt: jax.Array
    advantages_b: jax.Array
    mask_bt: jax.Array
    functional_bt: jax.Array
    ref_logp_bt: jax.Array | None = None
    totals: BatchTotals | None = None


# ---------------------------------------------------------------------------- per-token parts


def per_token_surrogate(logp_bt, old_logp_bt, advantages_b, mask_bt, epsilon_low: float, epsilon_high: float,
                        importance_level: str = "token"):
    """The clipped policy-gradient surrogate per token.

    logp_bt, old_logp_bt: float[B, T] log-probs of the sampled tokens under the current / rollout policy.
    advantages_b: float[B]. mask_bt: bool|float[B, T] (1 on completion tokens).
    importance_level: 'token' (rho_t = exp(logp_t - old_t)) or 'sequence' (GSPO: every token of a
      completion carries its sequence's rho = exp(masked mean of logp - old), as TRL broadcasts it).
    Returns (s_bt float32[B, T], rho_bt float32[B, T]); both are 0 / 1 at masked-out positions.
    old_logp and advantages are treated as data (stop_gradient), so passing old = logp for a
    single inner iteration gives the on-policy gradient.
    """
    mask_bt = jnp.asarray(mask_bt).astype(bool)
    old_bt = jax.lax.stop_gradient(jnp.asarray(old_logp_bt, jnp.float32))
    adv_b1 = jax.lax.stop_gradient(jnp.asarray(advantages_b, jnp.float32))[:, None]
    # Select before exp: padded positions may hold -inf / garbage log-probs, and a masked
    # multiply afterwards would still propagate NaN into the gradient.
    log_ratio_bt = jnp.where(mask_bt, jnp.asarray(logp_bt, jnp.float32) - old_bt, 0.0)
    if importance_level == "sequence":
        count_b1 = jnp.maximum(jnp.sum(mask_bt, axis=-1, keepdims=True), 1).astype(jnp.float32)
        log_ratio_bt = jnp.where(mask_bt, jnp.sum(log_ratio_bt, axis=-1, keepdims=True) / count_b1, 0.0)
    rho_bt = jnp.exp(log_ratio_bt)
    clipped_bt = jnp.clip(rho_bt, 1.0 - epsilon_low, 1.0 + epsilon_high)
    s_bt = -jnp.minimum(rho_bt * adv_b1, clipped_bt * adv_b1)
    return s_bt, rho_bt


def per_token_kl(logp_bt, ref_logp_bt, mask_bt, estimator: str = "k3", clamp: float | None = None):
    """Per-token estimate of KL(policy || reference) from the sampled tokens: float32[B, T], 0 at
    masked positions. With d = ref - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (>= 0).
    `clamp` bounds each value to [-clamp, clamp] (the gradient is 0 where it binds)."""
    mask_bt = jnp.asarray(mask_bt).astype(bool)
    ref_bt = jax.lax.stop_gradient(jnp.asarray(ref_logp_bt, jnp.float32))
    delta_bt = jnp.where(mask_bt, ref_bt - jnp.asarray(logp_bt, jnp.float32), 0.0)
    if estimator == "k1":
        kl_bt = -delta_bt
    elif estimator == "k2":
        kl_bt = 0.5 * delta_bt * delta_bt
    elif estimator == "k3":
        kl_bt = jnp.exp(delta_bt) - delta_bt - 1.0
    else:
        raise ValueError(f"kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    return kl_bt if clamp is None else jnp.clip(kl_bt, -clamp, clamp)


def aggregate(per_token_bt, mask_bt, loss_type: str, max_completion_length: int | None = None,
              totals: BatchTotals | None = None):
    """Reduce float[B, T] per-token losses to a scalar exactly as TRL's loss types do over one batch.

    totals: the whole batch's (`BatchTotals`) when these rows are a part of it: every normaliser
    (completions for grpo / dr_grpo, completion tokens for bnpo / dapo) is then the whole batch's,
    so the parts' values add up to the whole batch's. Over one batch bnpo and dapo agree; they
    differ in TRL only under gradient accumulation, where this step's one is exact.
    """
    m_bt = jnp.asarray(mask_bt).astype(jnp.float32)
    t = BatchTotals.of(mask_bt) if totals is None else totals
    total_bt = per_token_bt * m_bt
    if loss_type == "grpo":
        return jnp.sum(jnp.sum(total_bt, axis=-1) / jnp.maximum(jnp.sum(m_bt, axis=-1), 1.0)) / t.completions
    if loss_type in ("bnpo", "dapo"):
        return jnp.sum(total_bt) / jnp.maximum(t.tokens, 1.0)
    if loss_type == "dr_grpo":
        length = per_token_bt.shape[1] if max_completion_length is None else max_completion_length
        return jnp.sum(total_bt) / (t.completions * length)
    raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")


def anchor_term(s_bt, mask_bt, functional_bt, num_functional=None):
    """LA-GRPO anchor: mean of s_bt over positions that are completion tokens AND functional,
    counted over the whole batch (num_functional: the whole batch's count when these rows are a
    part of it); exactly 0 (finite gradient) when there are none. Returns (anchor scalar, number
    of functional positions in these rows, float32 scalar)."""
    f_bt = jnp.asarray(functional_bt).astype(bool) & jnp.asarray(mask_bt).astype(bool)
    count = jnp.sum(f_bt.astype(jnp.float32))
    total = count if num_functional is None else num_functional
    return jnp.sum(jnp.where(f_bt, s_bt, 0.0)) / jnp.maximum(total, 1.0), count


# ---------------------------------------------------------------------------- the two parts of the loss


def _surrogate(logp_bt, r: Rollouts, cfg: GRPOLossConfig, level: str | None = None):
    return per_token_surrogate(logp_bt, r.old_logp_bt, r.advantages_b, r.mask_bt, cfg.epsilon_low, cfg.epsilon_high,
                               level or cfg.importance_level)


def _kl(logp_bt, r: Rollouts, cfg: GRPOLossConfig):
    return per_token_kl(logp_bt, r.ref_logp_bt, r.mask_bt, cfg.kl_estimator, cfg.kl_clamp)


def pg_part(logp_bt, r: Rollouts, cfg: GRPOLossConfig, entropy_bt=None) -> jax.Array:
    """The GRPO loss: aggregate(s + beta * kl - entropy_coef * entropy) by `cfg.loss_type` (summed
    per token before aggregating, as TRL does, so the rounding matches TRL's). entropy_bt: the
    policy's per-token entropy (`grpo_loss` requires it when entropy_coef > 0)."""
    s_bt, _ = _surrogate(logp_bt, r, cfg)
    if cfg.beta > 0:
        s_bt = s_bt + cfg.beta * _kl(logp_bt, r, cfg)
    if cfg.entropy_coef > 0 and entropy_bt is not None:  # None: the term's d/dlogp alone (it does not depend on logp)
        s_bt = s_bt - cfg.entropy_coef * jnp.asarray(entropy_bt, jnp.float32)
    return aggregate(s_bt, r.mask_bt, cfg.loss_type, cfg.max_completion_length, r.totals)


def anchor_part(logp_bt, r: Rollouts, cfg: GRPOLossConfig) -> jax.Array:
    """alpha * the LA-GRPO anchor (the per-token surrogate averaged over functional positions)."""
    s_bt, _ = _surrogate(logp_bt, r, cfg, level="token")
    return cfg.alpha * anchor_term(s_bt, r.mask_bt, r.functional_bt,
                                   None if r.totals is None else r.totals.functional)[0]


def _check(logp_bt, r: Rollouts, cfg: GRPOLossConfig, entropy_bt) -> None:
    if jnp.ndim(logp_bt) != 2:
        raise ValueError(f"logp_bt has shape {jnp.shape(logp_bt)}; expected float[B, T]")
    bt = jnp.shape(logp_bt)
    for name, x in (*((n, getattr(r, n)) for n in ("old_logp_bt", "mask_bt", "functional_bt", "ref_logp_bt")),
                    ("entropy_bt", entropy_bt)):
        if x is not None and jnp.shape(x) != bt:
            raise ValueError(f"{name} has shape {jnp.shape(x)}; expected {bt} like logp_bt")
    if cfg.entropy_coef > 0 and entropy_bt is None:
        raise ValueError(f"GRPOLossConfig.entropy_coef={cfg.entropy_coef} > 0 needs entropy_bt (the policy's per-token entropy)")
    if jnp.shape(r.advantages_b) != bt[:1]:
        raise ValueError(f"advantages_b has shape {jnp.shape(r.advantages_b)}; expected ({bt[0]},), one per completion")
    if cfg.beta > 0 and r.ref_logp_bt is None:
        raise ValueError(f"GRPOLossConfig.beta={cfg.beta} > 0 needs ref_logp_bt (reference-policy log-probs); got None")


def _logp_grad_sq_norms(logp_bt, r: Rollouts, cfg: GRPOLossConfig) -> dict[str, jax.Array]:
    """Squared norms of d pg_part / dlogp and d anchor_part / dlogp (they add over parts of the
    batch; `finish_metrics` takes the roots): how much of the gradient w.r.t. the token log-probs
    the anchor term contributes, a cheap [B, T] elementwise diagnostic of dilution (the
    parameter-space share needs two backward passes through the model); zeros when alpha == 0."""
    zero = jnp.zeros((), jnp.float32)
    if cfg.alpha == 0:
        return {"grad_logp/grpo_sq": zero, "grad_logp/anchor_sq": zero}
    # stop_gradient: a diagnostic, so the outer differentiation never goes second order through it.
    lp_bt = jax.lax.stop_gradient(jnp.asarray(logp_bt, jnp.float32))
    sq = lambda g: jnp.sum(g * g)  # noqa: E731
    return {"grad_logp/grpo_sq": sq(jax.grad(pg_part)(lp_bt, r, cfg)), "grad_logp/anchor_sq": sq(jax.grad(anchor_part)(lp_bt, r, cfg))}


# ---------------------------------------------------------------------------- the loss


def grpo_loss(logp_bt, rollouts: Rollouts, cfg: GRPOLossConfig, entropy_bt=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LA-GRPO loss = pg_part + anchor_part = aggregate(s + beta * kl - entropy_coef * H) + alpha * anchor(s).

    logp_bt: float[B, T] current-policy log-probs of the sampled completion tokens (differentiated).
    rollouts: the batch's data (see `Rollouts`). cfg: static. entropy_bt: float[B, T] the current
    policy's entropy at each completion position (differentiated; needed when entropy_coef > 0,
    reported as `entropy` whenever given).
    Returns (loss float32[], metrics: dict of stop-gradient float32[] scalars, no host syncs):
      loss, pg_loss (aggregated surrogate), kl_loss (beta * aggregated kl), kl (masked mean of the
      configured estimator; 0 without ref_logp_bt), entropy (masked mean; 0 without entropy_bt),
      entropy_loss (-entropy_coef * aggregated entropy), anchor_loss (unweighted; reported for alpha = 0 too), num_functional,
      functional_per_completion, clip_ratio/{low,high,region}_mean (TRL: masked fraction of tokens
      whose low / high clip is active given the sign of A), advantage/{mean,std,absmax} (std with
      ddof=0), ratio/mean, logp_gap/mean_abs, completion_tokens, grad_logp/{grpo,anchor}_norm and
      anchor/grad_share_logp (the anchor's share of the gradient w.r.t. the token log-probs).
    """
    loss, shares = grpo_loss_part(logp_bt, rollouts, cfg, entropy_bt)
    return loss, finish_metrics(shares, rollouts.advantages_b)


def grpo_loss_part(logp_bt, rollouts: Rollouts, cfg: GRPOLossConfig, entropy_bt=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`grpo_loss` of a part of the batch (a micro-batch of rows; `rollouts.totals` holds the whole
    batch's normalisers, None = these rows are the whole batch): (this part's share of the loss,
    its share of each additive metric). Summed over the parts, both are the whole batch's;
    `finish_metrics` turns the summed shares into `grpo_loss`' metrics."""
    r = rollouts
    _check(logp_bt, r, cfg, entropy_bt)
    if r.totals is None:
        r = r._replace(totals=BatchTotals.of(r.mask_bt, r.functional_bt))
    mask_bt = jnp.asarray(r.mask_bt).astype(bool)
    agg = lambda x_bt: aggregate(x_bt, mask_bt, cfg.loss_type, cfg.max_completion_length, r.totals)  # noqa: E731

    # alpha is a static python float: alpha == 0 leaves the graph of plain GRPO untouched.
    loss = pg_part(logp_bt, r, cfg, entropy_bt)
    if cfg.alpha > 0:
        loss = loss + anchor_part(logp_bt, r, cfg)
    s_bt, rho_bt = _surrogate(logp_bt, r, cfg)
    kl_bt = _kl(logp_bt, r, cfg) if r.ref_logp_bt is not None else None
    anchor, num_functional = anchor_term(_surrogate(logp_bt, r, cfg, level="token")[0], mask_bt, r.functional_bt,
                                         r.totals.functional)

    tokens = jnp.maximum(r.totals.tokens, 1.0)
    masked_mean = lambda x_bt: jnp.sum(jnp.where(mask_bt, x_bt, 0.0)) / tokens  # noqa: E731
    adv_b = jnp.asarray(r.advantages_b, jnp.float32)
    is_low_bt = (rho_bt < 1.0 - cfg.epsilon_low) & (adv_b[:, None] < 0)
    is_high_bt = (rho_bt > 1.0 + cfg.epsilon_high) & (adv_b[:, None] > 0)
    zero = jnp.zeros((), jnp.float32)
    shares = {
        "loss": loss,
        "pg_loss": agg(s_bt),
        "kl_loss": cfg.beta * agg(kl_bt) if cfg.beta > 0 else zero,
        "kl": masked_mean(kl_bt) if kl_bt is not None else zero,
        "entropy": masked_mean(jnp.asarray(entropy_bt, jnp.float32)) if entropy_bt is not None else zero,
        "entropy_loss": -cfg.entropy_coef * agg(jnp.asarray(entropy_bt, jnp.float32)) if cfg.entropy_coef > 0 else zero,
        "anchor_loss": anchor,
        "num_functional": num_functional,
        "functional_per_completion": num_functional / r.totals.completions,
        "clip_ratio/low_mean": masked_mean(is_low_bt.astype(jnp.float32)),
        "clip_ratio/high_mean": masked_mean(is_high_bt.astype(jnp.float32)),
        "clip_ratio/region_mean": masked_mean((is_low_bt | is_high_bt).astype(jnp.float32)),
        "ratio/mean": masked_mean(rho_bt),
        # Sampler-vs-trainer mismatch on the first inner iteration (afterwards it also holds the updates).
        "logp_gap/mean_abs": masked_mean(jnp.abs(jnp.asarray(logp_bt, jnp.float32) - jnp.asarray(r.old_logp_bt, jnp.float32))),
        "completion_tokens": jnp.sum(mask_bt, dtype=jnp.float32),
        **_logp_grad_sq_norms(logp_bt, r, cfg),
    }
    return loss, {k: jax.lax.stop_gradient(v) for k, v in shares.items()}


def finish_metrics(shares: dict[str, jax.Array], advantages_b) -> dict[str, jax.Array]:
    """`grpo_loss`' metrics from the parts' summed shares (`grpo_loss_part`) and the whole batch's
    advantages float[B]: the norms and the anchor's share from the squared norms, and the
    advantages' mean, std (ddof=0) and absmax."""
    metrics = {k: v for k, v in shares.items() if not k.startswith("grad_logp/")}
    grpo_norm, anchor_norm = jnp.sqrt(shares["grad_logp/grpo_sq"]), jnp.sqrt(shares["grad_logp/anchor_sq"])
    both = grpo_norm + anchor_norm
    adv_b = jnp.asarray(advantages_b, jnp.float32)
    metrics.update({
        "grad_logp/grpo_norm": grpo_norm,
        "grad_logp/anchor_norm": anchor_norm,
        "anchor/grad_share_logp": jnp.where(both > 0, anchor_norm / jnp.maximum(both, 1e-30), 0.0),
        "advantage/mean": jnp.mean(adv_b),
        "advantage/std": jnp.std(adv_b),
        "advantage/absmax": jnp.max(jnp.abs(adv_b)),
    })
    return metrics
