"""The SFT job end to end on 8 fake devices: trains, evaluates, and resumes exactly (after a stop,
and after a preemption whose last checkpoint was then damaged)."""

import json
import logging
import os
from pathlib import Path

import pytest

from atlas_jax import checkpoint, main as entry, run_config
from atlas_jax.model.config import ConfigError


def _config(**over):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_synthetic", os.path.join(os.path.dirname(__file__), "..", "configs", "sft_synthetic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("module")
    c.data.synthetic_config = "tiny"
    c.data.num_per_task = 2
    c.data.batch_size = 8
    c.data.max_length = 192
    c.train.steps = 4
    c.train.log_every = 1
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
    c.checkpoint.async_save = False
    c.eval.num_per_task = 0
    c.eval.batch_size = 8
    c.mesh = (2, 2, 2)
    return run_config.apply_overrides(c, over)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _logged_steps(workdir) -> list[int]:
    """The steps of metrics.jsonl's training rows, in file order (a step logged twice shows twice)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sft_data"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> str:
    """Four steps in one go."""
    workdir = str(tmp_path_factory.mktemp("sft_a"))
    entry.run_job(_config(**{"data.data_dir": data}), workdir)
    return workdir


@pytest.mark.slow
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path, data, uninterrupted):
    a, b = uninterrupted, str(tmp_path / "b")
    entry.run_job(_config(**{"data.data_dir": data, "train.stop_at": 2}), b)
    assert sorted(_losses(b)) == [1, 2]
    # Resumes from step 2, evaluates at step 3 (eval.every) and at the end (greedy decoding,
    # accuracy per task, heat maps).
    entry.run_job(_config(**{"data.data_dir": data, "eval.num_per_task": 1, "eval.heatmaps": 2, "eval.every": 3}), b)
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == [1, 2, 3, 4] and sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert la[step] == lb[step], (step, la[step], lb[step])
    assert la[4] < la[1]

    with open(os.path.join(b, "metrics.jsonl")) as f:
        evaluated = sorted(r["step"] for r in map(json.loads, f) if "eval/accuracy" in r)
    assert evaluated == [3, 4] and os.path.exists(os.path.join(b, "eval_sft_step3.json"))
    with open(os.path.join(b, "eval_sft_step4.json")) as f:
        ev = json.load(f)
    tasks = {s["task"] for s in ev["samples"]}
    assert len(tasks) == 8 and ev["results"]["num_samples"] == 8
    assert all(f"accuracy/{t}" in ev["results"] for t in tasks)
    assert ev["results"]["accuracy"] == sum(s["correct"] for s in ev["samples"]) / 8

    # Heat maps for the first 2 samples: from the generated functional tokens, else (a model this
    # young rarely emits one) teacher-forced on the reference trajectory, named so.
    _assert_heatmaps(b, "sft_step4", ev["samples"][:2])
    # The eval job on the newest checkpoint scores the same parameters the same way.
    res = entry.run_job(_config(**{"data.data_dir": data, "job": "eval", "eval.num_per_task": 1, "eval.heatmaps": 2}), b)
    assert res == ev["results"]
    _assert_heatmaps(b, "final", ev["samples"][:2])


@pytest.mark.slow
def test_preempted_run_with_a_damaged_checkpoint_resumes_from_the_one_before(tmp_path, data, uninterrupted, monkeypatch, caplog):
    b = str(tmp_path / "b")
    # SIGTERM seen at step 3, between the checkpoints of steps 2 and 4: save step 3, stop as preempted.
    monkeypatch.setattr(checkpoint.Checkpoints, "reached_preemption", lambda self, step: step == 3)
    with pytest.raises(checkpoint.Preempted, match="stopped by SIGTERM at step 3"):
        entry.run_job(_config(**{"data.data_dir": data}), b)
    monkeypatch.undo()
    assert _logged_steps(b) == [1, 2, 3]
    steps = Path(b, "checkpoints")
    assert sorted(p.name for p in steps.iterdir()) == ["2", "3"]
    # One flipped byte in the biggest parameter data file of step 3.
    victim = max((p for p in (steps / "3").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data_bytes = bytearray(victim.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    victim.write_bytes(bytes(data_bytes))

    with caplog.at_level(logging.WARNING, logger="atlas_jax.checkpoint"):
        entry.run_job(_config(**{"data.data_dir": data}), b)
    assert "skipping checkpoint step 3" in caplog.text and f"{victim} does not match its checksum" in caplog.text
    # Resumed from step 2: steps 3 and 4 as the uninterrupted run had them, and step 3 logged once.
    assert _logged_steps(b) == [1, 2, 3, 4]
    assert _losses(b) == _losses(uninterrupted)


def _assert_heatmaps(workdir: str, tag: str, samples: list[dict]) -> None:
    from PIL import Image

    from atlas_jax import functional_tokens

    strings = functional_tokens.token_strings(functional_tokens.DEFAULT_TOKENS)
    names = sorted(n for n in os.listdir(os.path.join(workdir, "heatmaps")) if n.startswith(f"{tag}_"))
    want = [f"{tag}_{k:02d}_{s['task']}" + ("" if any(t in s["completion"] for t in strings) else "_reference") + ".png"
            for k, s in enumerate(samples)]
    # A generated functional token gets a map unless it is the completion's last token; every
    # sample without one gets its reference trajectory's.
    assert set(names) <= set(want)
    assert [w for w in want if w.endswith("_reference.png")] == [n for n in names if n.endswith("_reference.png")]
    assert names, f"no heat maps for {tag}"
    for n in names:
        with Image.open(os.path.join(workdir, "heatmaps", n)) as im:
            assert im.width > im.height > 0  # the image and at least one map side by side


def test_throughput_and_mfu_count_the_global_batch(monkeypatch):
    """tokens/s = the global batch's tokens (a device scalar, every host's rows) per second;
    MFU = tokens/s * flops per token / (peak per device * every device of every host)."""
    import time

    import jax
    import numpy as np

    from atlas_jax import metrics as metrics_lib, sharding
    from atlas_jax.jobs import sft

    clock = iter([100.0, 104.0, 104.0])  # start, the log at step 2, the restart
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics_lib, "peak_flops_per_device", lambda: 1e12)
    mesh = sharding.make_mesh((2, 2, 2))
    mask = np.zeros((8, 16), bool)
    mask[:, :10] = True  # 80 real tokens, 1 row per device
    global_mask = jax.device_put(mask, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "tensor"))))
    progress = metrics_lib.Progress(2, flops_per_token=5e6, every=2)
    assert progress.update(1, {"loss": 1.0}, sft._count_tokens(global_mask)) == {}
    out = progress.update(2, {"loss": 1.0}, 120)
    assert out["perf/step_time_s"] == 2.0
    assert out["perf/tokens_per_s"] == (80 + 120) / 4.0
    assert out["perf/mfu"] == pytest.approx(50.0 * 5e6 / (1e12 * jax.device_count()))
    assert jax.device_count() == 8


def test_progress_bar_and_eta_text():
    from atlas_jax import metrics as metrics_lib

    assert metrics_lib.progress_bar(75, 300) == "[#####---------------]  25% 75/300"
    assert metrics_lib.progress_bar(300, 300) == "[####################] 100% 300/300"
    assert metrics_lib.progress_bar(0, 0) == "[--------------------]   0% 0/0"
    assert [metrics_lib.format_duration(s) for s in (0.4, 12, 185, 3720)] == ["0s", "12s", "3m05s", "1h02m"]


def test_bad_config_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size"):
        entry.run_job(_config(**{"data.batch_size": 6}), str(tmp_path))
    with pytest.raises(ConfigError, match="model.visual_ops.mode"):
        entry.run_job(_config(**{"model.visual_ops.mode": "both"}), str(tmp_path))
    assert not os.path.exists(tmp_path / "data")


def test_user_jsonl_data_trains(tmp_path):
    """SFT on a user's JSONL + image files (what the README's 'Your own data' section shows)."""
    from atlas_jax.data.synthetic import generate_split

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for split, n in (("train", 2), ("validation", 1)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i, s in enumerate(generate_split("train" if split == "train" else "in_distribution", n)):
                name = f"{split}_{i}.png"
                s.images[0].save(img_dir / name)
                f.write(json.dumps({"images": [f"imgs/{name}"], "question": s.question, "response": s.response, "answer": s.answer}) + "\n")
    c = _config(**{
        "data.source": "jsonl", "data.jsonl_train": str(tmp_path / "train.jsonl"),
        "data.jsonl_eval": str(tmp_path / "validation.jsonl"), "train.steps": 2, "eval.num_per_task": 1,
    })
    out = entry.run_job(c, str(tmp_path / "run"))
    assert out["loss"] > 0 and "eval/accuracy" in out
