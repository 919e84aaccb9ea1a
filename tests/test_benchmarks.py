"""The paper's benchmarks from fixture files in their public releases' layouts: loading, bad rows,
grading, tables, and the benchmark job end to end with a tiny random model on 8 fake devices."""

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from atlas_jax import main as entry, run_config
from atlas_jax.benchmarks import grading, loaders, tables
from atlas_jax.benchmarks.protocol import PROMPT_SUFFIX, BenchmarkConfig
from atlas_jax.data.sample import BadRecordError
from atlas_jax.model.config import ConfigError
from hf_tokenizer_fixture import hf_tokenizer_path  # noqa: F401

VSTAR_TEXT = "What is the color of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter from the given choices directly."


def _png(color: str, size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_vstar(root, rows=None) -> str:
    d = root / "vstar_bench"
    for category in ("direct_attributes", "relative_position"):
        (d / category).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            (d / category / f"sa_{k}.jpg").write_bytes(_png("red"))
    rows = rows or [
        {"image": f"{cat}/sa_{k}.jpg", "text": VSTAR_TEXT, "category": cat, "question_id": 2 * i + k, "label": "AB"[k]}
        for i, cat in enumerate(("direct_attributes", "relative_position")) for k in range(2)
    ]
    (d / "test_questions.jsonl").write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(d)


def write_wemath(root, rows=None) -> str:
    d = root / "wemath"
    (d / "1steps" / "image").mkdir(parents=True, exist_ok=True)
    (d / "1steps" / "image" / "1.png").write_bytes(_png("blue"))
    row = {"ID": "1steps_1", "split": "testmini", "knowledge concept": "Area of Circles", "question": "What is the area?",
           "option": "A. 200.96;B. 0.5; C. 6280", "answer": "B", "image_path": "1steps/image/1.png", "key": "1steps_1"}
    rows = rows or [row, {**row, "ID": "2steps_4", "answer": "A"}]
    (d / "testmini.json").write_text(json.dumps(rows))
    return str(d / "testmini.json")


def write_blink(root, subsets=("Counting", "Jigsaw"), answer="(B)", image_2=True) -> str:
    d = root / "BLINK"
    for subset in subsets:
        (d / subset).mkdir(parents=True, exist_ok=True)
        rows = [{
            "idx": f"val_{subset}_{k}", "question": "How many?", "sub_task": subset,
            "prompt": "Look at the first image and the second image.\nSelect from the following choices.\n(A) 1\n(B) 2",
            "choices": ["1", "2"], "answer": answer, "explanation": "",
            "image_1": {"bytes": _png("green"), "path": "a.png"},
            "image_2": {"bytes": _png("white"), "path": "b.png"} if image_2 else None,
            "image_3": None, "image_4": None,
        } for k in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), d / subset / "val-00000-of-00001.parquet")
    return str(d)


# ---------------------------------------------------------------------------- loading
def test_release_layouts_load_with_the_protocol_prompt(tmp_path):
    vstar, wemath, blink = write_vstar(tmp_path), write_wemath(tmp_path), write_blink(tmp_path)
    found = loaders.load(BenchmarkConfig(vstar=vstar, wemath=wemath, blink=blink, blink_subsets=("Counting", "Jigsaw"), limit=1))
    assert {k: [(it.subset, it.answer) for it in v] for k, v in found.items()} == {
        "vstar": [("direct_attributes", "A"), ("relative_position", "A")],
        "wemath": [("1steps", "B"), ("2steps", "A")],
        "blink": [("Counting", "B"), ("Jigsaw", "B")],
    }
    v, w, b = found["vstar"][0], found["wemath"][0], found["blink"][0]
    assert v.question(PROMPT_SUFFIX) == "What is the color of the cup?\n(A) red\n(B) blue\n" + PROMPT_SUFFIX
    assert w.options == ("200.96", "0.5", "6280") and w.reference() == "(B) 0.5"
    assert b.stem == "Look at the first image and the second image.\nSelect from the following choices."
    assert [im.size for im in b.load_images()] == [(56, 56), (56, 56)]
    assert len(loaders.load(BenchmarkConfig(vstar=vstar))["vstar"]) == 4


def test_wemath_rows_as_released_parse(tmp_path):
    """Two rows of the authors' data/testmini.json (github.com/We-Math/We-Math), field for field:
    options with commas, uneven spacing and a ';' inside the last option's text."""
    released = [
        {"ID": "2steps_2", "split": "testmini", "knowledge concept": "Conversion Rates and Calculations Between Length Units",
         "question": "According to the diagram, observe the distances in the image, a = ( ) m, b = ( ) m, c = ( ) m.",
         "option": "A. 3, 5, 4; B. 3, 50, 40; C. 300, 50, 40; D. 30, 50, 40.; E. No correct answer", "answer": "A",
         "image_path": "1steps/image/1.png", "key": "2steps_1", "question number": 2, "knowledge concept description": "..."},
        {"ID": "2steps_9", "split": "testmini", "knowledge concept": "Left-Right Position",
         "question": "As shown in the diagram, the block to the right of H is ( ).",
         "option": "A. F;    B. D;    C. B;    D. I; E. No correct answer", "answer": "D",
         "image_path": "1steps/image/1.png", "key": "2steps_1", "question number": 9, "knowledge concept description": "..."},
    ]
    a, b = loaders.load(BenchmarkConfig(wemath=write_wemath(tmp_path, released)))["wemath"]
    assert (a.subset, a.options, a.answer) == ("2steps", ("3, 5, 4", "3, 50, 40", "300, 50, 40", "30, 50, 40.", "No correct answer"), "A")
    assert (b.options, b.answer, b.reference()) == (("F", "D", "B", "I", "No correct answer"), "D", "(D) I")


