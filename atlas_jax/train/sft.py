"""The SFT update: masked next-token cross-entropy on assistant tokens, one compiled step.

`sft_loss` is pure and testable alone. `make_train_step` returns ONE `jax.jit`-compiled
function `(state, batch) -> (state, metrics)` with explicit shardings and the state donated:
forward, loss, gradients (summed exactly over `grad_accum` micro-batches), clipping, the optax
update and metrics, all inside one program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atlas_jax.data.batching import LAYOUT_KEYS
from atlas_jax.train.train_state import TrainState


def model_inputs(batch: dict) -> tuple[tuple, dict]:
    """(positional args, keyword args) of `VLM.__call__` from a pipeline batch."""
    args = (batch["input_ids"], batch["positions"], batch["attention_mask"])
    kw = {}
    if "pixel_values" in batch:
        kw = dict(pixel_values=batch["pixel_values"], vision={k: batch[k] for k in LAYOUT_KEYS})
    return args, kw


def sft_loss(logits_btv: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy over target tokens and its counts (sums, so micro-batches add exactly).

    The logit at position t predicts token t+1; targets are tokens with `loss_mask`.
    Returns (sum of CE, {'tokens', 'correct', 'func_tokens', 'func_correct', 'ce_sum'}).
    """
    ids = batch["input_ids"]
    targets_bt = ids[:, 1:]
    mask_bt = batch["loss_mask"][:, 1:]
    func_bt = batch["functional_mask"][:, 1:] & mask_bt
    logits = logits_btv[:, :-1].astype(jnp.float32)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits, targets_bt)
    ce_sum = jnp.sum(jnp.where(mask_bt, ce_bt, 0.0))
    hit_bt = jnp.argmax(logits, axis=-1) == targets_bt
    sums = {
        "ce_sum": ce_sum,
        "tokens": mask_bt.sum(),
        "correct": (hit_bt & mask_bt).sum(),
        "func_tokens": func_bt.sum(),
        "func_correct": (hit_bt & func_bt).sum(),
    }
    return ce_sum, sums


def _split_micro(batch: dict, n: int) -> dict:
    """[A*B, ...] -> [A, B, ...] (positions: [3, A*B, T] -> [A, 3, B, T])."""

    def one(k, x):
        if k == "positions":
            x = x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])
            return jnp.moveaxis(x, 1, 0)
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: one(k, v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    state_sharding: Any,
    batch_sharding: Any,
    grad_accum: int = 1,
    lr_schedule: Callable | None = None,
):
    """The compiled SFT step `(TrainState, batch) -> (TrainState, metrics)`."""

    def grads_of(params, micro):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            args, kw = model_inputs(micro)
            logits, _, _ = model(*args, **kw)
            return sft_loss(logits, micro)

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, sums

    def step(state: TrainState, batch: dict):
        if grad_accum == 1:
            grads, sums = grads_of(state.params, batch)
        else:
            micro = _split_micro(batch, grad_accum)

            def body(carry, mb):
                g, s = grads_of(state.params, mb)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_g = jax.tree.map(jnp.zeros_like, state.params)
            zero_s = jax.eval_shape(lambda: grads_of(state.params, jax.tree.map(lambda x: x[0], micro))[1])
            zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_s)
            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), micro)
        n = jnp.maximum(sums["tokens"], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / n, grads)  # exact token mean over the whole batch
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["ce_sum"] / n,
            "accuracy": sums["correct"] / n,
            "accuracy_functional": sums["func_correct"] / jnp.maximum(sums["func_tokens"], 1),
            "accuracy_other": (sums["correct"] - sums["func_correct"]) / jnp.maximum(sums["tokens"] - sums["func_tokens"], 1),
            "tokens": sums["tokens"],
            "functional_tokens": sums["func_tokens"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
