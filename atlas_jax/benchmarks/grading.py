"""Grading a completion against a benchmark question: the answer in its last `\\boxed{...}`.

Rules, in order (the first that reads the answer decides; `Grade.method` says which):
  multiple choice   'letter'       the box holds an option letter ('B', '(B)', 'B. leather');
                    'option_text'  it holds an option's text (case, spaces, LaTeX text wrappers
                                   ignored), or, for a mathematical option, an equivalent number
                                   or expression (`math_verify`, e.g. 1/2 for option '0.5');
  free-form         'math_verify'  a mathematical reference: equivalent number / expression;
                    'exact'        otherwise equal text (normalised as above);
  neither           'judge'        the configured LLM-as-judge decides (`load_judge`), else the
                    'unread'       answer counts as wrong; no box at all is 'no_box' (or 'judge').
`math_verify` (the grader TRL uses) replaces hand-written normalisation for mathematics;
option letters and texts reuse the RL reward's reading (`rewards.answers_match`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable

from math_verify import parse, verify

from atlas_jax.benchmarks.loaders import BenchmarkItem
from atlas_jax.model.config import ConfigError
from atlas_jax.rl.rewards import answers_match, extract_boxed

Judge = Callable[[str, str, str], bool]  # (question, reference, prediction) -> correct
_MATHEMATICAL = re.compile(r"[\d\\]")  # a digit or a LaTeX command; words would parse as products of symbols


@dataclasses.dataclass(frozen=True)
class Grade:
    """correct; predicted: the option letter read, else the boxed text ('' with no box);
    method: the rule that decided (module docstring)."""

    correct: bool
    predicted: str
    method: str


def grade(completion: str, item: BenchmarkItem, judge: Judge | None = None, *, question: str = "") -> Grade:
    """Grades `completion` (decoded text) for `item`; `question` is what the judge is shown."""
    boxed = extract_boxed(completion)
    if boxed is None:
        return _judged(judge, question, item, completion, "") if judge else Grade(False, "", "no_box")
    boxed = boxed.strip()
    if item.options:
        letter, method = _read_option(boxed, item.options)
        if letter:
            return Grade(letter == item.answer, letter, method)
    elif _is_mathematical(item.answer):
        return Grade(_equivalent(boxed, item.answer), boxed, "math_verify")
    elif answers_match(boxed, item.answer, "exact"):
        return Grade(True, boxed, "exact")
    return _judged(judge, question, item, boxed, boxed) if judge else Grade(False, boxed, "unread")


def _read_option(boxed: str, options: tuple[str, ...]) -> tuple[str, str]:
    """(letter, method) of the option the boxed answer names, or ('', '')."""
    letters = [chr(65 + k) for k in range(len(options))]
    for letter in letters:
        if answers_match(boxed, letter, "choice"):
            return letter, "letter"
    for letter, text in zip(letters, options):
        if answers_match(boxed, text, "exact"):
            return letter, "option_text"
    for letter, text in zip(letters, options):
        if _is_mathematical(text) and _is_mathematical(boxed) and _equivalent(boxed, text):
            return letter, "option_text"
    return "", ""


def _is_mathematical(text: str) -> bool:
    return bool(_MATHEMATICAL.search(text))


def _equivalent(predicted: str, reference: str) -> bool:
    """math_verify's equivalence of two answers written as LaTeX or plain numbers."""
    gold, pred = parse(_as_math(reference)), parse(_as_math(predicted))
    return bool(gold and pred and verify(gold, pred))


def _as_math(text: str) -> str:
    return text if "$" in text else f"${text}$"


def _judged(judge: Judge, question: str, item: BenchmarkItem, prediction: str, predicted: str) -> Grade:
    verdict = judge(question, item.reference(), prediction)
    if not isinstance(verdict, bool):
        raise TypeError(f"the benchmark judge returned {verdict!r} for {item.uid} ({item.source}, {item.row}); expected True or False")
    return Grade(verdict, predicted, "judge")


def load_judge(spec: str) -> Judge:
    """The function 'package.module:function' named by config `benchmark.judge`, imported and
    checked to accept (question, reference, prediction) before any work starts."""
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config.benchmark.judge={spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    try:
        inspect.signature(fn).bind("question", "reference", "prediction")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.benchmark.judge={spec!r}: expected a function (question, reference, prediction) -> bool; {e}") from None
    return fn
