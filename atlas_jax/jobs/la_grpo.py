"""LA-GRPO: rollouts from the current policy, verifiable rewards, and the anchored GRPO update.

    python -m atlas_jax.main --config=configs/la_grpo_synthetic.py --workdir=/tmp/atlas_rl \
        --config.rl.init_from=/tmp/atlas_sft

Reads top to bottom: mesh -> data -> policy / reference / optimizer -> sampler and step ->
checkpoint -> loop (sample G completions per prompt, score them, `num_iterations` updates).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, sampling
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
        batch = pipeline.to_global(host, mesh)
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), rl_step)
        with jax.set_mesh(mesh):
            out = sampling.generate(graphdef, state.params, batch, rng, scfg)
        tokens, mask = jax.device_get((out["tokens"], out["mask"]))
        ids = [t[m].tolist() for t, m in zip(tokens, mask)]
        texts = [tok.decode([i for i in x if i not in stop], skip_special_tokens=False) for x in ids]
        answers = [a for a in host["answer"] for _ in range(r.group_size)]
        tasks = [t for t in host["task"] for _ in range(r.group_size)]
        total, per_fn = rewards_lib.combine(reward_fns, texts, answers, ids, tasks, func_ids)
        rl_batch = _rollout_batch(out, {k: v for k, v in batch.items() if isinstance(v, jax.Array)}, jnp.asarray(total))
        if step_fn is None:
            step_fn = la_grpo.make_rl_step(graphdef, tx, rcfg, state_sharding=state_sh, ref_sharding=ref_sh,
                                           batch_sharding={k: v.sharding for k, v in rl_batch.items()})
        with jax.set_mesh(mesh):
            for _ in range(r.num_iterations):
                state, m = step_fn(state, ref_params, rl_batch)
        rl_step += 1
        last = {k: float(v) for k, v in jax.device_get(m).items()}
        metrics_lib.check_finite(last, rl_step)
        last.update({f"reward/{k}": float(v.mean()) for k, v in per_fn.items()})
        last["reward/total_std"] = float(total.std())
        last["completion_length"] = float(mask.sum(1).mean())
        accuracy = per_fn.get("accuracy")
        if accuracy is None:
            accuracy = np.array([rewards_lib.accuracy_reward(t, a) for t, a in zip(texts, answers)])
        last["train_accuracy"] = float(np.mean(accuracy))
        writer.write(rl_step, last)
        if rl_step % c.train.log_every == 0 or rl_step == r.steps:
            log.info("rl step %d/%d reward %.3f accuracy %.3f functional/completion %.2f kl %.4f anchor %.4f",
                     rl_step, r.steps, float(total.mean()), last["train_accuracy"], last["functional_per_completion"],
                     last["kl"], last["anchor_loss"])
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
