"""LA-GRPO: rollouts from the current policy, verifiable rewards, and the anchored GRPO update.

    python -m atlas_jax.main --config=configs/la_grpo_synthetic.py --workdir=/tmp/atlas_rl \
        --config.checkpoint.init_from=/tmp/atlas_sft

`train.steps` counts rollout batches (each followed by `rl.num_iterations` updates); the policy
and the reference start from `checkpoint.init_from`.

Reads top to bottom: mesh -> data -> policy / reference / optimizer -> sampler and step ->
checkpoint -> loop (sample G completions per prompt, score them, `num_iterations` updates).
On several hosts each host scores the completions of its own prompts (its block of the global
batch); the rewards are gathered so the global reward array (and every logged metric) is the one a
single host would compute.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, multihost, run_config, sampling
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import device_batch, pipeline
from atlas_jax.data.synthetic import TASKS
from atlas_jax.jobs import evaluate
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.train import la_grpo, optimizer, train_state

log = logging.getLogger("atlas_jax")


def reward_functions(c: mlc.ConfigDict, tokens: tokenizer_lib.RunTokens) -> dict:
    """name -> (weight, fn) from `c.rl.rewards`; 'expected_usage' rewards each synthetic task's own token(s)."""
    table = dict(rewards_lib.DEFAULT_REWARDS)
    ids = dict(tokens.functional)
    expected = {t: [ids[o] for o in spec.ops if o in ids] for t, spec in TASKS.items()}
    table["expected_usage"] = (0.0, rewards_lib.expected_usage_reward(expected))
    return {k: (float(w), table[k][1]) for k, w in c.rl.rewards.items() if w}


