"""A stand-in training loop for tests/test_checkpoint.py, run as a subprocess so it can be killed.

    python tests/checkpoint_writer.py WORKDIR --size N [--save-every K] [--async-save]

Every step it builds the state `make_state(step, size)` (random, so it does not compress and a save
takes a while), calls `Checkpoints.save` with the data iterator at `data_iter(step)`, and prints
`saved <step>` / `step <step>` lines. With a SIGTERM it does what the trainer does: a forced save of
the current step, wait, print `stopped <step>`, exit 0.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from atlas_jax import checkpoint  # noqa: E402


def make_state(step: int, size: int) -> dict:
    """The train state at `step`: float32[size] random params, the step, a PRNG key."""
    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal(size, dtype=np.float32))},
        "step": jnp.int32(step),
        "rng": jax.random.fold_in(jax.random.key(0), step),
    }


def data_iter(step: int) -> grain.DatasetIterator:
    """A data iterator 4 * step elements in (a fresh one is at 0)."""
    it = iter(grain.MapDataset.range(10**6).to_iter_dataset())
    it.set_state({"next_index": step * 4})
    return it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--step-seconds", type=float, default=0.0)
    args = ap.parse_args()

    ckpt = checkpoint.Checkpoints(args.workdir, keep=3, save_every=args.save_every, async_save=args.async_save)
    config = {"size": args.size}
    for step in range(1, args.steps + 1):
        time.sleep(args.step_seconds)  # "training"
        if ckpt.save(step, make_state(step, args.size), data_iter(step), config):
            print(f"saved {step}", flush=True)
        print(f"step {step}", flush=True)
        if ckpt.reached_preemption(step):
            ckpt.save(step, make_state(step, args.size), data_iter(step), config, force=True)
            ckpt.close()
            print(f"stopped {step}", flush=True)
            sys.exit(0)
    ckpt.close()


if __name__ == "__main__":
    main()
