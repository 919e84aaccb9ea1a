"""Where the main job's time goes, and what its two run-time choices buy: seconds per SFT step, per
rollout round (the sampler) and per LA-GRPO update of `configs/atlas_synthetic.py`, each variant in
its own worker process, the workers taking turns so that load from other processes hits all alike.

    baseline         GLIBC_TUNABLES="" (glibc's allocator untouched), rl.anchor_share=True
    huge_pages       GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (what `atlas_jax.main` restarts with)
    no_anchor_share  rl.anchor_share=False (the main job's: no second backward pass per update)
    main_job         both

The SFT part trains the main job's SFT stage from its starting point (`--sft-steps` steps, no
evaluation, no checkpoint); the RL part runs its LA-GRPO stage from an SFT checkpoint
(`--sft-checkpoint`, e.g. the main job's WORKDIR/sft) for `--rl-steps` rollout batches. The first
step, round and update of each worker compile and are dropped. SFT steps run as the trainer runs
them (dispatched asynchronously, a wait for the device every `train.log_every` steps): seconds per
step is the time between the dispatches that follow two such waits, over the steps between them.
Rollout rounds and updates are timed to completion. Printed: each variant's medians over rounds
and its per-round ratio to the baseline of the same round (median, min-max).

    python bench/bench_recipe_stages.py --sft-checkpoint=/tmp/atlas/sft                  # ~20 min
    python bench/bench_recipe_stages.py --sft-checkpoint=/tmp/atlas/sft --rounds 3 --variants baseline,main_job

Run it alone on the machine; report `uptime` with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from compare_atlas import _recipe  # the main job's config (configs/atlas_synthetic.py), as its arms load it

VARIANTS = {
    "baseline": ("", True),
    "huge_pages": ("glibc.malloc.hugetlb=1", True),
    "no_anchor_share": ("", False),
    "main_job": ("glibc.malloc.hugetlb=1", False),
}  # name -> (GLIBC_TUNABLES, rl.anchor_share)


def _timed(make, calls: list, block: bool):
    """`make` (a step factory) wrapped so that each step it makes appends its call's time to `calls`:
    the time at the call (block=False: the loop's pace) or the call's duration to completion."""
    import jax

    def factory(*args, **kwargs):
        step = make(*args, **kwargs)

        class Timed:
            def __call__(self, *a):
                t = time.perf_counter()
                out = step(*a)
                if block:
                    jax.block_until_ready(out)
                calls.append(time.perf_counter() - t if block else t)
                return out

            def lower(self, *a):
                return step.lower(*a)

        return Timed()

    return factory


def worker(args) -> dict:
    import jax

    from atlas_jax import run_config, sampling
    from atlas_jax.jobs import la_grpo as rl_job, sft as sft_job
    from atlas_jax.train import la_grpo, sft

    anchor_share = VARIANTS[args.worker][1]
    base = _recipe("module")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = {"data.data_dir": os.path.join(tmp, "data"), "eval.num_per_task": 0, "checkpoint.every": 10**9}
        sft_calls: list = []
        sft.make_train_step = _timed(sft.make_train_step, sft_calls, block=False)
        c = run_config.stage(base, "sft", **data, **{"train.steps": args.sft_steps})
        run_config.validate(c, jax.device_count())
        sft_job.main(c, os.path.join(tmp, "sft"))
        # Steps are dispatched asynchronously and the loop waits for the device every log_every steps: the
        # dispatch of step k L + 1 follows the wait for step k L, so whole log periods time real steps.
        period = c.train.log_every
        last = (len(sft_calls) - 1) // period * period
        out["sft_step_s"] = (sft_calls[last] - sft_calls[period]) / (last - period)

        rounds: list = []
        updates: list = []
        generate = sampling.generate

        def timed_generate(*a, **k):
            t = time.perf_counter()
            result = jax.block_until_ready(generate(*a, **k))
            rounds.append(time.perf_counter() - t)
            return result

        sampling.generate = timed_generate
        la_grpo.make_rl_step = _timed(la_grpo.make_rl_step, updates, block=True)
        c = run_config.stage(base, "la_grpo", **data, **{"train.steps": args.rl_steps, "rl.anchor_share": anchor_share,
                                                          "checkpoint.init_from": args.sft_checkpoint})
        run_config.validate(c, jax.device_count())
        t = time.perf_counter()
        rl_job.main(c, os.path.join(tmp, "rl"))
        out["rl_stage_s"] = time.perf_counter() - t
        out["rollout_round_s"] = statistics.median(rounds[1:])
        out["update_s"] = statistics.median(updates[1:])
        out["rounds_per_update"] = len(rounds) / len(updates)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-checkpoint", required=True, help="an SFT checkpoint of the main job (WORKDIR/sft)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or names[0] != "baseline":
        raise SystemExit(f"--variants: expected 'baseline' first, then names among {list(VARIANTS)}; got {names}")
    runs: dict = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            env = {**os.environ, "GLIBC_TUNABLES": VARIANTS[name][0]}
            cmd = [sys.executable, __file__, "--worker", name, "--sft-checkpoint", args.sft_checkpoint,
                   "--sft-steps", str(args.sft_steps), "--rl-steps", str(args.rl_steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    keys = ("sft_step_s", "rollout_round_s", "update_s", "rl_stage_s")
    print(f"\n{args.rounds} rounds; {args.sft_steps} SFT steps, {args.rl_steps} rollout batches per worker; median (ratio to baseline: median, min-max)")
    print("| variant | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name in names:
        cells = []
        for k in keys:
            mine = [run[k] for run in runs[name]]
            ratios = [a[k] / b[k] for a, b in zip(runs[name], runs["baseline"])]
            cells.append(f"{statistics.median(mine):.3f}" + ("" if name == "baseline" else
                         f" ({statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f})"))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
