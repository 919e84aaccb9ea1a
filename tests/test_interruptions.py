"""What a run leaves after it was stopped or its files were damaged: SIGTERM during start-up exits
with the preempted status and saves nothing, replayed steps are logged once, a damaged tokenizer or
data file stops the command with one line naming the file."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from atlas_jax import builders, main as entry, metrics
from atlas_jax.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from test_sft_job import _config  # noqa: E402

ROOT = Path(__file__).parent.parent
TINY = ["--config.data.synthetic_config=tiny", "--config.data.num_per_task=1", "--config.data.batch_size=8",
        "--config.train.steps=2", "--config.eval.num_per_task=0", "--config.mesh=(1,1,1)"]


def _start_cli(workdir: Path, *flags: str) -> subprocess.Popen:
    """The SFT command as a user types it, on one CPU device (not the test session's 8)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "atlas_jax.main", "--config=configs/sft_synthetic.py", f"--workdir={workdir}", *TINY, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tensorboard_purge_steps(logdir: Path) -> list[int]:
    """The steps of the SessionLog.START events (TensorBoard hides earlier events at or after them),
    read from the TFRecord framing: u64 length, u32 crc, event, u32 crc."""
    steps = []
    for path in sorted(logdir.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i: i + 8])
            event = event_pb2.Event.FromString(data[i + 12: i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps.append(event.step)
    return steps


def test_steps_logged_after_the_restored_checkpoint_are_logged_once(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by the crash
    time.sleep(1.1)  # an event file is named by the second it was opened in: a real restart takes longer
    # The run resumes from its checkpoint of step 2 and trains steps 3 and 4 again.
    writer = metrics.MetricsWriter(str(tmp_path), start_step=2)
    for step in (3, 4):
        writer.write(step, {"loss": 10.0 * step})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}, {"step": 4, "loss": 40.0}]
    assert _tensorboard_purge_steps(tmp_path / "tensorboard") == [1, 3]


def test_a_damaged_run_tokenizer_is_an_error_naming_the_file(tmp_path):
    c = _config(**{"data.data_dir": str(tmp_path / "data"), "data.num_per_task": 1})
    workdir = tmp_path / "run"
    builders.build_data(c, str(workdir))
    tok = builders.make_tokenizer(c, str(workdir))
    saved = workdir / "tokenizer" / "tokenizer.json"
    assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer"]  # written aside, then renamed
    assert len(builders.make_tokenizer(c, str(workdir))) == len(tok)  # a resumed run loads the same one
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{saved} is unreadable .*copy {saved.parent} back from a backup"):
        builders.make_tokenizer(c, str(workdir))


def test_sigterm_during_start_up_exits_preempted_with_nothing_saved(tmp_path):
    proc = _start_cli(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}")
    try:
        for line in proc.stderr:  # "HH:MM:SS mesh {...}": the job started, its SIGTERM handler is set
            if " mesh " in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == entry.PREEMPTED == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("preempted: stopped by SIGTERM at step 0: run the same command again")
    run = tmp_path / "run"
    assert list((run / "checkpoints").iterdir()) == [] and not (run / "metrics.jsonl").exists()
    assert json.loads((run / "tokenizer" / "tokenizer.json").read_text())  # start-up finished what it wrote


def test_a_truncated_data_file_is_one_line_and_status_2(tmp_path):
    builders.build_data(_config(**{"data.data_dir": str(tmp_path / "data"), "data.num_per_task": 1}), str(tmp_path))  # as TINY
    (path,) = (tmp_path / "data").rglob("atlas_synthetic-train.array_record-*")
    dataset_dir = path.parent
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])
    proc = _start_cli(tmp_path / "run", f"--config.data.data_dir={tmp_path / 'data'}")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == entry.USAGE_ERROR, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {path}: missing, truncated or corrupted") and f"delete {dataset_dir}" in line
    assert "Traceback" not in err
