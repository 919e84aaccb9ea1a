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

Dynamic sampling (`rl.filter_groups`, DAPO): groups whose rewards (or accuracies) are all equal
carry no gradient; they are dropped and further prompt batches sampled, at most
`rl.max_extra_rounds` more, until `prompts_per_step` informative groups fill the update batch (if
they do not, dropped groups fill the rest: zero advantage). Which groups are kept is decided on the
gathered rewards, identically on every host, so every host builds the same global batch.
Logged metrics describe the first rollout round (the current policy's samples, unfiltered).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, multihost, run_config, sampling
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import device_batch, pipeline
from atlas_jax.data.device_batch import LAYOUT_KEYS
from atlas_jax.data.synthetic import TASKS
from atlas_jax.jobs import evaluate
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.train import la_grpo, optimizer, train_state

log = logging.getLogger("atlas_jax")


def reward_functions(c: mlc.ConfigDict, tokens: tokenizer_lib.RunTokens) -> dict:
    """name -> (weight, fn) from `c.rl.rewards` and `c.rl.custom_rewards`; 'expected_usage' rewards
    the token(s) a record names in `ops` (user data), else its synthetic task's own, 'overlong' is
    DAPO's soft penalty at the sampler's length."""
    r = c.rl
    table = dict(rewards_lib.DEFAULT_REWARDS)
    ids = dict(tokens.functional)
    expected = {t: [ids[o] for o in spec.ops if o in ids] for t, spec in TASKS.items()}
    table["expected_usage"] = (0.0, rewards_lib.expected_usage_reward(expected))
    table["overlong"] = (0.0, functools.partial(rewards_lib.overlong_penalty, max_length=r.sample.max_new_tokens,
                                                buffer=r.overlong_buffer, penalty=r.overlong_penalty))
    fns = {k: (float(w), table[k][1]) for k, w in r.rewards.items() if w}
    for spec in r.custom_rewards:
        name, weight, fn = rewards_lib.load_reward(spec)
        fns[name] = (weight, fn)
    return fns


def score_rollouts(host: dict, out: dict, tok, tokens: tokenizer_lib.RunTokens, reward_fns: dict, group_size: int,
                   on_error: str = "raise") -> dict:
    """The rewards of every rollout of the global batch, identical on every host.

    Each host decodes and scores the G completions of its own prompts (its block of the global
    batch, whose rollouts are the same block of the sampler's rows) against its own answers,
    tasks and expected ops (a record's `ops`, as token ids, for the rewards that accept them); the
    scores are then gathered in process order, the global row order, so the result is the same
    whatever the number of hosts.
    out: the sampler's outputs for B*G rows (row i*G + j is sample j of prompt i).
    on_error: `rewards.combine`'s ('raise' | 'zero').
    Returns float32[B*G] arrays 'total' (weighted sum), 'accuracy', 'lengths' (completion
    tokens), 'truncated' (1: hit max_new_tokens without a stop token), 'functional' (functional
    tokens per completion), 'per_fn' {name: unweighted reward} and 'errors' (failed reward calls,
    all hosts)."""
    completions, mask = multihost.gather((out["tokens"], out["mask"]))
    rows = multihost.own_rows(completions.shape[0])
    completions, mask = completions[rows], mask[rows]
    ids = [t[m].tolist() for t, m in zip(completions, mask)]
    texts = [tok.decode([i for i in x if i not in tokens.stop_ids], skip_special_tokens=False) for x in ids]
    answers = [a for a in host["answer"] for _ in range(group_size)]
    tasks = [t for t in host["task"] for _ in range(group_size)]
    op_ids = dict(tokens.functional)  # the pipeline admits only configured ops
    expected = [tuple(op_ids[o] for o in ops) for ops in host["ops"] for _ in range(group_size)]
    total, per_fn, errors = rewards_lib.combine(reward_fns, texts, answers, ids, tasks, tokens.functional_ids, on_error, expected)
    accuracy = per_fn.get("accuracy")
    if accuracy is None:
        accuracy = np.array([rewards_lib.accuracy_reward(t, a) for t, a in zip(texts, answers)])
    names = sorted(per_fn)
    truncated = mask[:, -1] & ~np.isin(completions[:, -1], tokens.stop_ids)
    functional = (np.isin(completions, tokens.functional_ids) & mask).sum(1)
    local = np.stack([total, accuracy, mask.sum(1), truncated, functional, *(per_fn[k] for k in names)], axis=1).astype(np.float32)
    full = multihost.gather(local)
    return {"total": full[:, 0], "accuracy": full[:, 1], "lengths": full[:, 2], "truncated": full[:, 3],
            "functional": full[:, 4], "per_fn": {k: full[:, 5 + i] for i, k in enumerate(names)},
            "errors": float(multihost.sum_over_hosts(sum(errors.values())))}


def rollout_metrics(scores: dict, group_size: int) -> dict[str, float]:
    """Per-step metrics of one round of scored rollouts (`score_rollouts`)."""
    row = {}
    for k, v in scores["per_fn"].items():
        row[f"reward/{k}"], row[f"reward/{k}_std"] = float(v.mean()), float(v.std())
    lengths = scores["lengths"]
    row.update({
        "reward/total": float(scores["total"].mean()),
        "reward/total_std": float(scores["total"].std()),
        "reward/errors": scores["errors"],
        "frac_reward_zero_std": float(1.0 - informative_groups(scores["total"], group_size).mean()),
        "train_accuracy": float(scores["accuracy"].mean()),
        "completion_length": float(lengths.mean()),
        "completion_length/min": float(lengths.min()),
        "completion_length/max": float(lengths.max()),
        "truncated_frac": float(scores["truncated"].mean()),
        "functional_tokens/completion": float(scores["functional"].mean()),
    })
    return row


def informative_groups(values_r: np.ndarray, group_size: int) -> np.ndarray:
    """bool[B]: the groups whose G values (rewards or accuracies) are not all equal: only they
    carry a policy gradient. values_r: float[B*G], a group's rows contiguous."""
    v_bg = np.asarray(values_r).reshape(-1, group_size)
    return v_bg.max(axis=1) > v_bg.min(axis=1)


def choose_groups(informative_per_round: list[np.ndarray], num_groups: int) -> tuple[np.ndarray, int]:
    """(int[num_groups] indices into the rounds' groups laid end to end, how many of them are
    uninformative): the informative groups in sampling order, then, to fill the batch, the others."""
    flags = np.concatenate(informative_per_round)
    order = np.concatenate([np.flatnonzero(flags), np.flatnonzero(~flags)])[:num_groups]
    return order, int((~flags[order]).sum())


@functools.partial(jax.jit, static_argnames="group_size")
def _take_groups(batches: list[dict], groups: jax.Array, group_size: int) -> dict:
    """The update batch of the chosen `groups` (indices into the batches' groups laid end to end):
    per-prompt arrays (images) take rows `groups`, per-rollout arrays rows g*G .. g*G + G-1."""
    rows = (groups[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
    per_prompt = ("pixel_values",) + LAYOUT_KEYS
    return {k: jnp.concatenate([b[k] for b in batches])[groups if k in per_prompt else rows] for k in batches[0]}


@functools.partial(jax.jit, static_argnames="stop_ids")
def _mask_truncated(batch: dict, stop_ids: tuple[int, ...]) -> dict:
    """`completion_mask` without the completions that hit max_new_tokens with no stop token."""
    mask = batch["completion_mask"]
    last = batch["input_ids"][:, -1]
    truncated = mask[:, -1] & ~jnp.isin(last, jnp.asarray(stop_ids, jnp.int32))
    return dict(batch, completion_mask=mask & ~truncated[:, None])


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
    """Runs `c.train.steps` rollout batches; returns the last one's metrics. Stopped by SIGTERM,
    it saves and raises `checkpoint.Preempted`."""
    # Checkpoints first: a SIGTERM during the minutes of start-up is caught, and honoured before the loop.
    with checkpoint.Checkpoints(workdir, keep=c.checkpoint.keep, save_every=c.checkpoint.every, async_save=c.checkpoint.async_save) as ckpt:
        return _train(c, workdir, ckpt)


def _train(c: mlc.ConfigDict, workdir: str, ckpt: checkpoint.Checkpoints) -> dict:
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
    train = builders.trainable(c)
    tx, _ = optimizer.from_config(nnx.state(model), c.optim, total_steps=c.train.steps * r.num_iterations, train=train)
    graphdef, state, state_sh = train_state.create(model, tx, mesh)
    policy = builders.Policy(tok, tokens, model_cfg, graphdef, state.params)  # evaluated with each step's params
    del model
    # The reference: with LoRA, the policy with its adapters off (no copy); else (beta > 0) a frozen
    # copy of the starting params. A resumed run restores its policy below, so it reads
    # `checkpoint.init_from` only for that copy.
    ref_adapters_off = run_config.lora_config(c).enabled
    reference_copy = loss_cfg.beta > 0 and not ref_adapters_off
    start = ckpt.latest_step()
    if c.checkpoint.init_from and (start is None or reference_copy):
        state = state._replace(params=checkpoint.init_from(c.checkpoint.init_from, checkpoint.abstract(state.params)))
        log.info("%s start from %s", "reference" if start is not None else "policy and reference", c.checkpoint.init_from)
    ref_params = jax.tree.map(jnp.copy, state.params) if reference_copy else None
    ref_sh = state_sh.params if ref_params is not None else None

    prompts = pipeline.make_dataset(
        builders.load_split(c, workdir, "train"), tok, tokens,
        builders.make_pipeline_config(c, model_cfg, fmt="rl", batch_size=r.prompts_per_step, seed_offset=1), model_cfg,
    )
    data_it = iter(prompts)

    # ------------------------------------------------------------------ resume
    if start is not None:
        state, _ = ckpt.restore(start, checkpoint.abstract(state), data_it)
        log.info("resumed from update %d in %s", start, workdir)
    builders.save_run_config(c, workdir)  # what `python -m atlas_jax.generate --checkpoint=WORKDIR` rebuilds the model from

    # ------------------------------------------------------------------ sampler, rewards, step
    scfg = run_config.rollout_sampling(c, tokens, num_samples=r.group_size)
    reward_fns = reward_functions(c, tokens)
    step_fn = None
    G = r.group_size

    def sample_round(params, rng) -> tuple[dict, dict, dict]:
        """The next prompt batch's rollouts: (the update step's batch, `score_rollouts`' scores, the prompt batch)."""
        host = next(data_it)
        batch = pipeline.to_global(host, mesh)
        with jax.set_mesh(mesh):
            out = sampling.generate(graphdef, params, batch, rng, scfg)
        scores = score_rollouts(host, out, tok, tokens, reward_fns, G, r.reward_errors)
        rewards_r = jax.make_array_from_callback(
            scores["total"].shape, device_batch.batch_shardings({"rewards": scores["total"]}, mesh)["rewards"],
            lambda index: scores["total"][index],
        )
        rl_batch = _rollout_batch(out, {k: v for k, v in batch.items() if isinstance(v, jax.Array)}, rewards_r)
        return (_mask_truncated(rl_batch, tokens.stop_ids) if r.mask_truncated else rl_batch), scores, batch

    # ------------------------------------------------------------------ loop
    rl_step = int(jax.device_get(state.step)) // r.num_iterations
    if ckpt.reached_preemption(rl_step):  # SIGTERM during start-up: nothing trained, nothing to save
        raise checkpoint.Preempted(rl_step, workdir)
    writer = metrics_lib.MetricsWriter(workdir, start_step=rl_step, wandb_project=c.train.wandb_project, run_config=c.to_dict())
    profiler = metrics_lib.StepProfiler(workdir, tuple(c.train.profile_steps))
    preempted = False
    last: dict = {}
    while rl_step < c.train.steps:
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), rl_step)
        rl_batch, scores, prompt_batch = sample_round(state.params, rng)
        rollout_row = rollout_metrics(scores, G)
        if r.filter_groups != "none":
            key = "total" if r.filter_groups == "reward" else "accuracy"
            rounds = [(rl_batch, informative_groups(scores[key], G))]
            while sum(int(f.sum()) for _, f in rounds) < r.prompts_per_step and len(rounds) <= r.max_extra_rounds:
                extra, extra_scores, _ = sample_round(state.params, jax.random.fold_in(rng, len(rounds)))
                rounds.append((extra, informative_groups(extra_scores[key], G)))
            groups, filled = choose_groups([f for _, f in rounds], r.prompts_per_step)
            with jax.set_mesh(mesh):
                chosen = _take_groups([b for b, _ in rounds], groups, G)
            rl_batch = jax.device_put(chosen, {k: v.sharding for k, v in rl_batch.items()})
            rollout_row.update({"dynamic/rounds": len(rounds), "dynamic/groups_dropped": int(sum((~f).sum() for _, f in rounds)),
                                "dynamic/filled_with_dropped": filled})
            if filled:
                log.warning("rl step %d: %d of %d groups are uninformative (all %s equal) after %d rollout rounds",
                            rl_step + 1, filled, r.prompts_per_step, key, len(rounds))
        if step_fn is None:
            step_fn = la_grpo.make_rl_step(
                graphdef, tx, loss_cfg, group_size=G, temperature=scfg.temperature, scale_rewards=r.scale_rewards,
                functional_ids=tokens.functional_ids, anchor_share=r.anchor_share, micro_batch=r.micro_batch,
                state_sharding=state_sh, ref_sharding=ref_sh, batch_sharding={k: v.sharding for k, v in rl_batch.items()},
                train=train, reference_adapters_off=ref_adapters_off,
            )
            # Prompts of another padded length compile their own program, so the loop calls the
            # jitted step; this compile is the one its first call reuses (JAX caches it).
            with jax.set_mesh(mesh):
                memory = {"sampler": sampling.compiled_memory(graphdef, state.params, prompt_batch, rng, scfg),
                          "update": step_fn.lower(state, ref_params, rl_batch).compile().memory_analysis()}
            for name, mem in memory.items():
                if mem is not None:
                    log.info("compiled %s memory: %s", name, mem)
        per_iteration = []
        profiler.before(rl_step + 1)  # the update alone: sampling and scoring are outside the trace
        with jax.set_mesh(mesh):
            for _ in range(r.num_iterations):
                state, m = step_fn(state, ref_params, rl_batch)
                per_iteration.append(m)
        rl_step += 1
        profiler.after(rl_step, per_iteration)
        last = inner_metrics(jax.device_get(per_iteration))
        metrics_lib.check_finite(last, rl_step)
        last.update(rollout_row)
        last["data/skipped_records"] = float(multihost.sum_over_hosts(data_it.num_skipped))
        writer.write(rl_step, last)
        if rl_step % c.train.log_every == 0 or rl_step == c.train.steps:
            log.info("rl %s reward %.3f accuracy %.3f functional/completion %.2f kl %.4f anchor %.4f",
                     metrics_lib.progress_bar(rl_step, c.train.steps), float(scores["total"].mean()), last["train_accuracy"],
                     last["functional_per_completion"], last["kl"], last["anchor_loss"])
        ckpt.save(int(jax.device_get(state.step)), state, data_it, c)
        if c.eval.every and rl_step % c.eval.every == 0 and rl_step < c.train.steps:
            evaluate.evaluate_and_log(writer, rl_step, policy.with_params(state.params), c, workdir, mesh, tag=f"rl_step{rl_step}")
        if (preempted := ckpt.reached_preemption(rl_step)) or rl_step == c.train.stop_at:
            break

    # ------------------------------------------------------------------ final save, evaluation
    profiler.close()
    ckpt.save(int(jax.device_get(state.step)), state, data_it, c, force=True)
    last.update(evaluate.finish_training(writer, rl_step, policy.with_params(state.params), c, workdir, mesh,
                                         stage="rl", preempted=preempted))
    return last