def score_rollouts(host: dict, out: dict, tok, tokens: tokenizer_lib.RunTokens, reward_fns: dict, group_size: int) -> dict:
    """The rewards of every rollout of the global batch, identical on every host.

    Each host decodes and scores the G completions of its own prompts (its block of the global
    batch, whose rollouts are the same block of the sampler's rows) against its own answers and
    tasks; the scores are then gathered in process order, the global row order, so the result is
    the same whatever the number of hosts.
    out: the sampler's outputs for B*G rows (row i*G + j is sample j of prompt i).
    Returns float32[B*G] arrays 'total' (weighted sum), 'accuracy', 'lengths' (completion
    tokens) and 'per_fn' {name: unweighted reward}."""
    completions, mask = multihost.gather((out["tokens"], out["mask"]))
    rows = multihost.own_rows(completions.shape[0])
    completions, mask = completions[rows], mask[rows]
    ids = [t[m].tolist() for t, m in zip(completions, mask)]
    texts = [tok.decode([i for i in x if i not in tokens.stop_ids], skip_special_tokens=False) for x in ids]
    answers = [a for a in host["answer"] for _ in range(group_size)]
    tasks = [t for t in host["task"] for _ in range(group_size)]
    total, per_fn = rewards_lib.combine(reward_fns, texts, answers, ids, tasks, tokens.functional_ids)
    accuracy = per_fn.get("accuracy")
    if accuracy is None:
        accuracy = np.array([rewards_lib.accuracy_reward(t, a) for t, a in zip(texts, answers)])
    names = sorted(per_fn)
    local = np.stack([total, accuracy, mask.sum(1), *(per_fn[k] for k in names)], axis=1).astype(np.float32)
    full = multihost.gather(local)
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
        "positions": jnp.concatenate([out["prompt_positions"], out["positions"]], axis=-1),
        "completion_mask": out["mask"],
        "old_logprobs": out["logprobs"],
        "rewards": rewards_r,
    }
    for k in ("pixel_values",) + device_batch.LAYOUT_KEYS:
        if k in prompt_batch:
            batch[k] = prompt_batch[k]
    return batch


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    r = c.rl
    # ------------------------------------------------------------------ mesh
    mesh = builders.make_mesh(c)

    # ------------------------------------------------------------------ data
    builders.build_data(c, workdir)
    tok = builders.make_tokenizer(c, workdir)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)

    # ------------------------------------------------------------------ policy / reference / optimizer
    model = builders.make_model(c, tok, tokens, mesh)
    model_cfg = model.cfg
    loss_cfg = run_config.loss_config(c)
    tx, _ = optimizer.from_config(nnx.state(model), c.optim, total_steps=c.train.steps * r.num_iterations)
    graphdef, state, state_sh = train_state.create(model, tx, mesh)
    policy = builders.Policy(tok, tokens, model_cfg, graphdef, state.params)  # evaluated with each step's params
    del model
    if c.checkpoint.init_from:
        state = state._replace(params=checkpoint.init_from(c.checkpoint.init_from, checkpoint.abstract(state.params)))
        log.info("policy and reference start from %s", c.checkpoint.init_from)
    ref_params = jax.tree.map(jnp.copy, state.params) if loss_cfg.beta > 0 else None  # frozen, sharded like the policy
    ref_sh = state_sh.params if ref_params is not None else None

    prompts = pipeline.make_dataset(
        builders.load_split(c, workdir, "train"), tok,
        builders.make_pipeline_config(c, model_cfg, fmt="rl", batch_size=r.prompts_per_step, seed_offset=1), model_cfg,
    )
    data_it = iter(prompts)

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = checkpoint.Checkpoints(workdir, keep=c.checkpoint.keep, save_every=c.checkpoint.every, async_save=c.checkpoint.async_save)
    if (start := ckpt.latest_step()) is not None:
        state, _ = ckpt.restore(start, checkpoint.abstract(state), data_it)
        log.info("resumed from update %d in %s", start, workdir)

    # ------------------------------------------------------------------ sampler, rewards, step
    scfg = run_config.rollout_sampling(c, tokens, num_samples=r.group_size)
    reward_fns = reward_functions(c, tokens)
    step_fn = None

    # ------------------------------------------------------------------ loop
    writer = metrics_lib.MetricsWriter(workdir)
    rl_step = int(jax.device_get(state.step)) // r.num_iterations
    last: dict = {}
    while rl_step < c.train.steps:
        host = next(data_it)
        batch = pipeline.to_global(host, mesh)
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), rl_step)
        with jax.set_mesh(mesh):
            out = sampling.generate(graphdef, state.params, batch, rng, scfg)
        scores = score_rollouts(host, out, tok, tokens, reward_fns, r.group_size)
        rewards_r = jax.make_array_from_callback(
            scores["total"].shape, device_batch.batch_shardings({"rewards": scores["total"]}, mesh)["rewards"],
            lambda index: scores["total"][index],
        )
        rl_batch = _rollout_batch(out, {k: v for k, v in batch.items() if isinstance(v, jax.Array)}, rewards_r)
        if step_fn is None:
            step_fn = la_grpo.make_rl_step(
                graphdef, tx, loss_cfg, group_size=r.group_size, scale_rewards=r.scale_rewards,
                functional_ids=tokens.functional_ids, anchor_share=r.anchor_share,
                state_sharding=state_sh, ref_sharding=ref_sh, batch_sharding={k: v.sharding for k, v in rl_batch.items()})
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
        if rl_step % c.train.log_every == 0 or rl_step == c.train.steps:
            log.info("rl %s reward %.3f accuracy %.3f functional/completion %.2f kl %.4f anchor %.4f",
                     metrics_lib.progress_bar(rl_step, c.train.steps), float(scores["total"].mean()), last["train_accuracy"],
                     last["functional_per_completion"], last["kl"], last["anchor_loss"])
        ckpt.save(int(jax.device_get(state.step)), state, data_it, c)
        if c.eval.every and rl_step % c.eval.every == 0 and rl_step < c.train.steps:
            evaluate.evaluate_and_log(writer, rl_step, policy.with_params(state.params), c, workdir, mesh, tag=f"rl_step{rl_step}")
        if ckpt.reached_preemption(rl_step) or rl_step == c.train.stop_at:
            break

    # ------------------------------------------------------------------ final save, evaluation
    ckpt.save(int(jax.device_get(state.step)), state, data_it, c, force=True)
    ckpt.close()
    if rl_step >= c.train.steps and c.eval.num_per_task > 0:
        last.update(evaluate.evaluate_and_log(writer, rl_step, policy.with_params(state.params), c, workdir, mesh, tag=f"rl_step{rl_step}"))
    writer.close()
    return last
