"""Run metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL log, optionally
Weights & Biases, a progress line with throughput and MFU, NaN/inf detection, and a profiler
trace of chosen steps. Only process 0 writes metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger("atlas_jax")

# Peak dense bf16 FLOP/s per device, for the MFU estimate (None: unknown, e.g. CPU).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def train_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """6 N (matmuls, forward + backward) + 6 L T D (attention scores and values, causal-halved)."""
    return 6.0 * num_params + 6.0 * num_layers * seq_len * hidden


def model_flops(cfg, batch: int, seq: int, patches: int) -> dict[str, float]:
    """Training FLOPs of one step (forward + backward = 3x the forward's 2 FLOPs per MAC).

    patches: vision patches per sample (before the 2x2 merge). Window attention in the vision
    tower is counted over each window (`window_size` px) except in its full-attention blocks.
    """
    t, v = cfg.text, cfg.vision
    tokens = batch * seq
    H, K, E, D, F = t.num_heads, t.num_kv_heads, t.head_dim, t.hidden_size, t.intermediate_size
    per_token = (D * (H + 2 * K) * E + H * E * D) + 3 * D * F  # q, k, v, o projections + SwiGLU
    decoder = t.num_layers * (per_token * tokens + 2 * batch * seq * seq * H * E)  # + scores and values
    head = tokens * D * t.vocab_size

    Dv, Fv = v.hidden_size, v.intermediate_size
    n = batch * patches
    window = min(patches, (v.window_size // v.patch_size) ** 2)
    vis_per_patch = v.patch_dim * Dv + v.depth * (4 * Dv * Dv + 3 * Dv * Fv)
    full = len(v.fullatt_block_indexes)
    vis_attn = 2 * n * Dv * (full * patches + (v.depth - full) * window)
    D4 = Dv * v.merge_unit
    merger = (n // v.merge_unit) * (D4 * D4 + D4 * v.out_hidden_size)
    vision = n * vis_per_patch + vis_attn + merger
    forward_macs = {"decoder": decoder, "lm_head": head, "vision": vision}
    return {k: 6.0 * m for k, m in forward_macs.items()}


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl`, TensorBoard event files and, with a
    `wandb_project`, Weights & Biases (process 0 only).

    start_step: the step the run starts from (its restored checkpoint's, 0 when fresh). A run that
    crashed after it logged steps it is about to repeat: those rows are dropped from metrics.jsonl
    and hidden in TensorBoard (its `purge_step`), so each step is logged once.
    wandb_project: '' = no W&B (`train.wandb_project`); run_config: the run's config, shown in W&B.
    """

    def __init__(self, workdir: str, *, prefix: str = "", start_step: int = 0, wandb_project: str = "",
                 run_config: Mapping | None = None):
        self.enabled = jax.process_index() == 0
        self.prefix = prefix
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, start_step)
            self._jsonl = open(path, "a")
            if wandb_project:
                self._wandb = _wandb_run(workdir, wandb_project, run_config)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {f"{self.prefix}{k}": float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(workdir: str, project: str, run_config: Mapping | None):
    """A W&B run writing under `workdir/wandb`; its id is kept in `workdir/wandb_run_id`, so a
    resumed job continues the same W&B run (W&B ignores the repeated steps' rows)."""
    try:
        import wandb
    except ImportError:
        raise ImportError(f"train.wandb_project={project!r} needs wandb: pip install 'atlas-jax[wandb]', "
                          "or set train.wandb_project='' (TensorBoard logs either way)") from None
    id_path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B's own id form: 8 lowercase alphanumerics
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, dir=workdir, id=run_id, resume="allow", name=os.path.basename(os.path.abspath(workdir)),
                      config=dict(run_config or {}))


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSONL log at `path` (if any) without its rows of steps after `step`, and
    without a last line cut short by a crash."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = f.readlines()

    def row_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    kept = [line for line in rows if line.endswith("\n") and row_step(line) <= step]
    if len(kept) < len(rows):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)  # a crash now leaves the old log or the new one, whole


class StepProfiler:
    """A `jax.profiler` trace of the steps `first .. end - 1` (`train.profile_steps` = (first,
    end); () = off) into `workdir/profile`, which TensorBoard's profile tab / XProf reads. Steps
    count from 1, as in the metrics. The trace stops once step end - 1 has finished on the device
    (steps are dispatched asynchronously), or when the run leaves the loop earlier (`close`)."""

    def __init__(self, workdir: str, steps: tuple[int, ...]):
        self.dir = os.path.join(workdir, "profile")
        self.first, self.end = steps if steps else (0, 0)
        self._active = False

    def before(self, step: int) -> None:
        """Called before running step `step`."""
        if step == self.first:
            jax.profiler.start_trace(self.dir)
            self._active = True

    def after(self, step: int, outputs) -> None:
        """Called once step `step` is dispatched; outputs: its results, waited for when tracing stops."""
        if self._active and step >= self.end - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            log.info("profiler trace of steps %d..%d in %s", self.first, self.end - 1, self.dir)


def check_finite(metrics: Mapping[str, float], step: int) -> None:
    """Stops the run at the first NaN / inf metric, naming it (a diverged run wastes the pod)."""
    bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite metrics {bad}; stopping (lower the learning rate or check the data)")


def progress_bar(step: int, total: int, width: int = 20) -> str:
    """'[#####---------------]  25% 75/300': a text bar that reads the same in a log file."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {100 * frac:3.0f}% {step}/{total}"


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '12s'."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A progress line every `every` steps: a bar, loss, step time, tokens/s, MFU, time left.

    Tokens are the GLOBAL batch's (every host's), so tokens/s is the whole job's throughput and
    MFU = tokens/s * flops_per_token / (peak per device * all devices of all hosts)."""

    def __init__(self, total_steps: int, *, flops_per_token: float | None, every: int = 10):
        self.total = total_steps
        self.every = every
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device()
        self._t = time.perf_counter()
        self._tokens: list = []
        self._steps = 0

    def update(self, step: int, metrics: Mapping[str, float], tokens) -> dict[str, float]:
        """Accumulates; every `every` steps logs and returns throughput metrics (else {}).
        tokens: this step's token count over the global batch, a number or a device scalar (read
        only when logging, so the loop does not wait on the device every step)."""
        self._tokens.append(tokens)
        self._steps += 1
        if step % self.every and step != self.total:
            return {}
        dt = time.perf_counter() - self._t
        tokens = float(sum(float(t) for t in jax.device_get(self._tokens)))
        out = {"perf/step_time_s": dt / self._steps, "perf/tokens_per_s": tokens / dt}
        if self.flops_per_token and self.peak:
            out["perf/mfu"] = out["perf/tokens_per_s"] * self.flops_per_token / (self.peak * jax.device_count())
        if jax.process_index() == 0:
            mfu = f" mfu {100 * out['perf/mfu']:.1f}%" if "perf/mfu" in out else ""
            eta = (self.total - step) * out["perf/step_time_s"]
            log.info(
                "%s loss %.4f | %.3f s/step %.0f tok/s%s | eta %s",
                progress_bar(step, self.total), float(metrics.get("loss", np.nan)), out["perf/step_time_s"],
                out["perf/tokens_per_s"], mfu, format_duration(eta),
            )
        self._t, self._tokens, self._steps = time.perf_counter(), [], 0
        return out
