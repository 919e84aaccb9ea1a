"""Real multi-host runs: two local JAX processes x 4 CPU devices against one process x 8 devices.

Each run is `tests/multihost_worker.py` (the real entry point, `atlas_jax.main.run_job`) in fresh
processes; two-process runs connect through the project's own start-up (`config.distributed`
with the coordinator from JAX_* variables or from config fields), talk through `jax.distributed`
(a coordinator on a free local port, gloo collectives), share one workdir, and write their
checkpoints together.

Like with like: all hosts shuffle the whole source with one seed (`pipeline.global_stream`) and
host h takes block h of every global batch of that one stream, the block `pipeline.to_global`
places its rows in, so global batch k holds the same records in the same row order for any
number of hosts, shuffling on. SFT's loss is a token mean over the batch, so only float32
summation order differs; LA-GRPO's rollouts, reward arrays, dynamic-sampling decisions (rounds,
dropped and chosen groups) and updates are a one-process run's. The tests check these premises on
the uids each process fed and on the rollouts, rewards and choices each process saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
REPO = os.path.dirname(os.path.dirname(WORKER))
STEPS = 3
LR = 3e-3
RL_STEPS, RL_ITERATIONS, RL_LR = 2, 2, 1e-3
RUN_TIMEOUT_S = 420  # one launch (all its processes); a hang is killed, never waited out

pytestmark = pytest.mark.slow


def _overrides(data_dir: str, **over) -> dict:
    o = {
        "data.synthetic_config": "tiny",
        "data.num_per_task": 3,  # 8 tasks x 3 = 24 train records: 3 steps of 8 see each once
        "data.batch_size": 8,
        "data.max_length": 192,
        "data.pad_to_multiple": 0,  # multi-host always pads to max_length: so does the reference
        "data.data_dir": data_dir,
        "train.steps": STEPS,
        "train.log_every": 1,
        "optim.lr": LR,
        "optim.warmup_steps": 0,  # every step moves the parameters
        "checkpoint.every": 100,  # only the forced saves (train.stop_at, end of run)
        "checkpoint.async_save": False,
        "eval.num_per_task": 1,  # 8 held-out prompts, greedy, with heat maps (teacher-forced: a
        "eval.batch_size": 8,  # 3-step model emits no functional token)
        "eval.max_new_tokens": 12,
        "eval.heatmaps": 2,
        "mesh": [2, 2, 2],
    }
    o.update(over)
    return o


def _rl_overrides(data_dir: str, **over) -> dict:
    """LA-GRPO from scratch on the same data (two rollout batches, two updates each), then eval.
    With DAPO dynamic sampling on: a random tiny model gives many groups of equal rewards, so steps
    take extra rollout rounds, drop groups and fill the batch with some of them (one run covers the
    filtered and the plain update: with every group informative the two are the same)."""
    o = {
        "data.synthetic_config": "tiny",
        "data.num_per_task": 3,
        "data.max_length": 192,
        "data.pad_to_multiple": 0,
        "data.data_dir": data_dir,
        "train.steps": RL_STEPS,
        "rl.num_iterations": RL_ITERATIONS,
        "rl.prompts_per_step": 8,
        "rl.group_size": 4,
        "rl.sample.max_new_tokens": 12,
        "rl.sample.temperature": 1.5,  # a random tiny model: hot sampling so some completions hold functional tokens
        "optim.lr": RL_LR,
        "optim.warmup_steps": 0,
        "rl.loss.beta": 0.02,  # the reference policy too
        "rl.rewards": {"functional_usage": 1.0, "format": 0.2},
        "rl.filter_groups": "reward",
        "rl.max_extra_rounds": 2,
        "train.log_every": 1,
        "checkpoint.every": 100,
        "checkpoint.async_save": False,
        "eval.num_per_task": 1,  # 8 held-out prompts, greedy, with heat maps
        "eval.batch_size": 8,
        "eval.max_new_tokens": 12,
        "eval.heatmaps": 2,
        "mesh": [2, 2, 2],
    }
    o.update(over)
    return o


def _free_port() -> int:
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _launch(tmp, name: str, *, num_processes: int, workdir: str, overrides: dict,
            config: str = "sft_synthetic.py:module", init: str = "env") -> str:
    """Runs the worker in `num_processes` processes (x 8/num_processes devices); returns its out dir.
    init: how the processes find each other, through `atlas_jax.main.initialize_distributed`:
    'env' (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, as a launcher sets them)
    or 'config' (config.coordinator_address / num_processes / process_id).
    Any process failing, or the launch outliving RUN_TIMEOUT_S, kills them all and fails with logs."""
    out = str(tmp / f"out_{name}")
    spec = {
        "num_processes": num_processes,
        "devices": 8 // num_processes,
        "workdir": workdir,
        "out": out,
        "config": config,
        "init": init,
        "overrides": overrides,
    }
    if num_processes > 1:
        spec["coordinator"] = f"127.0.0.1:{_free_port()}"
    spec_path = str(tmp / f"spec_{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    logs = [str(tmp / f"log_{name}_p{i}.txt") for i in range(num_processes)]
    procs = []
    try:
        for i in range(num_processes):
            process_env = dict(env)
            if num_processes > 1 and init == "env":
                process_env.update(JAX_COORDINATOR_ADDRESS=spec["coordinator"], JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, WORKER, f"--spec={spec_path}", f"--process_id={i}"],
                    cwd=REPO, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                ))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(p.poll() is None for p in procs):
            # One process dying leaves the others blocked in a collective: stop them at once.
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * num_processes:
        tails = "\n".join(f"--- {path} (exit {c})\n{_tail(path)}" for path, c in zip(logs, codes))
        pytest.fail(f"launch {name!r}: exit codes {codes} (killed after {RUN_TIMEOUT_S}s if negative)\n{tails}")
    return out


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _json(path: str):
    with open(path) as f:
        return json.load(f)


def _losses(workdir: str) -> list[tuple[int, float]]:
    """(step, loss) in the order process 0 wrote them to metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _assert_same_step_metrics(want_dir: str, got_dir: str) -> None:
    """Token counts exactly; gradient, parameter and update norms within float32 rounding; the
    tokens behind tokens/s."""
    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f) if "loss" in r}

    want, got = rows(want_dir), rows(got_dir)
    assert sorted(got) == sorted(want)
    for step in want:
        for k in ("tokens", "functional_tokens"):
            assert got[step][k] == want[step][k], (step, k)
        for k in ("grad_norm", "param_norm", "update_norm", "accuracy", "lr"):
            np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, err_msg=f"step {step} {k}")
        # Throughput counts the global batch: tokens/s x s/step is the step's tokens, on any host count.
        per_step = [r[step]["perf/tokens_per_s"] * r[step]["perf/step_time_s"] for r in (got, want)]
        np.testing.assert_allclose(*per_step, rtol=1e-6, err_msg=f"step {step} tokens")


