"""Training curves as PNGs in the workdir (matplotlib, non-interactive backend)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(path: str, title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str = "step") -> None:
    """One line per series name -> (x, y); saved to `path`."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    for name, (x, y) in series.items():
        if x:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]
