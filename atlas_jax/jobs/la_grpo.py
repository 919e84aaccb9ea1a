"""LA-GRPO: rollouts from the current policy, verifiable rewards, and the anchored GRPO update.

    python -m atlas_jax.main --config=configs/la_grpo_synthetic.py --workdir=/tmp/atlas_rl \
        --config.rl.init_from=/tmp/atlas_sft

Reads top to bottom: mesh -> data -> policy / reference / optimizer -> sampler and step ->
checkpoint -> loop (sample G completions per prompt, score them, `num_iterations` updates).
On several hosts each host scores the completions of its own prompts; the rewards are gathered so
the global reward array (and every logged metric) is the one a single host would compute.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, multihost, sampling
from atlas_jax import functional_tokens as ft
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import pipeline
from atlas_jax.data.batching import LAYOUT_KEYS
from atlas_jax.data.synthetic import TASKS
from atlas_jax.jobs import evaluate
from atlas_jax.rl import losses, rewards as rewards_lib
from atlas_jax.train import la_grpo, optimizer, train_state

log = logging.getLogger("atlas_jax")


def reward_functions(c: mlc.ConfigDict, tok) -> dict:
    """name -> (weight, fn) from `c.rl.rewards`; 'expected_usage' rewards each synthetic task's own token(s)."""
    table = dict(rewards_lib.DEFAULT_REWARDS)
    names = tuple(c.model.functional_tokens)
    ids = dict(zip(names, tokenizer_lib.functional_token_ids(tok, ft.by_name(names))))
    expected = {t: [ids[o] for o in spec.ops if o in ids] for t, spec in TASKS.items()}
    table["expected_usage"] = (0.0, rewards_lib.expected_usage_reward(expected))
    return {k: (float(w), table[k][1]) for k, w in c.rl.rewards.items() if w}


def stream_order(batch: dict) -> tuple[dict, np.ndarray]:
    """The global batch with its rows in the order of the global record stream, and the global
    rows of this host's prompts (row j of its host batch is global row rows[j]).

    `pipeline.global_stream` gives host h the positions h, h + n, ... of the stream and
    `pipeline.to_global` puts each host's rows in one block, so with n > 1 hosts a global batch
    holds a one-host run's records in another order. The sampler draws row i's randomness from
    i, so only in the stream's order are the rollouts, rewards and updates a one-host run's."""
    n, me = jax.process_count(), jax.process_index()
    placed = multihost.host_rows(batch["input_ids"])
    if n == 1:
        return batch, placed
    # Host h's j-th prompt is stream position j * n + h of this batch.
    rows = np.arange(len(placed)) * n + me
    source = multihost.gather_rows(placed, rows, n * len(placed))
    arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
    permute = _row_permutation(tuple(int(i) for i in source), tuple((k, v.sharding) for k, v in arrays.items()))
    return {**batch, **permute(arrays)}, rows


@functools.lru_cache(maxsize=None)
def _row_permutation(source: tuple[int, ...], shardings: tuple):
    """A jitted `arrays -> arrays` taking row source[i] to row i along each array's batch axis."""
    index = np.asarray(source, np.int32)

    def permute(arrays: dict) -> dict:
        return {k: jnp.take(x, index, axis=pipeline.BATCH_AXIS.get(k, 0)) for k, x in arrays.items()}

    return jax.jit(permute, out_shardings=dict(shardings))


def score_rollouts(host: dict, prompt_rows: np.ndarray, out: dict, tok, stop, reward_fns: dict, func_ids, group_size: int) -> dict:
    """The rewards of every rollout of the global batch, identical on every host.

    Each host decodes and scores the G completions of its own prompts (global rows
    `prompt_rows`, see `stream_order`) against its own answers and tasks; the scores are then
    gathered, so the result is the same whatever the number of hosts.
    out: the sampler's outputs for B*G rows (row i*G + j is sample j of prompt i).
    Returns float32[B*G] arrays 'total' (weighted sum), 'accuracy', 'lengths' (completion
    tokens) and 'per_fn' {name: unweighted reward}."""
    tokens, mask = multihost.gather((out["tokens"], out["mask"]))
    rows = (np.asarray(prompt_rows)[:, None] * group_size + np.arange(group_size)).ravel()
    ids = [tokens[i][mask[i]].tolist() for i in rows]
    texts = [tok.decode([i for i in x if i not in stop], skip_special_tokens=False) for x in ids]
    answers = [a for a in host["answer"] for _ in range(group_size)]
    tasks = [t for t in host["task"] for _ in range(group_size)]
    total, per_fn = rewards_lib.combine(reward_fns, texts, answers, ids, tasks, func_ids)
    accuracy = per_fn.get("accuracy")
    if accuracy is None:
        accuracy = np.array([rewards_lib.accuracy_reward(t, a) for t, a in zip(texts, answers)])
    names = sorted(per_fn)
    local = np.stack([total, accuracy, mask[rows].sum(1), *(per_fn[k] for k in names)], axis=1).astype(np.float32)
    full = multihost.gather_rows(local, rows, tokens.shape[0])
    return {"total": full[:, 0], "accuracy": full[:, 1], "lengths": full[:, 2],
            "per_fn": {k: full[:, 3 + i] for i, k in enumerate(names)}}