def _params(out: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out, "params.npz")) as z:
        return {k: z[k] for k in z.files}


def _assert_params_close(got: dict, want: dict, *, lr: float = LR, step: int = STEPS) -> None:
    """Equal within float32 rounding, as far as AdamW lets rounding show.

    The forward/backward sums run in another order (cross-process all-reduce, another row order),
    so gradients differ by float32 rounding. AdamW's per-coordinate g / (sqrt(v) + eps) turns that
    into a visible difference only where a gradient is itself at rounding level (noise divided by
    noise): a handful of coordinates may then differ by a small fraction of one update (~lr).
    A real multi-host bug (a lost all-reduce, other records) moves most coordinates by ~lr."""
    assert got.keys() == want.keys()
    assert int(got["__step__"]) == int(want["__step__"]) == step
    keys = [k for k in want if k != "__step__"]
    diff = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in keys])
    worst = max(keys, key=lambda k: float(np.max(np.abs(got[k] - want[k]))))
    assert float(diff.max()) <= 0.01 * lr, f"parameter {worst} differs by {diff.max():.3g} (> 1% of lr={lr})"
    assert np.count_nonzero(diff > 1e-5) <= 1e-5 * diff.size, (
        f"{np.count_nonzero(diff > 1e-5)} of {diff.size} parameters differ by more than 1e-5"
    )


def _assert_same_eval(reference: dict, workdir: str, out: str, name: str) -> list[str]:
    """Every host scored its own prompts; the gathered results and samples are a one-process
    run's, both processes returned them, and process 0 drew heat maps. Returns the files written."""
    want, got = _json(os.path.join(reference["workdir"], name)), _json(os.path.join(workdir, name))
    assert got == want and want["results"]["num_samples"] == 8
    results = [_json(os.path.join(out, f"result_p{i}.json")) for i in range(2)]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in results]
    assert evals[0] == evals[1] == {f"eval/{k}": v for k, v in want["results"].items()}
    maps = [f"heatmaps/{n}" for n in os.listdir(os.path.join(workdir, "heatmaps"))]
    assert maps, "process 0 draws heat maps"
    return [name, *maps]


