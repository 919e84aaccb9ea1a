"""Is the input pipeline ever the bottleneck of the quickstart? Grain examples/s vs SFT-step examples/s.

The quickstart (`configs/sft_synthetic.py`) is built exactly as `atlas_jax.jobs.sft` builds it, with
the real builders, in a temporary workdir: synthetic data (112 px images) written as ArrayRecord,
a BPE tokenizer trained on it, the tiny model, AdamW, the compiled sharded SFT step, and the Grain
pipeline (global batch 16, max_length 192, length buckets of 64). Then, in one process:

1. **Interleaved** (per `--workers` setting, `--rounds` rounds): a *pipeline round* pulls
   `--batches` batches (`next(it)` + `pipeline.to_global`) back to back, then a *step round* runs
   the compiled step on exactly those batches, blocking after each step. Before each pipeline round
   the batches the pipeline read ahead while the step ran are drained untimed, so the timed window
   measures production, not a pre-filled buffer (`drain`). Compilation (one per length bucket)
   and the first round are warm-up and are dropped.
2. **Overlapped** (`--overlap-rounds` rounds of `--overlap-steps` steps): the trainer loop's order
   (dispatch step k, then load and convert batch k + 1 while the step computes asynchronously,
   sync on the metrics every `log_every` steps), fed by the pipeline, alternating with the same
   loop fed from batches loaded beforehand. On a 2-core machine the data work and XLA share the
   cores, so loading can slow the loop even when the pipeline alone is faster than the step.

Printed: examples/s of the pipeline and of the step (median round and min-max), the ratio
pipeline / step (goal: >= 1), and the trainer-order loop's examples/s fed by the pipeline and fed
from batches loaded beforehand, and their ratio (goal: ~1: loading costs the loop nothing).

    python bench/bench_pipeline.py                       # worker_count 0 (threads) and 1; ~2-3 min
    python bench/bench_pipeline.py --workers 0,1,2       # also 2 worker processes; ~3-4 min
    python bench/bench_pipeline.py --workers 0 --rounds 6 --batches 8
    python bench/bench_pipeline.py --profile             # cProfile of the pipeline in one thread

Results depend on load from other processes: report `uptime` with them.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib.util
import io
import logging
import os
import pstats
import statistics
import tempfile
import time

import jax
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from atlas_jax import builders
from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import pipeline
from atlas_jax.train import optimizer, sft, train_state

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "sft_synthetic.py")


def quickstart_config():
    spec = importlib.util.spec_from_file_location("sft_synthetic", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("module")


@dataclasses.dataclass
class Run:
    """Everything the SFT job builds before its loop."""

    c: object
    mesh: object
    tok: object
    model_cfg: object
    source: object
    num_params: int
    state: object = None
    step_fn: object = None


def build(workdir: str) -> Run:
    """The quickstart's mesh, data, tokenizer, model, optimizer and step, as `jobs.sft.main` builds them."""
    c = quickstart_config()
    mesh = builders.make_mesh(c)
    builders.build_data(c, workdir)
    tok = builders.make_tokenizer(c, workdir)
    model = builders.make_model(c, tok, tokenizer_lib.RunTokens.of(tok, c.model.functional_tokens), mesh)
    tx, lr_schedule = optimizer.from_config(nnx.state(model), c.optim, total_steps=c.train.steps)
    graphdef, run_state, state_sh = train_state.create(model, tx, mesh)
    run = Run(c, mesh, tok, model.cfg, builders.load_split(c, workdir, "train"), builders.num_params(model), state=run_state)
    del model
    # The step's batch shardings depend only on the mesh and the keys: take them from one batch.
    batch_sh = {k: v.sharding for k, v in load(iter(make_dataset(run, 0)), mesh).items()}
    run.step_fn = sft.make_train_step(
        graphdef, tx, state_sharding=state_sh, batch_sharding=batch_sh, grad_accum=c.optim.grad_accum,
        lr_schedule=lr_schedule,
    )
    return run


