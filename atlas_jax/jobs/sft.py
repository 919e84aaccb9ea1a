"""Supervised fine-tuning on trajectories with functional tokens.

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft

Reads top to bottom: mesh -> data -> model / optimizer -> shard -> step -> checkpoint -> loop.
A run resumes from the newest complete checkpoint in its workdir, with the data iterator at
the same position, so a resumed run continues the same loss curve.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import nnx

from atlas_jax import builders, checkpoint, metrics as metrics_lib, multihost, sharding as shd
from atlas_jax.data import pipeline
from atlas_jax.jobs import evaluate
from atlas_jax.train import optimizer, sft, train_state

log = logging.getLogger("atlas_jax")


def main(c: mlc.ConfigDict, workdir: str) -> dict:
    """Trains for `c.train.steps` steps; returns the last step's metrics."""
    # ------------------------------------------------------------------ mesh
    mesh = builders.mesh(c)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ------------------------------------------------------------------ data
    builders.build_data(c, workdir)
    tok = builders.tokenizer(c, workdir)

    # ------------------------------------------------------------------ model / optimizer
    model = builders.model(c, tok, mesh)
    log.info("parameters:\n%s", shd.describe(nnx.state(model)))
    tx_kw = dict(lr=c.optim.lr, warmup_steps=c.optim.warmup_steps, total_steps=c.train.steps)
    frozen = ("vision",) if c.optim.freeze_vision else ()
    tx = optimizer.make_optimizer(
        nnx.state(model), weight_decay=c.optim.weight_decay, b1=c.optim.b1, b2=c.optim.b2,
        clip_norm=c.optim.clip_norm, frozen=frozen, **tx_kw,
    )
    graphdef, state, state_sh = train_state.create(model, tx, mesh, seed=c.seed)
    model_cfg = model.cfg
    n_params = builders.num_params(model)
    del model

    train_ds = pipeline.make_dataset(
        builders.source(c, workdir, "train"), tok, builders.pipeline_config(c, model_cfg, fmt="sft"), model_cfg
    )
    data_it = iter(train_ds)

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = checkpoint.Checkpointer(workdir, keep=c.checkpoint.keep, save_every=c.checkpoint.every, async_save=c.checkpoint.async_save)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(start, train_state.abstract_state(state, state_sh))
        if data_state is not None:
            pipeline.restore(data_it, data_state)
        log.info("resumed from step %d in %s", start, workdir)
    elif c.checkpoint.init_from:
        params = checkpoint.init_from(c.checkpoint.init_from, jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.params, state_sh.params))
        state = state._replace(params=params)
        log.info("initialised parameters from %s", c.checkpoint.init_from)
    preempted = checkpoint.install_sigterm_handler()
    _save_config(c, workdir)

    # ------------------------------------------------------------------ step
    host_batch = next(data_it)
    batch = _device(pipeline.to_global(host_batch, mesh))
    batch_sh = {k: v.sharding for k, v in batch.items()}
    step_fn = sft.make_train_step(
        graphdef, tx, state_sharding=state_sh, batch_sharding=batch_sh, grad_accum=c.optim.grad_accum,
        lr_schedule=optimizer.schedule(**tx_kw),
    )
    with jax.set_mesh(mesh):
        mem = step_fn.lower(state, batch).compile().memory_analysis()
    if mem is not None:
        log.info("compiled step memory: %s", mem)

    # ------------------------------------------------------------------ loop
    writer = metrics_lib.MetricsWriter(workdir)
    flops = metrics_lib.train_flops_per_token(n_params, model_cfg.text.num_layers, model_cfg.text.hidden_size, c.data.max_length)
    progress = metrics_lib.Progress(c.train.steps, flops_per_token=flops, every=c.train.log_every)
    step = int(jax.device_get(state.step))
    last: dict = {}
    while step < c.train.steps:
        with jax.set_mesh(mesh):
            state, m = step_fn(state, batch)
        step += 1
        if step % c.train.log_every == 0 or step == c.train.steps:  # the only host syncs of the loop
            last = {k: float(v) for k, v in jax.device_get(m).items()}
            metrics_lib.check_finite(last, step)
            last["data/skipped_records"] = float(multihost.sum_over_hosts(data_it.num_skipped))
        perf = progress.update(step, last, _count_tokens(batch["attention_mask"]))
        if perf:
            writer.write(step, {**last, **perf})
        ckpt.save(step, state, data_state=pipeline.pipeline_state(data_it), config=c.to_dict())
        if preempted.should_stop() or step == c.train.stop_at:
            log.warning("stopping at step %d (%s): saving", step, "preempted" if preempted.requested else "train.stop_at")
            break
        if step < c.train.steps:
            host_batch = next(data_it)
            batch = _device(pipeline.to_global(host_batch, mesh))

    # ------------------------------------------------------------------ final save, evaluation
    ckpt.save(step, state, data_state=pipeline.pipeline_state(data_it), config=c.to_dict(), force=True)
    ckpt.close()
    preempted.uninstall()
    if step >= c.train.steps and c.eval.num_per_task > 0:
        results = evaluate.evaluate(graphdef, state.params, tok, c, workdir, mesh, tag=f"sft_step{step}")
        writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        last.update({f"eval/{k}": v for k, v in results.items()})
    writer.close()
    return last


@jax.jit
def _count_tokens(attention_mask: jax.Array) -> jax.Array:
    """The global batch's real (non-padding) tokens, on device: throughput counts every host's."""
    return jnp.sum(attention_mask, dtype=jnp.int32)


def _device(batch: dict) -> dict:
    """The device arrays of a global batch (host metadata such as answers stays behind)."""
    return {k: v for k, v in batch.items() if isinstance(v, jax.Array)}


def _save_config(c: mlc.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(c.to_dict(), f, indent=2, default=str)
