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

from atlas_jax.data.device_batch import model_inputs
from atlas_jax.train import token_logprobs
from atlas_jax.train.train_state import TrainState


def sft_loss(hidden_btd: jax.Array, head_dv: jax.Array, batch: dict, *,
             head_chunk: int = token_logprobs.CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed cross-entropy over target tokens and its counts (sums, so micro-batches add exactly).

    hidden_btd: float[B, T, D] final hidden states (`VLM(..., head=False)`); head_dv: float[D, V]
    (`VLM.output_head()`), applied `head_chunk` positions at a time (`token_logprobs`), so no
    float32 [B, T, V] logits exist. Position t predicts token t+1; targets are tokens with `loss_mask`.
    Returns (sum of CE, {'tokens', 'correct', 'func_tokens', 'func_correct', 'ce_sum'}).
    """
    ids = batch["input_ids"]
    targets_bt = ids[:, 1:]
    mask_bt = batch["loss_mask"][:, 1:]
    func_bt = batch["functional_mask"][:, 1:] & mask_bt
    logp_bt, hit_bt = token_logprobs.target_logprobs(hidden_btd[:, :-1], head_dv, targets_bt, chunk=head_chunk)
    ce_sum = -jnp.sum(jnp.where(mask_bt, logp_bt, 0.0))
    sums = {
        "ce_sum": ce_sum,
        "tokens": mask_bt.sum(),
        "correct": (hit_bt & mask_bt).sum(),
        "func_tokens": func_bt.sum(),
        "func_correct": (hit_bt & func_bt).sum(),
    }
    return ce_sum, sums


def _split_micro(batch: dict, n: int) -> dict:
    """[A*B, ...] -> [A, B, ...] for every array: n = A micro-batches of B rows."""
    return {k: x.reshape(n, x.shape[0] // n, *x.shape[1:]) for k, x in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    state_sharding: Any,
    batch_sharding: Any,
    grad_accum: int = 1,
    lr_schedule: Callable | None = None,
    train: nnx.filterlib.Filter = nnx.Param,
    head_chunk: int = token_logprobs.CHUNK,
):
    """The compiled SFT step `(TrainState, batch) -> (TrainState, metrics)`. Gradients are taken
    w.r.t. the parameters `train` only (`optimizer.trainable`): no backward pass runs through
    the frozen rest (a frozen vision tower, LoRA's base weights), and `tx` (`optimizer.make_optimizer`
    with the same `train`) updates only them: the frozen arrays pass through unchanged. head_chunk: positions the
    output head runs on at a time (`sft_loss`); the same values at any size, only memory and the
    loop's trip count change."""

    def grads_of(trained, frozen, micro):
        def loss_fn(t):
            model = nnx.merge(graphdef, t, frozen)
            args, kw = model_inputs(micro)
            hidden, _, _ = model(*args, head=False, **kw)
            return sft_loss(hidden, model.output_head(), micro, head_chunk=head_chunk)

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        return grads, sums

    def step(state: TrainState, batch: dict):
        trained, frozen = nnx.split_state(state.params, train, ...)
        if grad_accum == 1:
            grads, sums = grads_of(trained, frozen, batch)
        else:
            micro = _split_micro(batch, grad_accum)

            def body(carry, mb):
                g, s = grads_of(trained, frozen, mb)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_g = jax.tree.map(jnp.zeros_like, trained)
            zero_s = jax.eval_shape(lambda: grads_of(trained, frozen, jax.tree.map(lambda x: x[0], micro))[1])
            zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_s)
            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), micro)
        n = jnp.maximum(sums["tokens"], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / n, grads)  # exact token mean over the whole batch
        updates, opt_state = tx.update(grads, state.opt_state, trained)  # the frozen rest passes through
        params = nnx.merge_state(optax.apply_updates(trained, updates), frozen)
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
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