def inner_metrics(per_iteration: list[dict]) -> dict[str, float]:
    """One row of metrics for the `num_iterations` updates of one rollout batch.

    The mean over the updates, except `logp_gap/mean_abs`, taken from the first update: the
    sampler-vs-trainer log-prob gap before this batch moved the policy (later updates measure
    the policy's own steps too), and `param_norm`, after the last update. With more than one
    update also `loss/first`, `loss/last` and `logp_gap/last_update` (how far the updates moved
    the log-probs of this batch's tokens)."""
    first, final = per_iteration[0], per_iteration[-1]
    row = {k: float(np.mean([m[k] for m in per_iteration])) for k in first}
    row["logp_gap/mean_abs"] = float(first["logp_gap/mean_abs"])
    row["param_norm"] = float(final["param_norm"])
    if len(per_iteration) > 1:
        row["loss/first"], row["loss/last"] = float(first["loss"]), float(final["loss"])
        row["logp_gap/last_update"] = float(final["logp_gap/mean_abs"])
    return row


@jax.jit
def _rollout_batch(out: dict, prompt_batch: dict, rewards_r: jax.Array) -> dict:
    """The update step's inputs: prompt + completion sequences, images per prompt."""
    batch = {
        "input_ids": jnp.concatenate([out["prompt_ids"], out["tokens"]], axis=1),
        "attention_mask": jnp.concatenate([out["prompt_mask"], out["mask"]], axis=1),
        "positions": jnp.concatenate([out["prompt_positions"], out["positions"]], axis=2),
        "completion_mask": out["mask"],
        "old_logprobs": out["logprobs"],
        "rewards": rewards_r,
    }
    for k in ("pixel_values",) + LAYOUT_KEYS:
        if k in prompt_batch:
            batch[k] = prompt_batch[k]
    return batch


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    r = c.rl
    # ------------------------------------------------------------------ mesh
    mesh = builders.mesh(c)

    # ------------------------------------------------------------------ data
    builders.build_data(c, workdir)
    tok = builders.tokenizer(c, workdir)

    # ------------------------------------------------------------------ policy / reference / optimizer
    model = builders.model(c, tok, mesh)
    model_cfg = model.cfg
    graphdef, params = nnx.split(model)
    del model
    if r.init_from:
        params = checkpoint.init_from(r.init_from, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params))
        log.info("policy and reference start from %s", r.init_from)
    ref_params = jax.tree.map(jnp.copy, params) if r.beta > 0 else None  # frozen, sharded like the policy
    ref_sh = jax.tree.map(lambda x: x.sharding, ref_params) if ref_params is not None else None
    tx = optimizer.make_optimizer(
        params, lr=r.lr, warmup_steps=r.warmup_steps, total_steps=r.steps * r.num_iterations,
        weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2, clip_norm=c.optim.clip_norm,
        frozen=("vision",) if c.optim.freeze_vision else (),
    )
    graphdef, state, state_sh = train_state.create(nnx.merge(graphdef, params), tx, mesh, seed=c.seed)
    del params

    prompts = pipeline.make_dataset(
        builders.source(c, workdir, "train"), tok,
        builders.pipeline_config(c, model_cfg, fmt="rl", batch_size=r.prompts_per_step, seed_offset=1), model_cfg,
    )
    data_it = iter(prompts)

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = checkpoint.Checkpointer(workdir, keep=c.checkpoint.keep, save_every=c.checkpoint.every, async_save=c.checkpoint.async_save)
    if (start := ckpt.latest_step()) is not None:
        state, data_state, _ = ckpt.restore(start, train_state.abstract_state(state, state_sh))
        if data_state is not None:
            pipeline.restore(data_it, data_state)
        log.info("resumed from update %d in %s", start, workdir)
    preempted = checkpoint.install_sigterm_handler()

    # ------------------------------------------------------------------ sampler, rewards, step
    stop = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    scfg = sampling.SamplingConfig(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        stop_ids=stop, pad_id=tok.pad_token_id or 0, num_samples=r.group_size,
    )
    reward_fns = reward_functions(c, tok)
    func_ids = tuple(model_cfg.visual_ops.token_ids)
    lc = losses.GRPOLossConfig(loss_type=r.loss_type, epsilon_low=r.epsilon_low, epsilon_high=r.epsilon_high,
                               beta=r.beta, alpha=r.alpha, max_completion_length=r.max_new_tokens)
    rcfg = la_grpo.RLStepConfig(loss=lc, group_size=r.group_size, scale_rewards=r.scale_rewards,
                                functional_ids=func_ids, anchor_share=r.anchor_share)
    step_fn = None

    # ------------------------------------------------------------------ loop
    writer = metrics_lib.MetricsWriter(workdir)
    rl_step = int(jax.device_get(state.step)) // r.num_iterations
    last: dict = {}
    while rl_step < r.steps:
        host = next(data_it)
        batch, prompt_rows = stream_order(pipeline.to_global(host, mesh))
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), rl_step)
        with jax.set_mesh(mesh):
            out = sampling.generate(graphdef, state.params, batch, rng, scfg)
        scores = score_rollouts(host, prompt_rows, out, tok, stop, reward_fns, func_ids, r.group_size)
        rewards_r = jax.make_array_from_callback(
            scores["total"].shape, pipeline.batch_shardings({"rewards": scores["total"]}, mesh)["rewards"],
            lambda index: scores["total"][index],
        )
        rl_batch = _rollout_batch(out, {k: v for k, v in batch.items() if isinstance(v, jax.Array)}, rewards_r)
        if step_fn is None:
            step_fn = la_grpo.make_rl_step(graphdef, tx, rcfg, state_sharding=state_sh, ref_sharding=ref_sh,
                                           batch_sharding={k: v.sharding for k, v in rl_batch.items()})
        per_iteration = []
        with jax.set_mesh(mesh):
            for _ in range(r.num_iterations):
                state, m = step_fn(state, ref_params, rl_batch)
                per_iteration.append(m)
        rl_step += 1
        last = inner_metrics(jax.device_get(per_iteration))
        metrics_lib.check_finite(last, rl_step)
        last.update({f"reward/{k}": float(v.mean()) for k, v in scores["per_fn"].items()})
        last["reward/total_std"] = float(scores["total"].std())
        last["completion_length"] = float(scores["lengths"].mean())
        last["train_accuracy"] = float(scores["accuracy"].mean())
        last["data/skipped_records"] = float(multihost.sum_over_hosts(data_it.num_skipped))
        writer.write(rl_step, last)
        if rl_step % c.train.log_every == 0 or rl_step == r.steps:
            log.info("rl %s reward %.3f accuracy %.3f functional/completion %.2f kl %.4f anchor %.4f",
                     metrics_lib.progress_bar(rl_step, r.steps), float(scores["total"].mean()), last["train_accuracy"],
                     last["functional_per_completion"], last["kl"], last["anchor_loss"])
        ckpt.save(int(jax.device_get(state.step)), state, data_state=pipeline.pipeline_state(data_it), config=c.to_dict())
        if r.eval_every and rl_step % r.eval_every == 0 and rl_step < r.steps:
            res = evaluate.evaluate(graphdef, state.params, tok, c, workdir, mesh, tag=f"rl_step{rl_step}")
            writer.write(rl_step, {f"eval/{k}": v for k, v in res.items()})
        if preempted.should_stop() or rl_step == c.train.stop_at:
            break

    # ------------------------------------------------------------------ final save, evaluation
    ckpt.save(int(jax.device_get(state.step)), state, data_state=pipeline.pipeline_state(data_it), config=c.to_dict(), force=True)
    ckpt.close()
    preempted.uninstall()
    if rl_step >= r.steps and c.eval.num_per_task > 0:
        res = evaluate.evaluate(graphdef, state.params, tok, c, workdir, mesh, tag=f"rl_step{rl_step}")
        writer.write(rl_step, {f"eval/{k}": v for k, v in res.items()})
        last.update({f"eval/{k}": v for k, v in res.items()})
    writer.close()
    return last
