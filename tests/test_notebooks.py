"""The notebooks in notebooks/ run top to bottom on CPU with their tiny setting, so they cannot rot.

No Jupyter needed: the code cells of each .ipynb are executed in order in ONE fresh Python
process (one shared namespace, like a kernel). Shell and magic lines (`!pip ...`, `%cd`) are
skipped: in CI the package is already installed. `IPython.display` is stubbed when IPython is
missing. A failure names the notebook cell (index among all cells, as Jupyter counts them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TIMEOUT_S = 600  # generous: CI machines are shared; each notebook takes ~1-2 minutes on 2 cores

# Runs inside the child process: argv[1] is a JSON file [[cell_index, source], ...].
_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback, types
    try:
        import IPython.display  # noqa: F401
    except ImportError:  # a display() that prints, enough for the notebooks' outputs
        mod = types.ModuleType("IPython.display")
        class _Shown:
            def __init__(self, data=None, filename=None, **kw):
                self.data, self.filename = data, filename
            def __repr__(self):
                return f"<{type(self).__name__} {self.filename or (self.data if isinstance(self.data, str) else '')}>"
        mod.Image = type("Image", (_Shown,), {})
        mod.Markdown = type("Markdown", (_Shown,), {})
        mod.display = lambda *objs, **kw: [print(repr(o)) for o in objs]
        pkg = types.ModuleType("IPython"); pkg.display = mod
        sys.modules["IPython"], sys.modules["IPython.display"] = pkg, mod
    cells = json.load(open(sys.argv[1]))
    namespace = {"__name__": "__main__"}
    for index, source in cells:
        print(f"=== notebook cell {index}", flush=True)
        try:
            exec(compile(source, f"<notebook cell {index}>", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"NOTEBOOK CELL {index} FAILED", flush=True)
            sys.exit(1)
    print("NOTEBOOK DONE", flush=True)
    """
)


def notebook_code(path: str) -> list[tuple[int, str]]:
    """(cell index, Python source) of every code cell, with shell / magic lines turned into
    `pass` (keeping the indentation, so an `if ...:` guard around `!pip` stays valid)."""
    with open(path) as f:
        nb = json.load(f)
    cells = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if source.lstrip().startswith("%%"):  # a cell magic: the whole cell is not Python
            continue
        lines = []
        for line in source.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("!", "%")):
                line = line[: len(line) - len(stripped)] + "pass  # skipped: " + stripped
            lines.append(line)
        cells.append((index, "\n".join(lines) + "\n"))
    return cells


def run_notebook(name: str, workdir: str, tmp_path) -> str:
    """Executes notebooks/<name> in a fresh process; returns its output; fails naming the cell."""
    cells_file = tmp_path / f"{name}.cells.json"
    cells_file.write_text(json.dumps(notebook_code(os.path.join(NOTEBOOKS, name))))
    env = dict(os.environ, ATLAS_NOTEBOOK_TINY="1", ATLAS_NOTEBOOK_WORKDIR=workdir, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop or a CPU Colab runtime
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(cells_file)], cwd=str(tmp_path), env=env,
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [line for line in out.splitlines() if line.startswith("=== notebook cell")]
        pytest.fail(f"{name}: timed out after {TIMEOUT_S}s in {started[-1] if started else 'startup'}\n{out[-4000:]}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "NOTEBOOK DONE" not in proc.stdout:
        failed = [line for line in proc.stdout.splitlines() if line.startswith("NOTEBOOK CELL")]
        pytest.fail(f"{name}: {failed[-1] if failed else f'exit code {proc.returncode}'}\n{out[-6000:]}")
    return out


def test_committed_notebooks_have_no_outputs():
    """Outputs are cleared in the committed files (small diffs, no stale results)."""
    names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    assert names == ["from_hf_checkpoint.ipynb", "quickstart.ipynb"]
    for name in names:
        with open(os.path.join(NOTEBOOKS, name)) as f:
            nb = json.load(f)
        assert nb["nbformat"] == 4
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [] and cell.get("execution_count") is None, (name, i)


def test_shell_lines_are_skipped_keeping_indentation(tmp_path):
    nb = {"nbformat": 4, "cells": [
        {"cell_type": "markdown", "source": ["!not code"]},
        {"cell_type": "code", "source": ["if False:\n", "    !pip install x\n", "y = 1"]},
        {"cell_type": "code", "source": ["%%bash\n", "echo hi"]},
    ]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    assert notebook_code(str(path)) == [(1, "if False:\n    pass  # skipped: !pip install x\ny = 1\n")]


@pytest.mark.slow
def test_quickstart_runs_on_cpu(tmp_path):
    workdir = str(tmp_path / "work")
    out = run_notebook("quickstart.ipynb", workdir, tmp_path)
    sft_dir, rl_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "la_grpo")
    # The SFT run trained, the LA-GRPO run started from it, and both were evaluated.
    with open(os.path.join(sft_dir, "metrics.jsonl")) as f:
        sft_rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in sft_rows if "loss" in r]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    with open(os.path.join(rl_dir, "metrics.jsonl")) as f:
        rl_steps = {json.loads(line)["step"] for line in f}
    assert rl_steps >= {1, 2}
    for d in (sft_dir, rl_dir):
        with open(os.path.join(d, "eval_final.json")) as f:
            ev = json.load(f)
        # One held-out prompt per task: 8 scored samples, accuracy = the fraction marked correct.
        assert ev["results"]["num_samples"] == len(ev["samples"]) == 8
        assert ev["results"]["accuracy"] == sum(s["correct"] for s in ev["samples"]) / 8
    # The inline heat maps are PNG files the notebook displayed.
    assert "heat map" in out.lower()
    pngs = [os.path.join(r, n) for r, _, names in os.walk(workdir) for n in names if n.endswith(".png") and "heatmap" in r]
    assert pngs, "the notebook shows visual-op heat maps: at least one PNG must exist"
    from PIL import Image

    for p in pngs:
        with Image.open(p) as im:
            assert im.width > im.height > 0


@pytest.mark.slow
def test_from_hf_checkpoint_runs_on_cpu(tmp_path):
    workdir = str(tmp_path / "work")
    run_notebook("from_hf_checkpoint.ipynb", workdir, tmp_path)
    exported = os.path.join(workdir, "exported")
    # transformers (not our reader) loads the export, with the five functional tokens in its tokenizer.
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok.convert_tokens_to_ids(["<|Manip|>", "<|Line|>", "<|Arrow|>", "<|Shape|>", "<|Text|>"])
    assert len(set(ids)) == 5 and all(i != tok.unk_token_id for i in ids)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)
    assert model.config.text_config.vocab_size > max(ids)
    # New rows start as the mean of their descriptive words' embeddings, not at random: not all zero, finite.
    emb = model.get_input_embeddings().weight.detach().numpy()
    assert np.isfinite(emb[ids]).all() and (np.abs(emb[ids]).sum(axis=1) > 0).all()
