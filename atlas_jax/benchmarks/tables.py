"""Result tables of a benchmark run: per subset and overall, as JSON and Markdown, next to the
paper's numbers.

Per subset: questions, accuracy, functional tokens per completion, mean completion length in
tokens. Overall, two rows: 'all' (every question counts once) and 'mean of subsets' (each
subset counts once). The paper's V* and WeMath columns compare with 'all', its BLINK Avg. with
BLINK's 'mean of subsets' over the seven subsets it reports (its table's averages are those
means, e.g. (50.4 + 59.2 + 26.5 + 26.0 + 54.7 + 48.1 + 57.3) / 7 = 46.0 for ATLAS-SFT).
"""

from __future__ import annotations

import collections

# The paper's Table (accuracy, %), from the project page https://atlas-oneword.github.io/ of
# "ATLAS: Agentic or Latent Visual Reasoning? One Word is Enough for Both" (arXiv 2605.15198).
PAPER_COLUMNS = ("V*", "WeMath", "BLINK Avg.", "Art.", "Count.", "Forensic.", "IQ", "Jigsaw", "M-view", "Spatial")
PAPER_RESULTS = {
    "Qwen2.5-VL": (70.2, 36.2, 22.8, 29.9, 58.3, 0.8, 18.7, 31.3, 0.0, 20.3),
    "ATLAS-SFT": (77.5, 28.9, 46.0, 50.4, 59.2, 26.5, 26.0, 54.7, 48.1, 57.3),
    "ATLAS-GRPO": (77.9, 40.3, 50.5, 57.3, 61.7, 34.1, 26.0, 57.7, 43.6, 70.6),
    "ATLAS-LA-GRPO": (75.4, 45.0, 51.3, 65.0, 62.5, 37.9, 26.3, 51.3, 53.4, 62.9),
}
# Where each paper column is read from a run's tables: (benchmark, row).
_PAPER_CELLS = (("vstar", "all"), ("wemath", "all"), ("blink", "mean of subsets"), ("blink", "Art_Style"),
                ("blink", "Counting"), ("blink", "Forensic_Detection"), ("blink", "IQ_Test"), ("blink", "Jigsaw"),
                ("blink", "Multi-view_Reasoning"), ("blink", "Spatial_Relation"))
HEADER = ("subset", "questions", "accuracy", "functional_per_completion", "mean_length")


def table(samples: list[dict]) -> list[dict]:
    """Rows (dicts with `HEADER` keys) for scored samples, each {subset, correct, functional:
    {name: count}, length}: one per subset (in order of appearance), then 'all' and 'mean of
    subsets'."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for s in samples:
        groups[s["subset"]].append(s)
    rows = [_row(name, group) for name, group in groups.items()]
    rows.append(_row("all", samples))
    rows.append({"subset": "mean of subsets", "questions": len(samples),
                 **{k: sum(r[k] for r in rows[:-1]) / max(len(rows) - 1, 1) for k in HEADER[2:]}})
    return rows


def _row(name: str, samples: list[dict]) -> dict:
    n = max(len(samples), 1)
    return {
        "subset": name,
        "questions": len(samples),
        "accuracy": sum(bool(s["correct"]) for s in samples) / n,
        "functional_per_completion": sum(sum(s["functional"].values()) for s in samples) / n,
        "mean_length": sum(s["length"] for s in samples) / n,
    }


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (accuracy in %)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    for r in rows:
        lines.append(f"| {r['subset']} | {r['questions']} | {100 * r['accuracy']:.1f} | "
                     f"{r['functional_per_completion']:.2f} | {r['mean_length']:.1f} |")
    return "\n".join(lines)


def paper_comparison(tables: dict[str, list[dict]], name: str = "this run") -> str:
    """Markdown: the paper's rows and this run's (accuracy %, '-' where it did not evaluate)."""
    ours = []
    for benchmark, subset in _PAPER_CELLS:
        row = next((r for r in tables.get(benchmark, ()) if r["subset"] == subset), None)
        ours.append("-" if row is None else f"{100 * row['accuracy']:.1f}")
    lines = ["| method | " + " | ".join(PAPER_COLUMNS) + " |", "|---" * (len(PAPER_COLUMNS) + 1) + "|"]
    lines += [f"| {method} (paper) | " + " | ".join(f"{v:.1f}" for v in values) + " |" for method, values in PAPER_RESULTS.items()]
    lines.append(f"| {name} | " + " | ".join(ours) + " |")
    return "\n".join(lines)
