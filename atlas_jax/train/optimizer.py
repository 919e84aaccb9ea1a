"""AdamW with warmup + cosine decay, global-norm clipping, and the set of parameters that train."""

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


def trainable(freeze_vision: bool, adapters_only: bool = False) -> nnx.filterlib.Filter:
    """The parameters that train, as an NNX filter: the LoRA adapters alone (`model.lora`), else
    all but the vision tower (`optim.freeze_vision`), else all. The steps differentiate only these,
    so no backward pass runs through (or stores activations for) what is frozen."""
    if adapters_only:
        return nnx.LoRAParam
    if freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")))
    return nnx.Param


def trainable_labels(trained: nnx.State) -> nnx.State:
    """The parameter group of each trained parameter: 'vision' in the vision tower, else 'train'."""
    tower, rest = nnx.split_state(trained, nnx.PathContains("vision"), ...)
    label = lambda name: (lambda _: name)
    return nnx.merge_state(jax.tree.map(label("vision"), tower), jax.tree.map(label("train"), rest))


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
    train: nnx.filterlib.Filter = nnx.Param,
    vision_lr_scale: float = 1.0,
) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule) over the parameters `train` alone: its state holds the
    trained parameters' moments only, and `init` / `update` take all parameters or the trained
    part and return the trained part's state / updates. The steps split the parameters by the same
    filter and pass the frozen rest through untouched, so the frozen arrays are in neither the
    optimizer's state nor its update program. vision_lr_scale: the vision tower's learning rate
    relative to the rest (a parameter group; see `configs/perceive_synthetic.py` for why a
    from-scratch tower needs it)."""
    lr_schedule = schedule(lr, warmup_steps, total_steps)

    def adamw(scale: float) -> optax.GradientTransformation:
        rate = lr_schedule if scale == 1.0 else (lambda step: lr_schedule(step) * scale)
        return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    clip = optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity()
    trained = lambda tree: nnx.split_state(tree, train, ...)[0]  # noqa: E731
    if vision_lr_scale == 1.0:
        tx = optax.chain(clip, adamw(1.0))
    else:
        groups = {"train": adamw(1.0), "vision": adamw(vision_lr_scale)}
        tx = optax.chain(clip, optax.multi_transform(groups, trainable_labels(trained(params))))
    return optax.GradientTransformation(
        lambda params: tx.init(trained(params)),
        lambda updates, state, params=None: tx.update(trained(updates), state, None if params is None else trained(params)),
    )


def from_config(
    params: nnx.State, optim, total_steps: int, *, train: nnx.filterlib.Filter | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the config section `optim` (lr, warmup_steps, weight_decay, b1, b2,
    clip_norm, vision_lr_scale) for the parameters `train` (default `trainable(optim.freeze_vision)`) over
    `total_steps` updates, and its learning-rate schedule."""
    train = trainable(optim.freeze_vision) if train is None else train
    tx = make_optimizer(
        params, lr=optim.lr, warmup_steps=optim.warmup_steps, total_steps=total_steps, weight_decay=optim.weight_decay,
        b1=optim.b1, b2=optim.b2, clip_norm=optim.clip_norm, train=train, vision_lr_scale=optim.vision_lr_scale,
    )
    return tx, schedule(optim.lr, optim.warmup_steps, total_steps)
