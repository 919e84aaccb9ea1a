"""atlas_jax.sweep: points and their workdirs, pod launch commands that ml_collections and
launch/tpu_run.sh read back, a local two-point run with its summary, and bad sweeps rejected."""

import itertools
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from atlas_jax import sweep
from atlas_jax.model.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(REPO, "configs", "sft_synthetic.py")


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "atlas_jax.sweep", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _parse_config(job_args):
    """The config that `atlas_jax.main` would get from these flags (ml_collections' own parsing)."""
    fv = flags.FlagValues()
    argv = ["prog", *job_args]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    return fv.config, fv.workdir


def _tiny_config_file(tmp_path, sweep_body, name="tiny_sweep.py"):
    """A config built on configs/sft_synthetic.py, shrunk to a seconds-long CPU run."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        import importlib.util

        _spec = importlib.util.spec_from_file_location("_sft_synthetic", {SFT!r})
        _sft = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_sft)


        def get_config(arg="module"):
            c = _sft.get_config(arg)
            c.data.synthetic_config = "tiny"
            c.data.num_per_task = 2
            c.data.batch_size = 8
            c.data.data_dir = {str(tmp_path / "data")!r}
            c.train.steps = 2
            c.train.log_every = 1
            c.optim.warmup_steps = 1
            c.checkpoint.async_save = False
            c.eval.num_per_task = 0
            return c


        def sweep():
        """) + textwrap.indent(textwrap.dedent(sweep_body), "    "))
    return str(path)


def _load(path, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg) if arg else mod.get_config()
    c.lock()  # as config_flags hands it over: unknown keys cannot be added
    return c


def test_list_mode_prints_every_point_of_the_config_sweep(tmp_path):
    r = _cli("--config=configs/sft_synthetic.py", f"--workdir={tmp_path}")
    assert r.returncode == 0, r.stderr
    rows = [line.split(" | ") for line in r.stdout.strip().splitlines()[2:]]
    expected = [(lr, mode) for lr, mode in itertools.product(("0.001", "0.003"), ("module", "vocab"))]
    assert len(rows) == len(expected)
    for row, (lr, mode) in zip(rows, expected):
        name = f"lr={lr},mode={mode}"
        assert row[0] == f"| {name}" and row[1] == os.path.join(str(tmp_path), name)
        assert row[2] == f"optim.lr={lr} model.visual_ops.mode={mode} |"
    assert not any(tmp_path.iterdir())  # listing runs nothing


