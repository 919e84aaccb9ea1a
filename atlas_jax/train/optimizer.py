"""AdamW with warmup + cosine decay, global-norm clipping, and optional frozen parameter groups."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule(lr: float, warmup_steps: int, total_steps: int, end_factor: float = 0.1) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * end_factor` at `total_steps`."""
    warmup_steps = max(int(warmup_steps), 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else lr,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(int(total_steps), warmup_steps + 1),
        end_value=lr * end_factor,
    )


def trainable_labels(params: nnx.State, frozen_prefixes: tuple[str, ...]) -> nnx.State:
    """'train' / 'freeze' per parameter, by the first path component (e.g. 'vision')."""

    def label(path, _):
        return "freeze" if str(path[0].key if hasattr(path[0], "key") else path[0]) in frozen_prefixes else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    params: nnx.State,
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    frozen: tuple[str, ...] = (),
) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule); parameters under `frozen` get no update and no Adam state."""
    adamw = optax.adamw(schedule(lr, warmup_steps, total_steps), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(), adamw)
    if not frozen:
        return tx
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, trainable_labels(params, frozen))


def from_config(params: nnx.State, optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the config section `optim` (lr, warmup_steps, weight_decay, b1, b2,
    clip_norm, freeze_vision) over `total_steps` updates, and its learning-rate schedule."""
    tx = make_optimizer(
        params, lr=optim.lr, warmup_steps=optim.warmup_steps, total_steps=total_steps, weight_decay=optim.weight_decay,
        b1=optim.b1, b2=optim.b2, clip_norm=optim.clip_norm, frozen=("vision",) if optim.freeze_vision else (),
    )
    return tx, schedule(optim.lr, optim.warmup_steps, total_steps)
