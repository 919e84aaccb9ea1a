"""Config sweeps: the points of a config's `sweep()`, each with its own workdir.

    python -m atlas_jax.sweep --config=configs/sft_synthetic.py --workdir=/tmp/sweep                 # list
    python -m atlas_jax.sweep --config=configs/sft_synthetic.py --workdir=/tmp/sweep --mode=local \\
        --config.train.steps=50
    python -m atlas_jax.sweep --config=configs/sft_qwen25vl_7b.py --workdir=/mnt/gcs/sweeps/7b --mode=pod \\
        --launcher_flags="--tpu=my-v5e-32 --zone=us-west4-a --project=my-proj"

A config's `sweep()` yields dicts of dotted overrides, e.g. `{"optim.lr": 1e-3,
"model.visual_ops.mode": "vocab"}`. Command-line overrides (`--config.a.b=V`) make the base every
point shares; a point's own overrides are applied on top. Point `lr=0.001,mode=vocab` runs in
`WORKDIR/lr=0.001,mode=vocab`: the name is built from the overrides alone, so a re-run of the
sweep finds (and resumes) the same workdirs.

Modes: `list` prints the points; `local` runs them one after another in this process and writes
`WORKDIR/sweep_summary.md` and `.json` (final metrics per point); `pod` prints one
`launch/tpu_run.sh` command per point and runs nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections as mlc
from absl import app, flags
from ml_collections import config_flags

# Shares --config and --workdir with the entry point (absl allows one definition per name).
from atlas_jax import main as entry
from atlas_jax.run_config import apply_overrides
from atlas_jax.model.config import ConfigError

flags.DEFINE_enum("mode", "list", ["list", "local", "pod"], "list the points, run them here one by one, or print pod launch commands.")
flags.DEFINE_string("launcher", "launch/tpu_run.sh", "pod mode: the launch script.")
flags.DEFINE_string("launcher_flags", "", "pod mode: flags for the launch script, e.g. '--tpu=NAME --zone=Z --project=P'.")
flags.DEFINE_list("summary_metrics", None, "local mode: metric columns of the summary table (default: SUMMARY_METRICS present in any point).")
FLAGS = flags.FLAGS

log = logging.getLogger("atlas_jax")

# Columns of the summary table when present; the JSON summary keeps every final metric.
SUMMARY_METRICS = ("step", "loss", "reward_mean", "train_accuracy", "kl", "eval/accuracy", "eval/functional_per_completion",
                   "SFT/accuracy", "GRPO/accuracy", "LA-GRPO/accuracy")  # the last three: the pipeline job's stages
MAX_NAME = 100


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: its workdir name, its overrides (dotted key -> value), its workdir."""

    name: str
    overrides: dict[str, Any]
    workdir: str


# ---------------------------------------------------------------------- reading the sweep


def config_file(spec: str) -> str:
    """'configs/x.py:arg' -> 'configs/x.py' (ml_collections' own split)."""
    return spec.split(":", 1)[0]


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """Imports the config file of `spec` and returns the override dicts its `sweep()` yields.

    `sweep()` may take the config argument (the part after ':') or nothing.
    """
    path = config_file(spec)
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_atlas_sweep_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, "sweep", None)
    if not callable(fn):
        raise ConfigError(f"{path}: defines no sweep(); add `def sweep():` yielding dicts of dotted overrides, e.g. {{'optim.lr': 1e-3}}")
    takes_arg = len(inspect.signature(fn).parameters) > 0
    points = list(fn(spec.split(":", 1)[1]) if takes_arg and ":" in spec else fn())
    if not points:
        raise ConfigError(f"{path}: sweep() yielded no points")
    for i, p in enumerate(points):
        if not isinstance(p, Mapping) or not all(isinstance(k, str) and k for k in p):
            raise ConfigError(f"{path}: sweep() point {i} is {p!r}; expected a dict of dotted overrides such as {{'optim.lr': 1e-3}}")
    return [dict(p) for p in points]


# ---------------------------------------------------------------------- naming the points