def make_dataset(run: Run, workers: int, **overrides) -> pipeline.PipelineDataset:
    cfg = builders.make_pipeline_config(run.c, run.model_cfg, fmt="sft")
    cfg = dataclasses.replace(cfg, worker_count=workers, **overrides)
    return pipeline.make_dataset(run.source, run.tok, tokenizer_lib.RunTokens.of(run.tok), cfg, run.model_cfg)


def load(it, mesh) -> dict:
    """The device arrays of one global batch, as the trainer loop gets them (host metadata such as
    answers stays behind)."""
    return {k: v for k, v in pipeline.to_global(next(it), mesh).items() if isinstance(v, jax.Array)}


class Stepper:
    """Runs the compiled step, compiling each length bucket untimed the first time it appears."""

    def __init__(self, run: Run):
        self.run, self.state, self.shapes = run, run.state, set()

    def compile_for(self, batch: dict) -> None:
        shape = batch["input_ids"].shape
        if shape not in self.shapes:
            self.shapes.add(shape)
            jax.block_until_ready((self(batch), self.state))  # nothing left running into a timed window

    def __call__(self, batch: dict):
        with jax.set_mesh(self.run.mesh):
            self.state, m = self.run.step_fn(self.state, batch)
        return m

    def timed(self, batch: dict) -> float:
        self.compile_for(batch)
        t = time.perf_counter()
        jax.block_until_ready((self(batch), self.state))
        return time.perf_counter() - t


def drain(it, mesh, *, workers: int, wait_s: float = 0.02, max_batches: int = 64) -> None:
    """Consumes, untimed, what the pipeline read ahead while nothing was pulling, so that batches
    then arrive at the rate they are produced: at least as many batches as the read-ahead holds
    (threads: one batch of prefetched examples; worker processes: about 4 batches each, as seen
    with grain 0.2.18's `mp_prefetch`), then until one batch takes `wait_s` to come."""
    for i in range(max_batches):
        t = time.perf_counter()
        load(it, mesh)
        if i >= 5 * workers and time.perf_counter() - t > wait_s:
            return


def interleaved(run: Run, stepper: Stepper, it, *, workers: int, rounds: int, batches: int) -> tuple[list, list]:
    """Examples/s of each pipeline round and of each step round (the first round is warm-up)."""
    bs = run.c.data.batch_size
    pipe, step = [], []
    for r in range(rounds + 1):
        drain(it, run.mesh, workers=workers)
        t = time.perf_counter()
        got = [load(it, run.mesh) for _ in range(batches)]
        t_pipe = time.perf_counter() - t
        for b in got:  # compile outside the timed window
            stepper.compile_for(b)
        t_step = sum(stepper.timed(b) for b in got)
        if r > 0:
            pipe.append(batches * bs / t_pipe)
            step.append(batches * bs / t_step)
    return pipe, step


def loop(run: Run, stepper: Stepper, batches, *, steps: int) -> float:
    """Examples/s of the trainer loop's order: dispatch step k, then get batch k + 1 while it runs
    (`batches` is a callable), syncing on the metrics every `log_every` steps as `jobs.sft` does."""
    bs, every = run.c.data.batch_size, run.c.train.log_every
    batch = batches()
    stepper.compile_for(batch)
    t = time.perf_counter()
    for k in range(steps):
        m = stepper(batch)
        batch = batches()  # the step computes asynchronously meanwhile
        if (k + 1) % every == 0:
            jax.device_get(m)
    jax.block_until_ready((m, stepper.state))
    return steps * bs / (time.perf_counter() - t)