def test_pod_mode_commands_parse_back_to_each_point(tmp_path):
    root = "gs://bucket/sweeps/lr"
    r = _cli("--config=configs/sft_synthetic.py:answer_only", f"--workdir={root}", "--mode=pod",
             "--config.train.steps=7", "--config.optim.lr=0.5", "--config.mesh=(2, 2, 2)",
             "--launcher_flags=--tpu=my-pod --zone=us-west4-a --project=my-proj")
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    points = list(sweep.load_sweep(SFT))
    assert len(commands) == len(points) == 4
    workdirs = set()
    for argv, point in zip(commands, points):
        sep = argv.index("--")
        assert argv[:sep] == ["launch/tpu_run.sh", "--tpu=my-pod", "--zone=us-west4-a", "--project=my-proj"]
        c, workdir = _parse_config(argv[sep + 1:])
        workdirs.add(workdir)
        assert workdir.startswith(root + "/")
        assert c.optim.lr == point["optim.lr"]  # the point wins over the command line's base lr
        assert c.model.visual_ops.mode == point["model.visual_ops.mode"]
        assert c.train.steps == 7 and tuple(c.mesh) == (2, 2, 2)
        assert c.data.sft_target == "answer_only"  # the config argument is passed through

        # The launcher takes the command as printed and forwards every job flag to the workers.
        dry = subprocess.run(["bash", os.path.join(REPO, argv[0]), *argv[1:sep], "--dry-run", *argv[sep:]],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert dry.returncode == 0, dry.stderr
        remote = shlex.split(dry.stdout)[-1]
        job = shlex.split(remote.split("atlas_jax.main ", 1)[1].split(" 2>&1")[0])
        assert job == [*argv[sep + 1:], "--config.distributed=True"]
    assert len(workdirs) == 4


def test_point_names_are_short_unique_and_safe():
    names = sweep.point_names([
        {"optim.lr": 1e-3, "model.visual_ops.mode": "module"},
        {"optim.lr": 3e-5, "stages.la_grpo.optim.lr": 1e-6},
        {"checkpoint.init_from": "/runs/a b/sft", "mesh": (1, -1, 1)},
        {"checkpoint.init_from": "/runs/a?b/sft", "mesh": (1, -1, 1)},
        {},
    ])
    assert names[0] == "optim.lr=0.001,mode=module"  # 'lr' alone would be ambiguous with the RL stage's lr
    assert names[1] == "optim.lr=3e-05,la_grpo.optim.lr=1e-06"
    assert names[2] == "init_from=-runs-a-b-sft,mesh=1x-1x1"
    assert names[3] == names[2] + "-2"  # same name after sanitising: still two workdirs
    assert names[4] == "base"
    long = sweep.point_names([{f"k{i}": "v" * 20 for i in range(10)}])[0]
    assert len(long) == sweep.MAX_NAME and "/" not in long


def test_unknown_or_mistyped_override_keys_are_rejected_by_name():
    c = _load(SFT)
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'.*did you mean 'lr'"):
        sweep.apply_overrides(c, {"optim.lrr": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.lr': the config has no field 'optimizer'"):
        sweep.apply_overrides(c, {"optimizer.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"key 'train\.steps' = 'many'"):
        sweep.apply_overrides(c, {"train.steps": "many"})
    with pytest.raises(ConfigError, match=r"'optim' is a config section"):
        sweep.apply_overrides(c, {"optim": 1})
    # The original is untouched; the copy has the override.
    assert sweep.apply_overrides(c, {"optim.lr": 0.25}).optim.lr == 0.25 and c.optim.lr == 3e-3


def test_a_bad_sweep_fails_before_anything_runs_naming_file_point_and_key(tmp_path):
    bad = _tiny_config_file(tmp_path, """\
        yield {"optim.lr": 1e-3}
        yield {"optim.lr": 3e-3, "model.visual_op.mode": "vocab"}
    """)
    r = _cli(f"--config={bad}", f"--workdir={tmp_path / 'root'}", "--mode=local")
    assert r.returncode == 1
    assert "tiny_sweep.py sweep() point 1 (lr=0.003,mode=vocab): unknown key 'model.visual_op.mode'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "root").exists()

    (tmp_path / "nosweep.py").write_text("from atlas_jax import run_config\n\ndef get_config():\n    return run_config.base()\n")
    r = _cli(f"--config={tmp_path / 'nosweep.py'}", f"--workdir={tmp_path / 'root'}")
    assert r.returncode == 1 and f"{tmp_path / 'nosweep.py'}: defines no sweep()" in r.stderr


def test_local_mode_runs_each_point_in_its_workdir_and_summarises(tmp_path):
    path = _tiny_config_file(tmp_path, """\
        yield {"optim.lr": 1e-3}
        yield {"optim.lr": 3e-3, "model.visual_ops.mode": "vocab"}
    """)
    root = str(tmp_path / "root")
    rows = sweep.run(_load(path), path, root, "local")
    assert [r["point"] for r in rows] == ["lr=0.001", "lr=0.003,mode=vocab"]
    for row, (lr, mode) in zip(rows, [(1e-3, "module"), (3e-3, "vocab")]):
        assert row["status"] == "ok" and row["workdir"] == os.path.join(root, row["point"])
        # The job's own record of its config: the point's overrides reached it.
        with open(os.path.join(row["workdir"], "config.json")) as f:
            saved = json.load(f)
        assert saved["optim"]["lr"] == lr and saved["model"]["visual_ops"]["mode"] == mode
        with open(os.path.join(row["workdir"], "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f]
        assert [m["step"] for m in logged] == [1, 2]
        assert row["metrics"]["loss"] == logged[-1]["loss"] and row["metrics"]["step"] == 2

    with open(os.path.join(root, "sweep_summary.md")) as f:
        table = f.read().strip().splitlines()
    assert table[0] == "| point | overrides | status | step | loss |"
    assert len(table) == 4
    assert table[2].startswith("| lr=0.001 | optim.lr=0.001 | ok | 2 | ")
    assert table[3].startswith("| lr=0.003,mode=vocab | optim.lr=0.003 model.visual_ops.mode=vocab | ok | 2 | ")
    assert float(table[3].split(" | ")[4].rstrip(" |")) == pytest.approx(rows[1]["metrics"]["loss"], rel=1e-3)
    with open(os.path.join(root, "sweep_summary.json")) as f:
        summary = json.load(f)
    assert [p["point"] for p in summary["points"]] == ["lr=0.001", "lr=0.003,mode=vocab"]
    assert summary["points"][1]["overrides"] == {"optim.lr": 3e-3, "model.visual_ops.mode": "vocab"}


def test_summary_reads_metrics_and_eval_files_and_reports_failures(tmp_path):
    """A point that resumed with nothing left to do returns {}: its files still give its results."""
    done, broken = tmp_path / "done", tmp_path / "broken"
    done.mkdir()
    (done / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5}\n{"step": 20, "loss": 1.25}\n')
    (done / "eval_sft_step20.json").write_text(json.dumps({"results": {"accuracy": 0.75, "functional_per_completion": 1.5}}))
    rows = [
        {"point": "done", "overrides": {"optim.lr": 1e-3}, "status": "ok", "metrics": sweep.final_metrics(str(done), {})},
        {"point": "broken", "overrides": {"optim.lr": 1.0}, "status": "failed: FloatingPointError: step 3",
         "metrics": sweep.final_metrics(str(broken))},
    ]
    assert rows[0]["metrics"] == {"step": 20.0, "loss": 1.25, "eval/accuracy": 0.75, "eval/functional_per_completion": 1.5}
    # What the job returns wins; the pipeline job's per-stage results become 'stage/metric'.
    returned = {"loss": 1.0, "SFT": {"accuracy": 0.5, "tasks": ["a"]}, "LA-GRPO": {"accuracy": 0.625}, "note": "x"}
    assert sweep.final_metrics(str(done), returned) == {**rows[0]["metrics"], "loss": 1.0, "SFT/accuracy": 0.5, "LA-GRPO/accuracy": 0.625}
    assert sweep.summary_table(rows).splitlines() == [
        "| point | overrides | status | step | loss | eval/accuracy | eval/functional_per_completion |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| done | optim.lr=0.001 | ok | 20 | 1.25 | 0.75 | 1.5 |",
        "| broken | optim.lr=1.0 | failed: FloatingPointError: step 3 | - | - | - | - |",
    ]