@pytest.mark.parametrize("case, field, where", [
    ("bad_json", "<record>", "line 2"),
    ("no_label", "label", "line 1"),
    ("label_out_of_range", "label", "line 1"),
    ("missing_image", "image", "line 1"),
    ("wemath_options", "option", "row 1"),
    ("blink_hidden_answer", "answer", "row 1"),
    ("truncated_image", "images[0]", "line 1"),
])
def test_bad_rows_name_the_file_the_row_and_the_field(tmp_path, case, field, where):
    row = {"image": "direct_attributes/sa_0.jpg", "text": VSTAR_TEXT, "category": "direct_attributes", "question_id": 0, "label": "A"}
    if case == "bad_json":
        cfg = BenchmarkConfig(vstar=write_vstar(tmp_path, [row, "{not json\n"]))
    elif case in ("no_label", "label_out_of_range", "missing_image", "truncated_image"):
        broken = {"no_label": {k: v for k, v in row.items() if k != "label"}, "label_out_of_range": {**row, "label": "C"},
                  "missing_image": {**row, "image": "nowhere.jpg"}, "truncated_image": row}[case]
        cfg = BenchmarkConfig(vstar=write_vstar(tmp_path, [broken]))
        if case == "truncated_image":
            (tmp_path / "vstar_bench" / "direct_attributes" / "sa_0.jpg").write_bytes(_png("red")[:60])
    elif case == "wemath_options":
        cfg = BenchmarkConfig(wemath=write_wemath(tmp_path, [{"ID": "1steps_1", "question": "?", "option": "B. 1;A. 2",
                                                               "answer": "A", "image_path": "1steps/image/1.png"}]))
    else:
        cfg = BenchmarkConfig(blink=write_blink(tmp_path, ("Counting",), answer="hidden"), blink_subsets=("Counting",))
    with pytest.raises(BadRecordError) as e:
        [item.load_images() for items in loaders.load(cfg).values() for item in items]
    assert e.value.field == field and e.value.record == where
    assert e.value.source.endswith((".jsonl", ".json", ".parquet")) and os.path.isfile(e.value.source)


def test_a_missing_blink_subset_names_the_expected_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Jigsaw/val-\*\.parquet"):
        loaders.load(BenchmarkConfig(blink=write_blink(tmp_path, ("Counting",)), blink_subsets=("Counting", "Jigsaw")))


# ---------------------------------------------------------------------------- grading
def _item(options=("red", "0.5", "leather"), answer="B"):
    return loaders.BenchmarkItem("t", "s", "t/0", "Which?", options, answer, (), "f.jsonl", "line 1")


@pytest.mark.parametrize("completion, correct, predicted, method", [
    ("so \\boxed{B}", True, "B", "letter"),
    ("\\boxed{(B)}", True, "B", "letter"),
    ("\\boxed{A. red}", False, "A", "letter"),
    ("\\boxed{Leather}", False, "C", "option_text"),
    ("\\boxed{\\frac{1}{2}}", True, "B", "option_text"),
    ("\\boxed{purple}", False, "purple", "unread"),
    ("no box at all", False, "", "no_box"),
])
def test_multiple_choice_grading(completion, correct, predicted, method):
    assert grading.grade(completion, _item()) == grading.Grade(correct, predicted, method)


def test_free_form_grading_uses_math_verify_then_text_then_the_judge():
    assert grading.grade("\\boxed{\\frac{1}{2}}", _item((), "0.5")) == grading.Grade(True, "\\frac{1}{2}", "math_verify")
    assert grading.grade("\\boxed{2\\sqrt{3}}", _item((), "\\sqrt{12}")).correct
    assert not grading.grade("\\boxed{0.49}", _item((), "0.5")).correct
    assert grading.grade("\\boxed{The Cat}", _item((), "the cat")) == grading.Grade(True, "The Cat", "exact")
    seen = []

    def judge(question, reference, prediction):
        seen.append((question, reference, prediction))
        return True

    assert grading.grade("\\boxed{a feline}", _item((), "the cat"), judge, question="Q?") == grading.Grade(True, "a feline", "judge")
    assert grading.grade("\\boxed{purple}", _item(), judge, question="Q?").method == "judge"
    assert seen == [("Q?", "the cat", "a feline"), ("Q?", "(B) 0.5", "purple")]
    with pytest.raises(TypeError, match="t/0"):
        grading.grade("\\boxed{x}", _item((), "y"), lambda q, r, p: "yes")


