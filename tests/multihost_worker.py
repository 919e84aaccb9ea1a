"""One JAX process of a multi-host run on CPU, started by tests/test_multihost.py.

    python tests/multihost_worker.py --spec=SPEC.json --process_id=0

SPEC.json: {"num_processes": 2, "devices": 4, "coordinator": "127.0.0.1:PORT" (multi-process only),
"init": "env" | "config", "config": "sft_synthetic.py:module", "workdir": ..., "out": ...,
"overrides": {"train.steps": 3, ...}}.

The worker runs the real entry point (`atlas_jax.main.run_job`), which connects the processes
itself (`initialize_distributed`): from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment the test sets ("env"), or from the config fields
`coordinator_address`, `num_processes`, `process_id` the worker sets ("config"). It records, for
the test:
  out/records_p<i>.json   the uids of every host batch this process fed to `pipeline.to_global`;
  out/writes_p<i>.json    every file under the workdir this process opened for writing (an audit
                          hook: proves that process 1 writes no metrics or TensorBoard files);
  out/result_p<i>.json    what `run_job` returned on this process (the last metrics, eval results);
  out/rollouts_p<i>.json  LA-GRPO only: each rollout round's global completion tokens and global
                          reward array, as this process saw them;
  out/choices_p<i>.json   LA-GRPO with `rl.filter_groups` only: per rollout batch, the groups
                          `choose_groups` picked for the update and how many were uninformative;
  out/params.npz          process 0 only: the final parameters, gathered from every process.
One change to the job, for a like-with-like comparison with a one-process run: batches padded to
max_length (`data.pad_to_multiple=0`, set by the test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--process_id", type=int, default=0)
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    pid, nproc = args.process_id, spec["num_processes"]

    # Before any backend exists: CPU only, this process's share of the devices. The processes
    # connect inside run_job (config.distributed), not here.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    jax.config.update("jax_num_cpu_devices", spec["devices"])
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/atlas_jax/jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    workdir, out = os.path.abspath(spec["workdir"]), spec["out"]
    os.makedirs(out, exist_ok=True)
    writes = _watch_writes(workdir)

    from atlas_jax import checkpoint, multihost
    from atlas_jax import main as entry
    from atlas_jax.data import pipeline
    from atlas_jax.jobs import la_grpo as la_grpo_job

    records: list[list[str]] = []
    make_global = pipeline.to_global

    def recording_to_global(batch, mesh):
        records.append([str(u) for u in batch["uid"]])
        return make_global(batch, mesh)

    pipeline.to_global = recording_to_global

    rollouts: list[dict] = []
    make_rollout_batch = la_grpo_job._rollout_batch

    def recording_rollout_batch(sampled, prompt_batch, rewards_r):
        tokens, rewards = multihost.gather((sampled["tokens"], rewards_r))
        rollouts.append({"tokens": tokens.tolist(), "rewards": rewards.tolist()})
        return make_rollout_batch(sampled, prompt_batch, rewards_r)

    la_grpo_job._rollout_batch = recording_rollout_batch

    choices: list[dict] = []
    choose_groups = la_grpo_job.choose_groups

    def recording_choose_groups(informative_per_round, num_groups):
        groups, filled = choose_groups(informative_per_round, num_groups)
        choices.append({"informative": [f.tolist() for f in informative_per_round], "groups": groups.tolist(), "filled": filled})
        return groups, filled

    la_grpo_job.choose_groups = recording_choose_groups

    # -- the state of the last save is the run's final state (every job force-saves it at the end)
    saved = {}
    save = checkpoint.Checkpoints.save

    def remembering_save(self, step, state, *args, **kw):
        saved["step"], saved["params"] = int(step), state.params
        return save(self, step, state, *args, **kw)

    checkpoint.Checkpoints.save = remembering_save

    c = _config(spec["config"], spec["overrides"])
    if nproc > 1:
        c.distributed = True
        if spec["init"] == "config":
            c.coordinator_address, c.num_processes, c.process_id = spec["coordinator"], nproc, pid
    result = entry.run_job(c, workdir)
    assert jax.process_count() == nproc and jax.process_index() == pid
    assert jax.device_count() == nproc * spec["devices"], jax.devices()

    with open(os.path.join(out, f"result_p{pid}.json"), "w") as f:
        json.dump(result, f)
    if rollouts:
        with open(os.path.join(out, f"rollouts_p{pid}.json"), "w") as f:
            json.dump(rollouts, f)
    if choices:
        with open(os.path.join(out, f"choices_p{pid}.json"), "w") as f:
            json.dump(choices, f)
    with open(os.path.join(out, f"records_p{pid}.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(out, f"writes_p{pid}.json"), "w") as f:
        json.dump(sorted(writes), f)

    # Every process takes part in replicating the parameters (its shards are needed); process 0
    # writes them. One jitted copy for the whole tree: one compile, not one per leaf.
    params = saved["params"]
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = jax.jit(lambda t: t, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(params)
    if pid == 0:
        import numpy as np

        flat = jax.tree_util.tree_flatten_with_path(replicated)[0]
        host = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}
        np.savez(os.path.join(out, "params.npz"), __step__=np.int64(saved["step"]), **host)

    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("multihost_worker_done")


def _config(name: str, overrides: dict):
    """configs/<file>.py:<arg> with the test's overrides ('a.b' keys)."""
    import importlib.util

    file, _, arg = name.partition(":")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", file)
    spec = importlib.util.spec_from_file_location(file.removesuffix(".py"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg) if arg else mod.get_config()
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = tuple(value) if isinstance(value, list) else value
    return c


def _watch_writes(root: str) -> set[str]:
    """Paths under `root` that this process opens for writing from now on (relative to root)."""
    seen: set[str] = set()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, oflags = args
        writing = (isinstance(mode, str) and any(m in mode for m in "wax+")) or (
            isinstance(oflags, int) and oflags & write_flags
        )
        if writing:
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(root + os.sep):
                seen.add(os.path.relpath(full, root))

    sys.addaudithook(hook)
    return seen


if __name__ == "__main__":
    main()
