"""A run's optional logging: Weights & Biases (offline mode) gets the scalars metrics.jsonl gets,
and `train.profile_steps` leaves a `jax.profiler` trace of those steps in WORKDIR/profile; the
command line starts on huge pages (`main.HUGE_PAGES_TUNABLE`) unless the user chose the allocator."""

import glob
import json
import os
import subprocess
import sys

import pytest

from atlas_jax import main as entry, run_config
from atlas_jax.model.config import ConfigError
from test_sft_job import _config


def test_profile_steps_are_checked():
    for bad in ((3, 3), (0, 2), (1, 2, 3)):
        with pytest.raises(ConfigError, match="train.profile_steps"):
            run_config.validate(_config(**{"train.profile_steps": bad}), 8, paths=False)


def test_three_step_run_logs_to_wandb_offline_and_traces_its_profiled_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the optional [wandb] extra
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path / "run")
    c = _config(**{"data.data_dir": str(tmp_path / "data"), "train.steps": 3, "checkpoint.every": 3,
                   "train.wandb_project": "atlas-test", "train.profile_steps": (2, 4)})
    entry.run_job(c, workdir)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    assert sorted(rows) == [1, 2, 3]
    (run_dir,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    with open(os.path.join(workdir, "wandb_run_id")) as f:
        assert run_dir.endswith(f.read())
    # The offline run's transaction log (protobuf records, each value as JSON; wandb ships no
    # reader for it) holds every step's scalars.
    (transactions,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    with open(transactions, "rb") as f:
        log_bytes = f.read()
    for step, row in rows.items():
        for key in ("loss", "grad_norm", "perf/tokens_per_s"):
            assert json.dumps(row[key]).encode() in log_bytes, (step, key)

    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0



_REPORT_ALLOCATOR = ("import os, sys; from atlas_jax import main; main._restart_with_huge_pages(); "
                     "print(repr(os.environ.get('GLIBC_TUNABLES')), os.getpid(), sys.flags.utf8_mode)")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables are a Linux thing")
@pytest.mark.parametrize("preset, expected", [(None, "'glibc.malloc.hugetlb=1'"), ("", "''"), ("glibc.malloc.arena_max=2", "'glibc.malloc.arena_max=2'")])
def test_the_command_line_restarts_itself_once_on_huge_pages_unless_the_user_set_the_allocator(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if preset is not None:
        env["GLIBC_TUNABLES"] = preset
    # -X utf8: the interpreter's own options survive the restart; the process id is the same one.
    proc = subprocess.Popen([sys.executable, "-X", "utf8", "-c", _REPORT_ALLOCATOR], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.split() == [expected, str(proc.pid), "1"]