def test_the_judge_is_imported_and_checked_before_any_work(tmp_path):
    c = run_config.apply_overrides(run_config.base(), {"job": "benchmark", "benchmark.vstar": write_vstar(tmp_path),
                                                       "benchmark.judge": "os.path:join"})
    run_config.validate(c, 8)  # join(question, reference, prediction) binds
    for spec, problem in (("os.path:nope", "cannot import"), ("math:cos", "expected a function"), ("nomodule", "package.module")):
        with pytest.raises(ConfigError, match=f"benchmark.judge.*{problem}"):
            run_config.validate(run_config.apply_overrides(c, {"benchmark.judge": spec}), 8)
    with pytest.raises(ConfigError, match="benchmark.vstar"):
        run_config.validate(run_config.apply_overrides(c, {"benchmark.vstar": ""}), 8)
    with pytest.raises(ConfigError, match="benchmark.batch_size"):
        run_config.validate(run_config.apply_overrides(c, {"benchmark.batch_size": 6}), 8)


# ---------------------------------------------------------------------------- tables
def test_tables_count_each_subset_and_both_averages():
    samples = [{"subset": s, "correct": c, "functional": {"Line": f}, "length": n}
               for s, c, f, n in (("a", True, 2, 10), ("a", False, 0, 20), ("a", True, 1, 30), ("b", False, 3, 40))]
    rows = {r["subset"]: r for r in tables.table(samples)}
    assert rows["a"] == {"subset": "a", "questions": 3, "accuracy": 2 / 3, "functional_per_completion": 1.0, "mean_length": 20.0}
    assert rows["all"]["accuracy"] == 0.5 and rows["all"]["mean_length"] == 25.0
    assert rows["mean of subsets"]["accuracy"] == pytest.approx(1 / 3)
    md = tables.paper_comparison({"blink": tables.table([{**s, "subset": "Counting"} for s in samples])})
    assert "| ATLAS-LA-GRPO (paper) | 75.4 | 45.0 | 51.3 |" in md
    assert md.splitlines()[-1] == "| this run | - | - | 50.0 | - | 50.0 | - | - | - | - | - |"


# ---------------------------------------------------------------------------- the job
def reference_is_a(question: str, reference: str, prediction: str) -> bool:
    """A judge for the job test: a random model boxes nothing, so every answer goes to the judge."""
    return reference.startswith("(A)")


def test_benchmark_job_tables_agree_with_its_graded_samples(tmp_path, hf_tokenizer_path):  # noqa: F811
    overrides = {"benchmark.judge": f"{__name__}:reference_is_a",
        "job": "benchmark", "mesh": (-1, 1, 1), "tokenizer.path": hf_tokenizer_path, "data.pad_to_multiple": 128,
        "benchmark.vstar": write_vstar(tmp_path), "benchmark.wemath": write_wemath(tmp_path),
        "benchmark.blink": write_blink(tmp_path, ("Counting",)), "benchmark.blink_subsets": ("Counting",),
        "benchmark.max_new_tokens": 6, "benchmark.min_pixels": 3136, "benchmark.max_pixels": 3136, "benchmark.limit": 1,
    }
    workdir = tmp_path / "run"
    results = entry.run_job(run_config.apply_overrides(run_config.base(), overrides), str(workdir))
    assert {k: [(r["subset"], r["questions"], r["accuracy"]) for r in rows] for k, rows in results.items()} == {
        "vstar": [("direct_attributes", 1, 1.0), ("relative_position", 1, 1.0), ("all", 2, 1.0), ("mean of subsets", 2, 1.0)],
        "wemath": [("1steps", 1, 0.0), ("2steps", 1, 1.0), ("all", 2, 0.5), ("mean of subsets", 2, 0.5)],
        "blink": [("Counting", 1, 0.0), ("all", 1, 0.0), ("mean of subsets", 1, 0.0)],
    }
    files = BenchmarkConfig(**{name: overrides[f"benchmark.{name}"] for name in ("vstar", "wemath", "blink", "blink_subsets")})
    items = {it.uid: it for its in loaders.load(files).values() for it in its}
    for name in results:
        saved = json.loads((workdir / "benchmarks" / f"{name}.json").read_text())
        samples = saved["samples"]
        assert saved["table"] == tables.table(samples) == results[name]
        assert saved["protocol"]["prompt_suffix"] == PROMPT_SUFFIX and saved["protocol"]["max_new_tokens"] == 6
        for s in samples:
            assert s["question"].endswith(PROMPT_SUFFIX) and 0 <= s["length"] <= 6
            assert s["stopped"] or s["length"] == 6
            graded = grading.grade(s["completion"], items[s["uid"]], reference_is_a, question=s["question"])
            assert (graded.correct, graded.predicted, graded.method) == (s["correct"], s["predicted"], s["method"])
        assert tables.markdown(results[name]) in (workdir / "benchmarks" / f"{name}.md").read_text()
    summary = (workdir / "benchmarks" / "summary.md").read_text()
    assert "| ATLAS-SFT (paper) | 77.5 | 28.9 |" in summary and "| this run |" in summary