def _value_str(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "x".join(_value_str(x) for x in v)
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: 0.001, 3e-05
    return str(v)


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key -> its shortest suffix that no other key of the sweep shares ('optim.lr' -> 'lr')."""
    parts = {k: k.split(".") for k in keys}
    labels = {}
    for k, p in parts.items():
        for n in range(1, len(p) + 1):
            suffix = p[-n:]
            if all(q[-n:] != suffix for other, q in parts.items() if other != k):
                break
        labels[k] = ".".join(suffix)
    return labels


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Short, filesystem-safe, unique names built from each point's overrides: 'lr=0.001,mode=vocab'."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    labels = _labels(keys)
    names, seen = [], {}
    for p in points:
        name = ",".join(f"{labels[k]}={_value_str(v)}" for k, v in p.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", name)
        if len(name) > MAX_NAME:  # long overrides (paths, many keys): a prefix plus a hash of the whole
            name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def make_points(overrides: Sequence[Mapping[str, Any]], root: str) -> list[Point]:
    return [Point(n, dict(o), os.path.join(root, n)) for n, o in zip(point_names(overrides), overrides)]


def point_configs(c: mlc.ConfigDict, points: Sequence[Point], spec: str) -> list[mlc.ConfigDict]:
    """The config of every point (all checked before anything runs)."""
    return [apply_overrides(c, p.overrides, where=f"{config_file(spec)} sweep() point {i} ({p.name})") for i, p in enumerate(points)]


# ---------------------------------------------------------------------- list / pod modes


def _overrides_str(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={cli_value(v)}" for k, v in overrides.items()) or "-"


def list_table(points: Sequence[Point]) -> str:
    rows = [[p.name, p.workdir, _overrides_str(p.overrides)] for p in points]
    return markdown_table(["point", "workdir", "overrides"], rows)


def cli_value(v: Any) -> str:
    """A value as `--config.k=V` text that ml_collections' flag parsers read back to `v`."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return repr(tuple(v))
    return str(v)


def pod_commands(points: Sequence[Point], spec: str, *, base_overrides: Mapping[str, Any] | None = None,
                 launcher: str = "launch/tpu_run.sh", launcher_flags: Sequence[str] = ()) -> list[str]:
    """One shell command per point: the launcher, its flags, then the job's flags after '--'.

    The base (command-line) overrides come first and the point's last, so the point wins a key
    both set (ml_collections applies overrides in order); keys the point sets are not repeated.
    """
    commands = []
    for p in points:
        base = {k: v for k, v in (base_overrides or {}).items() if k not in p.overrides}
        job = [f"--config={spec}", f"--workdir={p.workdir}", *(f"--config.{k}={cli_value(v)}" for k, v in {**base, **p.overrides}.items())]
        commands.append(shlex.join([launcher, *launcher_flags, "--", *job]))
    return commands


# ---------------------------------------------------------------------- local mode


def final_metrics(workdir: str, returned: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The last value of every scalar in WORKDIR/metrics.jsonl, the newest eval_*.json results as
    'eval/...' where the log lacks them, then what `run_job` returned (it wins; a nested dict, as
    the pipeline job returns per stage, becomes 'stage/metric')."""
    out: dict[str, float] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.update(json.loads(line))
                    except json.JSONDecodeError:
                        log.warning("%s:%d: not JSON; skipped in the sweep summary", path, line_no)
    evals = sorted(glob.glob(os.path.join(workdir, "eval_*.json")), key=os.path.getmtime)
    if evals:
        with open(evals[-1]) as f:
            results = json.load(f).get("results", {})
        for k, v in results.items():
            out.setdefault(f"eval/{k}", v)
    for k, v in (returned or {}).items():
        if isinstance(v, Mapping):
            out.update({f"{k}/{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_local(points: Sequence[Point], configs: Sequence[mlc.ConfigDict], root: str, *,
              summary_metrics: Sequence[str] | None = None) -> list[dict]:
    """Runs every point with `run_job`, one after another; a point that fails is reported in the
    summary and the others still run. Writes ROOT/sweep_summary.{md,json}; returns the rows."""
    rows = []
    for i, (p, c) in enumerate(zip(points, configs)):
        log.warning("sweep point %d/%d: %s -> %s", i + 1, len(points), p.name, p.workdir)
        t0 = time.perf_counter()
        returned, status = {}, "ok"
        try:
            returned = entry.run_job(c, p.workdir) or {}
        except Exception as e:  # noqa: BLE001 -- one bad point must not lose the others' results
            traceback.print_exc()
            status = f"failed: {type(e).__name__}: {e}"
        rows.append({"point": p.name, "workdir": p.workdir, "overrides": p.overrides, "status": status,
                     "seconds": round(time.perf_counter() - t0, 1), "metrics": final_metrics(p.workdir, returned)})
        # Rewritten after every point: an interrupted sweep still leaves the finished points' table.
        table = write_summary(rows, root, summary_metrics=summary_metrics)
    print(table)
    return rows


def summary_table(rows: Sequence[dict], summary_metrics: Sequence[str] | None = None) -> str:
    keys = list(summary_metrics) if summary_metrics else [k for k in SUMMARY_METRICS if any(k in r["metrics"] for r in rows)]
    body = [[r["point"], _overrides_str(r["overrides"]), r["status"], *(_fmt(r["metrics"].get(k)) for k in keys)] for r in rows]
    return markdown_table(["point", "overrides", "status", *keys], body)


def write_summary(rows: Sequence[dict], root: str, *, summary_metrics: Sequence[str] | None = None) -> str:
    """Writes ROOT/sweep_summary.md (the table) and .json (every final metric); returns the table."""
    table = summary_table(rows, summary_metrics)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "sweep_summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "sweep_summary.json"), "w") as f:
        json.dump({"points": list(rows)}, f, indent=1, default=str)
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


# ---------------------------------------------------------------------- entry point


def run(c: mlc.ConfigDict, spec: str, root: str, mode: str = "list", *, base_overrides: Mapping[str, Any] | None = None,
        launcher: str = "launch/tpu_run.sh", launcher_flags: Sequence[str] = (),
        summary_metrics: Sequence[str] | None = None) -> list[Point] | list[str] | list[dict]:
    """The sweep of config file `spec` ('configs/x.py[:arg]') over base config `c` (already carrying
    the command-line overrides `base_overrides`), rooted at `root`. Every point's overrides are
    checked before anything runs. Returns the points (list), the commands (pod) or the summary
    rows (local); list and pod modes print, local mode prints and writes the summary."""
    points = make_points(load_sweep(spec), root)
    configs = point_configs(c, points, spec)
    if mode == "list":
        print(list_table(points))
        return points
    if mode == "pod":
        commands = pod_commands(points, spec, base_overrides=base_overrides, launcher=launcher, launcher_flags=launcher_flags)
        print("\n".join(commands))
        return commands
    if mode != "local":
        raise ValueError(f"mode={mode!r}: expected 'list', 'local' or 'pod'")
    import jax

    from atlas_jax import run_config

    for p, pc in zip(points, configs):
        try:
            run_config.validate(pc, jax.device_count())
        except ConfigError as e:
            raise ConfigError(f"sweep point {p.name}: {e}") from None
    return run_local(points, configs, root, summary_metrics=summary_metrics)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE overrides")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required (--workdir is the sweep's root)")
    if FLAGS.mode == "local":
        import jax

        # As in atlas_jax.main: compiled programs are cached across points and runs.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/atlas_jax/jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        out = run(FLAGS.config, config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir, FLAGS.mode,
                  base_overrides=config_flags.get_override_values(FLAGS["config"]), launcher=FLAGS.launcher,
                  launcher_flags=shlex.split(FLAGS.launcher_flags), summary_metrics=FLAGS.summary_metrics)
    except ConfigError as e:  # a bad sweep is the user's to fix: the message, not a traceback
        sys.exit(f"sweep: {e}")
    failed = [r["point"] for r in out if FLAGS.mode == "local" and r["status"] != "ok"]
    if failed:
        sys.exit(f"sweep: {len(failed)} of {len(out)} points failed: {', '.join(failed)}")


if __name__ == "__main__":
    app.run(main)
