"""Markdown table of held-out results from runs' evaluation files.

    python bench/results_table.py NAME=WORKDIR [NAME=WORKDIR ...]

Each WORKDIR's newest eval_*.json (by step) becomes one column.
"""

import sys

from atlas_jax.jobs.recipe import _latest_eval, results_table


def main(argv):
    runs = dict(a.rsplit("=", 1) for a in argv)  # names may contain "="
    results = {name: _latest_eval(d, "") for name, d in runs.items()}
    missing = [n for n, r in results.items() if r is None]
    if missing:
        raise SystemExit(f"no eval_*.json in the workdirs of {missing}")
    print(results_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