def _assert_only_process0_logs(outs: list[str], workdir: str, written=("metrics.jsonl", "config.json")) -> None:
    """Over the launches `outs` sharing `workdir`: process 1 opened no log, summary, config,
    tokenizer, eval result or heat-map file for writing (an audit hook in the worker), process 0
    wrote `written` and the TensorBoard events, and both wrote their part of the checkpoints
    (each its own data-iterator position)."""
    writes = [set().union(*(_json(os.path.join(o, f"writes_p{i}.json")) for o in outs)) for i in range(2)]
    logs = ("metrics.jsonl", "tensorboard/", "config.json", "tokenizer/", "eval_", "heatmaps/")
    assert not [w for w in writes[1] if w.startswith(logs)], sorted(writes[1])
    events = {f"tensorboard/{name}" for name in os.listdir(os.path.join(workdir, "tensorboard"))}
    assert len(events) == len(outs) and events <= writes[0]  # one event file per run, by process 0
    assert set(written) <= writes[0], sorted(writes[0])
    for i, w in enumerate(writes):
        assert any(x.startswith("checkpoints/") and x.endswith(f"process_{i}-of-2.json") for x in w), (i, sorted(w))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mh_data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process x 8 devices, 3 uninterrupted steps (also builds the shared dataset)."""
    tmp = tmp_path_factory.mktemp("mh_ref")
    workdir = str(tmp / "work")
    out = _launch(tmp, "ref", num_processes=1, workdir=workdir, overrides=_overrides(data_dir))
    records = _json(os.path.join(out, "records_p0.json"))[:STEPS]  # the evaluation's batches follow
    # Distinct batches: a run that lost its data position (or skipped / repeated a batch) shows.
    assert len({uid for batch in records for uid in batch}) == STEPS * 8
    return {"workdir": workdir, "out": out, "records": records}


def _assert_same_batches(reference_records, per_process: list[list[list[str]]], steps) -> None:
    for s in steps:
        both = [uid for recs in per_process for uid in recs[s]]  # host 0's block, then host 1's
        assert both == reference_records[s], f"step {s + 1}: the global batches hold other records or another order"
        assert len(set(both)) == len(both) == 8


def test_two_processes_train_like_one(tmp_path, data_dir, reference):
    workdir = str(tmp_path / "work")
    out = _launch(tmp_path, "mh", num_processes=2, workdir=workdir, overrides=_overrides(data_dir))

    # Training batches, then the evaluation's (its prompts, the same prompts with each other's
    # images for the image-swap control, then its teacher-forced references).
    records = [_json(os.path.join(out, f"records_p{i}.json")) for i in range(2)]
    assert [len(r) for r in records] == [STEPS + 3, STEPS + 3]
    records = [r[:STEPS] for r in records]
    assert not set(sum(records[0], [])) & set(sum(records[1], [])), "the hosts' shards overlap"
    _assert_same_batches(reference["records"], records, range(STEPS))

    want, got = _losses(reference["workdir"]), _losses(workdir)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]  # one line per step: one writer
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
    _assert_same_step_metrics(reference["workdir"], workdir)
    assert len({l for _, l in want}) == STEPS  # the losses move, so a stale step would show

    _assert_params_close(_params(out), _params(reference["out"]))
    evals = _assert_same_eval(reference, workdir, out, f"eval_sft_step{STEPS}.json")
    _assert_only_process0_logs([out], workdir, written=("metrics.jsonl", "config.json", *evals))


def test_two_processes_resume_like_one_uninterrupted(tmp_path, data_dir, reference):
    workdir = str(tmp_path / "work")
    no_eval = {"eval.num_per_task": 0}  # test_two_processes_train_like_one compares the evaluation
    first = _launch(tmp_path, "stop", num_processes=2, workdir=workdir, overrides=_overrides(data_dir, **no_eval, **{"train.stop_at": 2}))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    second = _launch(tmp_path, "resume", num_processes=2, workdir=workdir, overrides=_overrides(data_dir, **no_eval))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]

    # Both processes restored their own data position: the resumed step 3 reads step 3's records.
    before = [_json(os.path.join(first, f"records_p{i}.json")) for i in range(2)]
    after = [_json(os.path.join(second, f"records_p{i}.json")) for i in range(2)]
    assert [len(r) for r in before] == [2, 2] and [len(r) for r in after] == [1, 1]
    _assert_same_batches(reference["records"], [b + a for b, a in zip(before, after)], range(STEPS))

    want, got = _losses(reference["workdir"]), _losses(workdir)
    assert [s for s, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
    _assert_same_step_metrics(reference["workdir"], workdir)
    want_params = _params(reference["out"])
    _assert_params_close(_params(second), want_params)
    # The comparison can fail: one step less moves most coordinates far outside the tolerance.
    at_stop = _params(first)
    assert int(at_stop["__step__"]) == 2
    moved = np.concatenate([np.abs(at_stop[k] - want_params[k]).ravel() for k in want_params if k != "__step__"])
    assert np.mean(moved > 1e-5) > 0.5
    _assert_only_process0_logs([first, second], workdir)



# ----------------------------------------------------------------------------- LA-GRPO + eval
def _rl_rows(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def rl_reference(tmp_path_factory, data_dir):
    """One process x 8 devices: LA-GRPO from scratch, then the final evaluation."""
    tmp = tmp_path_factory.mktemp("mh_rl_ref")
    workdir = str(tmp / "work")
    out = _launch(tmp, "rl_ref", num_processes=1, workdir=workdir, overrides=_rl_overrides(data_dir), config="la_grpo_synthetic.py:la_grpo")
    return {"workdir": workdir, "out": out}


def test_two_processes_run_la_grpo_and_eval_like_one(tmp_path, data_dir, rl_reference):
    workdir = str(tmp_path / "work")
    out = _launch(tmp_path, "rl", num_processes=2, workdir=workdir, overrides=_rl_overrides(data_dir),
                  config="la_grpo_synthetic.py:la_grpo", init="config")
    want_out = rl_reference["out"]
    want, got = _rl_rows(rl_reference["workdir"]), _rl_rows(workdir)
    assert sorted(got) == sorted(want) == list(range(1, RL_STEPS + 1))

    # Dynamic sampling took the same decisions on both processes as in one: the same informative
    # groups per round, the same groups chosen for each update, so the same number of rounds.
    want_choices = _json(os.path.join(want_out, "choices_p0.json"))
    choices = [_json(os.path.join(out, f"choices_p{i}.json")) for i in range(2)]
    assert choices[0] == choices[1] == want_choices and len(want_choices) == RL_STEPS
    rounds = [len(c["informative"]) for c in want_choices]
    assert rounds == [int(want[s]["dynamic/rounds"]) for s in range(1, RL_STEPS + 1)]
    dropped = [sum(not f for r in c["informative"] for f in r) for c in want_choices]
    assert dropped == [int(want[s]["dynamic/groups_dropped"]) for s in range(1, RL_STEPS + 1)]
    # Not vacuous: some step dropped groups and took an extra round.
    assert max(rounds) > 1 and sum(dropped) > 0, (rounds, dropped)

    # The same prompts per rollout round (the first to_global calls; eval batches follow).
    want_records = _json(os.path.join(want_out, "records_p0.json"))
    records = [_json(os.path.join(out, f"records_p{i}.json")) for i in range(2)]
    _assert_same_batches(want_records, records, range(sum(rounds)))

    # Every process saw the global completions and reward arrays of a one-process run, exactly.
    want_rollouts = _json(os.path.join(want_out, "rollouts_p0.json"))
    rollouts = [_json(os.path.join(out, f"rollouts_p{i}.json")) for i in range(2)]
    assert len(want_rollouts) == sum(rounds)
    assert rollouts[0] == rollouts[1] == want_rollouts
    assert any(r != 0 for batch in want_rollouts for r in batch["rewards"]), "all rewards 0: the comparison would be weak"
    # The groups judged informative are those whose global rewards differ, round by round.
    rewards_bg = [np.reshape(batch["rewards"], (-1, _rl_overrides(data_dir)["rl.group_size"])) for batch in want_rollouts]
    assert [(r.max(1) > r.min(1)).tolist() for r in rewards_bg] == [f for c in want_choices for f in c["informative"]]

    for step in want:
        assert got[step].keys() == want[step].keys()
        for k in want[step]:
            if k.startswith(("reward", "completion_length", "train_accuracy", "data/", "num_functional", "completion_tokens",
                             "dynamic/", "frac_reward_zero_std")):
                assert got[step][k] == want[step][k], (step, k)
            else:  # the log-prob gap is itself rounding-level on the first update: an absolute bound
                atol = 1e-6 if k.startswith("logp_gap") else 1e-7
                np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-5, atol=atol, err_msg=f"step {step} {k}")
    _assert_params_close(_params(out), _params(want_out), lr=RL_LR, step=RL_STEPS * RL_ITERATIONS)

    evals = _assert_same_eval(rl_reference, workdir, out, f"eval_rl_step{RL_STEPS}.json")
    _assert_only_process0_logs([out], workdir, written=("metrics.jsonl", *evals))
