"""Supervised fine-tuning on trajectories with functional tokens.

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft

Reads top to bottom: mesh -> data -> model / optimizer -> shard -> step -> checkpoint -> loop.
A run resumes from the newest complete checkpoint in its workdir, with the data iterator at
the same position, so a resumed run continues the same loss curve.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, multihost, sharding as shd
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import pipeline
from atlas_jax.jobs import evaluate
from atlas_jax.train import optimizer, sft, train_state

log = logging.getLogger("atlas_jax")


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    """Trains for `c.train.steps` steps; returns the last step's metrics. Stopped by SIGTERM, it
    saves and raises `checkpoint.Preempted`."""
    # Checkpoints first: a SIGTERM during the minutes of start-up is caught, and honoured before the loop.
    with checkpoint.Checkpoints(workdir, keep=c.checkpoint.keep, save_every=c.checkpoint.every, async_save=c.checkpoint.async_save) as ckpt:
        return _train(c, workdir, ckpt)


def _train(c: mlc.ConfigDict, workdir: str, ckpt: checkpoint.Checkpoints) -> dict:
    # ------------------------------------------------------------------ mesh
    mesh = builders.make_mesh(c)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ data
    builders.build_data(c, workdir)
    tok = builders.make_tokenizer(c, workdir)
    tokens = tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens)

    # ------------------------------------------------------------------ model / optimizer
    model = builders.make_model(c, tok, tokens, mesh)
    log.info("parameters:\n%s", shd.describe(nnx.state(model)))
    train = builders.trainable(c)
    tx, lr_schedule = optimizer.from_config(nnx.state(model), c.optim, total_steps=c.train.steps, train=train)
    graphdef, state, state_sh = train_state.create(model, tx, mesh)
    model_cfg = model.cfg
    policy = builders.Policy(tok, tokens, model_cfg, graphdef, state.params)  # evaluated with each step's params
    n_params = builders.num_params(model)
    del model

    train_ds = pipeline.make_dataset(
        builders.load_split(c, workdir, "train"), tok, tokens, builders.make_pipeline_config(c, model_cfg, fmt="sft"), model_cfg
    )
    data_it = iter(train_ds)

    # ------------------------------------------------------------------ resume
    start = ckpt.latest_step()
    if start is not None:
        state, _ = ckpt.restore(start, checkpoint.abstract(state), data_it)
        log.info("resumed from step %d in %s", start, workdir)
    elif c.checkpoint.init_from:
        state = state._replace(params=checkpoint.init_from(c.checkpoint.init_from, checkpoint.abstract(state.params)))
        log.info("initialised parameters from %s", c.checkpoint.init_from)
    builders.save_run_config(c, workdir)

    # ------------------------------------------------------------------ step
    host_batch = next(data_it)
    batch = _device(pipeline.to_global(host_batch, mesh))
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step_fn = sft.make_train_step(
        graphdef, tx, state_sharding=state_sh, batch_sharding=batch_sh, grad_accum=c.optim.grad_accum,
        lr_schedule=lr_schedule, train=train,
    )
    # Batches of another padded length compile their own program, so the loop calls the jitted
    # step; this compile is the one its first call reuses (JAX caches the executable).
    with jax.set_mesh(mesh):
        mem = step_fn.lower(state, batch).compile().memory_analysis()
    if mem is not None:
        log.info("compiled step memory: %s", mem)

    # ------------------------------------------------------------------ loop
    step = int(jax.device_get(state.step))
    if ckpt.reached_preemption(step):  # SIGTERM during start-up: nothing trained, nothing to save
        raise checkpoint.Preempted(step, workdir)
    writer = metrics_lib.MetricsWriter(workdir, start_step=step, wandb_project=c.train.wandb_project, run_config=c.to_dict())
    profiler = metrics_lib.StepProfiler(workdir, tuple(c.train.profile_steps))
    flops = metrics_lib.train_flops_per_token(n_params, model_cfg.text.num_layers, model_cfg.text.hidden_size, c.data.max_length)
    progress = metrics_lib.Progress(c.train.steps, flops_per_token=flops, every=c.train.log_every)
    last: dict = {}
    preempted = False
    while step < c.train.steps:
        profiler.before(step + 1)
        with jax.set_mesh(mesh):
            state, m = step_fn(state, batch)
        step += 1
        profiler.after(step, m)
        if step % c.train.log_every == 0 or step == c.train.steps:  # the only host syncs of the loop
            last = {k: float(v) for k, v in jax.device_get(m).items()}
            metrics_lib.check_finite(last, step)
            last["data/skipped_records"] = float(multihost.sum_over_hosts(data_it.num_skipped))
        perf = progress.update(step, last, _count_tokens(batch["attention_mask"]))
        if perf:
            writer.write(step, {**last, **perf})
        ckpt.save(step, state, data_it, c)
        if c.eval.every and step % c.eval.every == 0 and step < c.train.steps:
            evaluate.evaluate_and_log(writer, step, policy.with_params(state.params), c, workdir, mesh, tag=f"sft_step{step}")
        if (preempted := ckpt.reached_preemption(step)) or step == c.train.stop_at:
            log.warning("stopping at step %d (%s): saving", step, "preempted" if preempted else "train.stop_at")
            break
        if step < c.train.steps:
            host_batch = next(data_it)
            batch = _device(pipeline.to_global(host_batch, mesh))

    # ------------------------------------------------------------------ final save, evaluation
    profiler.close()
    ckpt.save(step, state, data_it, c, force=True)
    last.update(evaluate.finish_training(writer, step, policy.with_params(state.params), c, workdir, mesh,
                                         stage="sft", preempted=preempted))
    return last


@jax.jit
def _count_tokens(attention_mask: jax.Array) -> jax.Array:
    """The global batch's real (non-padding) tokens, on device: throughput counts every host's."""
    return jnp.sum(attention_mask, dtype=jnp.int32)


def _device(batch: dict) -> dict:
    """The device arrays of a global batch (host metadata such as answers stays behind)."""
    return {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
