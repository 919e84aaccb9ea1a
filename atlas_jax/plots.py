"""Training curves as PNGs in the workdir (matplotlib, non-interactive backend)."""

from __future__ import annotations

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


SMOOTH_FROM = 20  # points: a longer series is drawn faint, with its trailing mean over a tenth of it on top


def curves(path: str, title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str = "step") -> None:
    """One line per series name -> (x, y); saved to `path`. A series of SMOOTH_FROM points or more
    (e.g. a reward per rollout batch, noisy from batch to batch) also gets its trailing mean
    (`trailing_mean`, a window of a tenth of its length), so a trend shows through the noise."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    smoothed = False
    for name, (x, y) in series.items():
        if len(x) >= SMOOTH_FROM:
            smoothed = True
            window = len(x) // 10
            (raw,) = ax.plot(x, y, alpha=0.3, linewidth=0.8)
            ax.plot(x, trailing_mean(y, window), color=raw.get_color(), label=f"{name} (mean of {window})")
        elif x:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or smoothed:  # a smoothed line's label says its window
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def trailing_mean(y: list[float], window: int) -> list[float]:
    """Each point's mean with the window - 1 before it (fewer at the start)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(y, np.float64))])  # sums[i]: the first i points
    end = np.arange(1, len(sums))
    start = np.maximum(end - window, 0)
    return ((sums[end] - sums[start]) / (end - start)).tolist()


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]