def overlapped(run: Run, stepper: Stepper, it, *, workers: int, rounds: int, steps: int) -> tuple[list, list]:
    """Examples/s of the trainer-order loop fed by the pipeline, and of the same loop fed from
    batches loaded beforehand (the step alone in the same order), alternating round by round."""
    kept = [load(it, run.mesh) for _ in range(steps + 1)]
    for b in kept:
        stepper.compile_for(b)
    cycle = iter(kept * (rounds + 1))
    with_data, without = [], []
    for _ in range(rounds):
        drain(it, run.mesh, workers=workers)
        with_data.append(loop(run, stepper, lambda: load(it, run.mesh), steps=steps))
        without.append(loop(run, stepper, lambda: next(cycle), steps=steps))
    return with_data, without


def profile(run: Run, batches: int) -> str:
    """cProfile of the pipeline with every stage in the main thread (read_threads=0), so the
    per-example work (decode, preprocess, tokenize, collate) shows up, not just lock waits."""
    it = iter(make_dataset(run, 0, read_threads=0))
    load(it, run.mesh)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(batches):
        load(it, run.mesh)
    prof.disable()
    rate = batches * run.c.data.batch_size / (time.perf_counter() - t)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    return f"pipeline alone, one thread, under cProfile: {rate:.1f} examples/s\n{out.getvalue()}"


def summary(xs: list) -> str:
    return f"{statistics.median(xs):7.1f} ({min(xs):6.1f}-{max(xs):6.1f})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,1", help="comma-separated pipeline worker_count values (0 = threads)")
    p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds per setting (plus one warm-up)")
    p.add_argument("--batches", type=int, default=4, help="batches per round")
    p.add_argument("--overlap-rounds", type=int, default=3, help="rounds of the trainer-order loop, with and without the pipeline")
    p.add_argument("--overlap-steps", type=int, default=4, help="steps per trainer-order round")
    p.add_argument("--workdir", default="", help="reuse a workdir (data + tokenizer); default: a temporary one")
    p.add_argument("--profile", action="store_true", help="only cProfile the pipeline in one thread (top 25 by own time)")
    a = p.parse_args()
    # Grain's worker processes read absl flags; the real entry point parses them via `app.run`.
    flags.FLAGS.mark_as_parsed()

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("atlas_jax").setLevel(logging.WARNING)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = a.workdir or tmp
        t = time.perf_counter()
        run = build(workdir)
        print(f"setup (data, tokenizer, model, step) {time.perf_counter() - t:.1f}s; {run.num_params / 1e6:.2f}M params, "
              f"{len(run.source)} train records, {jax.device_count()} device(s), {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}")
        if a.profile:
            print(profile(run, a.batches * a.rounds))
            return
        stepper = Stepper(run)
        rows = []
        for w in [int(x) for x in a.workers.split(",")]:
            t = time.perf_counter()
            it = iter(make_dataset(run, w))
            try:
                pipe, step = interleaved(run, stepper, it, workers=w, rounds=a.rounds, batches=a.batches)
                fed, alone = overlapped(run, stepper, it, workers=w, rounds=a.overlap_rounds, steps=a.overlap_steps)
            finally:
                if w:
                    it.close()
            rows.append((w, pipe, step, fed, alone))
            print(f"worker_count={w}: {time.perf_counter() - t:.1f}s, buckets compiled {sorted(s[1] for s in stepper.shapes)}")

    d = run.c.data
    print(f"\nexamples/s, batch {d.batch_size}, max_length {d.max_length}, {d.image_size} px; median round (min-max) over {a.rounds} rounds of {a.batches} batches")
    print("| workers | pipeline ex/s | step ex/s | pipeline / step | loop fed by pipeline ex/s | loop, batches preloaded ex/s | fed / preloaded |")
    print("|---|---|---|---|---|---|---|")
    for w, pipe, step, fed, alone in rows:
        ratio = statistics.median(p / s for p, s in zip(pipe, step))
        name = "0 (threads)" if w == 0 else str(w)
        print(f"| {name} | {summary(pipe)} | {summary(step)} | {ratio:5.2f} | {summary(fed)} | {summary(alone)} | "
              f"{sum(fed) / sum(alone):5.2f} |")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
