"""The one entry point for every job: SFT, LA-GRPO, evaluation, and the whole ATLAS recipe.

    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/atlas_sft
    python -m atlas_jax.main --config=configs/sft_synthetic.py --workdir=/tmp/x --config.optim.lr=1e-3
    atlas-jax --config=configs/la_grpo_synthetic.py --workdir=/tmp/atlas_rl      # console script

The same command runs on every host of a pod (`--config.distributed=True`): JAX's
multi-controller runtime connects them, and only process 0 logs and writes summaries.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/ (optionally file.py:arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and the tokenizer.")
flags.DEFINE_bool("verbose", False, "Show the traceback of a rejected config, record or checkpoint.")
FLAGS = flags.FLAGS
USAGE_ERROR = 2  # exit status of a run stopped by bad input (a config field, a record, a checkpoint)
# Exit status of a run stopped by SIGTERM after saving (128 + 15, what a shell reports for a process
# SIGTERM ended): not 0, which a scheduler reads as finished; the same command resumes it.
PREEMPTED = 143
# glibc (2.35+) backs large malloc'd blocks with transparent huge pages under this tunable, read only
# at process start. XLA:CPU allocates a step's buffers afresh every step, and on 4 KiB pages each step
# faults its working set in again: the main job's SFT step and LA-GRPO update take ~13% less time with
# it (bench/RESULTS.md, "The main job's run time"). On TPU / GPU hosts it concerns host memory only;
# other C libraries ignore it.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"

JOB_MODULES = {"sft": "atlas_jax.jobs.sft", "la_grpo": "atlas_jax.jobs.la_grpo", "eval": "atlas_jax.jobs.evaluate", "pipeline": "atlas_jax.jobs.recipe",
               "benchmark": "atlas_jax.jobs.benchmark", "perceive": "atlas_jax.jobs.perceive"}


def setup_logging(level: str) -> None:
    import jax

    # Only process 0 speaks below WARNING: one log per run, not one per host.
    logging.getLogger("atlas_jax").setLevel(level if jax.process_index() == 0 else "WARNING")


def _console_logging() -> None:
    """Command-line runs: our messages as short lines on stderr, libraries' INFO chatter off."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax, grain, tfds log through absl at INFO
    logger = logging.getLogger("atlas_jax")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False


def initialize_distributed(c) -> None:
    """jax.distributed.initialize() from the config, else the JAX_* environment, else the
    cluster's auto-detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes)."""
    import jax

    addr = c.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = c.get("num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None
    pid = c.get("process_id", -1)
    pid = pid if pid >= 0 else (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)


def run_job(c, workdir: str):
    """Validates the config, then runs its job. Usable from Python and notebooks."""
    import jax

    from atlas_jax import run_config

    if c.get("distributed", False):
        initialize_distributed(c)
    run_config.validate(c, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    setup_logging(c.get("log_level", "INFO"))
    job = importlib.import_module(JOB_MODULES[c.job])
    return job.main(c, workdir)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input a person can fix (each names the field, record or file)."""
    from atlas_jax import checkpoint, hf_checkpoint
    from atlas_jax.data.sample import BadRecordError
    from atlas_jax.data.tfds_builder import StoredDatasetError
    from atlas_jax.model.config import ConfigError

    return ConfigError, BadRecordError, StoredDatasetError, checkpoint.CheckpointError, hf_checkpoint.CheckpointError


def _reject(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad `--config.FIELD=VALUE` reported as one line (ml_collections
    raises AttributeError / KeyError / ValueError with the field and a 'did you mean' inside)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _reject(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if "--verbose" in argv:
            raise
        _reject(_unknown_override(argv) or f"bad config override: {e}")


def _unknown_override(argv: list[str]) -> str | None:
    """The message naming the first `--config.KEY=...` whose KEY the loaded config lacks, if any."""
    from atlas_jax import run_config
    from atlas_jax.model.config import ConfigError

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(spec) if spec else None
    except Exception:  # noqa: BLE001 - the config file itself is broken: absl's own message says how
        return None
    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            try:
                run_config.lookup(config, key, where="--config")
            except ConfigError as e:
                return str(e)
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE overrides")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    # Compiled programs are cached across runs (CPU included): a resumed or repeated run starts fast.
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/atlas_jax/jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    _console_logging()
    from atlas_jax.checkpoint import Preempted

    try:
        run_job(FLAGS.config, FLAGS.workdir)
    except _user_errors() as e:
        if FLAGS.verbose:
            raise
        _reject(str(e))
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED)


def _restart_with_huge_pages() -> None:
    """Re-executes this very command (same interpreter, options and arguments, same process id)
    with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 when the variable is unset on Linux. Setting
    GLIBC_TUNABLES to anything, even empty, keeps the run in the allocator it has."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE})


def run():
    """Console-script entry point (`atlas-jax`)."""
    _restart_with_huge_pages()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
