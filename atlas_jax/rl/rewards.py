"""Verifiable rewards for LA-GRPO rollouts: pure Python over completion text and token ids.

Every reward function has the `RewardFunction` signature

    fn(completion_text, answer, token_ids, /, *, task, functional_ids) -> float

where token_ids are the completion's sampled ids (no prompt, no padding) and functional_ids the
vocabulary ids of the functional tokens. A function that also takes the keyword
`expected_functional_ids` is given, per completion, the ids of the functional tokens its record
names in `ops` (user data; () when it names none); others are called exactly as above. Extra
knobs are keyword arguments with defaults; bind them with functools.partial. `combine` evaluates
a weighted set of them over a rollout batch and turns any failure into a `RewardError` that names
the function and the sample (or, with on_error='zero', a counted 0), never a silent zero.
`load_reward` imports a user's function from 'package.module:function=weight' (config
`rl.custom_rewards`) and checks its signature.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import numpy as np


class RewardFunction(Protocol):
    def __call__(
        self,
        completion_text: str,
        answer: str,
        token_ids: Sequence[int],
        /,
        *,
        task: str,
        functional_ids: Sequence[int],
    ) -> float: ...


class RewardError(RuntimeError):
    """A reward function raised, or returned something that is not a finite real number."""

    def __init__(self, reward_name: str, sample_index: int, task: str, completion: str, problem: str):
        self.reward_name, self.sample_index, self.task, self.problem = reward_name, sample_index, task, problem
        snippet = completion if len(completion) <= 120 else completion[:60] + " ... " + completion[-55:]
        self.completion_snippet = snippet
        super().__init__(
            f"reward function {reward_name!r} failed on sample {sample_index} "
            f"(task {task!r}, completion {snippet!r}): {problem}"
        )


# ---------------------------------------------------------------------------- boxed answers

_BOXED = re.compile(r"\\boxed\s*\{")


def _boxed_spans(text: str) -> tuple[list[tuple[int, int, str]], bool]:
    """All top-level `\\boxed{...}` in order as (start, end, content), and whether one is unclosed.
    Braces nest; LaTeX-escaped braces `\\{` `\\}` are literal characters, not grouping."""
    spans, pos = [], 0
    while (m := _BOXED.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\":
                i += 2  # skip the escaped character (\{, \}, \\)
                continue
            depth += ch == "{"
            depth -= ch == "}"
            i += 1
        if depth:
            return spans, True
        spans.append((m.start(), i, text[m.end() : i - 1]))
        pos = i
    return spans, False


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in text (nested braces kept), or None."""
    spans, _ = _boxed_spans(text)
    return spans[-1][2] if spans else None


# ---------------------------------------------------------------------------- answer parsing

_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION_LATEX = re.compile(rf"^([+-]?)\\[dt]?frac\s*\{{\s*({_NUMBER})\s*\}}\s*\{{\s*({_NUMBER})\s*\}}$")
_FRACTION_SLASH = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_THOUSANDS = re.compile(r"^([+-]?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_UNITS = (
    "mm", "cm", "m", "km", "mm^2", "cm^2", "m^2", "km^2", "cm^3", "m^3", "mm²", "cm²", "m²", "cm³",
    "g", "kg", "s", "sec", "seconds", "min", "minutes", "h", "hours", "deg", "degree", "degrees",
    "unit", "units", "square units", "dollars", "people", "objects", "items",
)  # fmt: skip
_UNIT_SUFFIX = re.compile(r"\s*(?:" + "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True)) + r")\.?$")


def _strip_latex(s: str) -> str:
    s = s.strip()
    for _ in range(3):  # unwrap nested \text{\textbf{..}}
        s = _LATEX_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\$", "").replace("$", "")
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    return s.strip()


def _normalise_text(s: str) -> str:
    s = _strip_latex(s).rstrip(".").strip()
    return " ".join(s.lower().split())


def _parse_number(s: str) -> tuple[float, bool] | None:
    """(value, is_percent) for an int, decimal, thousands-separated number, fraction (3/4,
    \\frac{3}{4}), percentage (75%, 75\\%) or one of those with a common unit or degree sign."""
    s = _strip_latex(s).rstrip(".").strip()
    s = re.sub(r"\^\s*\{?\\circ\}?$|°$", "", s).strip()
    s = _UNIT_SUFFIX.sub("", s).strip()
    percent = s.endswith("%")
    if percent:
        s = s.rstrip("%").rstrip("\\").strip()
    if m := _THOUSANDS.match(s):
        s = m.group(1) + m.group(2).replace(",", "") + (m.group(3) or "")
    if re.fullmatch(_NUMBER, s):
        return float(s), percent
    if m := _FRACTION_SLASH.match(s):
        num, den = float(m.group(1)), float(m.group(2))
    elif m := _FRACTION_LATEX.match(s):
        num, den = float(m.group(1) + m.group(2)), float(m.group(3))
    else:
        return None
    if den == 0:
        return None
    return num / den, percent


_CHOICE_FORMS = (
    re.compile(r"^\(?([A-Za-z])\)?[.:]?$"),  # B  (B)  B.  b)
    re.compile(r"^(?:option|choice|answer)\s*:?\s*\(?([A-Za-z])\)?[.:]?$", re.IGNORECASE),  # option B
    re.compile(r"^\(([A-Za-z])\)\s*\S.*$"),  # (B) 12 cm
    re.compile(r"^([A-Z])[.:)]\s+\S.*$"),  # B. 12 cm  B) 12 cm
)


def _parse_choice(s: str) -> str | None:
    """The option letter, upper-cased, of a multiple-choice answer in a common form, or None."""
    s = _strip_latex(s)
    for form in _CHOICE_FORMS:
        if m := form.match(s):
            return m.group(1).upper()
    return None


def _is_choice_reference(answer: str) -> bool:
    """auto mode treats a reference as multiple choice only when its letter is upper-case in one
    of the choice forms ('B', '(B)', 'B. 12 cm'); a lower-case 'a' may be a word or a variable.
    An upper-case point or node name ('D') is compared the same way, which is what it needs."""
    letter = _parse_choice(answer)
    return letter is not None and letter in _strip_latex(answer)


def _numbers_match(pred: tuple[float, bool], ref: tuple[float, bool], rel_tol: float, abs_tol: float) -> bool:
    # A percentage may be written as its value (75%) or its fraction (0.75): accept either.
    pred_values = (pred[0], pred[0] / 100) if pred[1] else (pred[0],)
    ref_values = (ref[0], ref[0] / 100) if ref[1] else (ref[0],)
    return any(math.isclose(p, r, rel_tol=rel_tol, abs_tol=abs_tol) for p in pred_values for r in ref_values)


def answers_match(
    predicted: str, answer: str, mode: str = "auto", rel_tol: float = 1e-4, abs_tol: float = 1e-8
) -> bool:
    """Whether a predicted answer string equals the reference.

    mode 'exact': equal after normalisation (LaTeX text wrappers and $ removed, case folded,
    whitespace collapsed, trailing period dropped). 'numeric': exact, or both parse as numbers within
    rel_tol / abs_tol. 'choice': the same option letter. 'auto': choice when the reference is an
    option letter, numeric when it parses as a number, exact otherwise.
    """
    if mode not in ("auto", "exact", "numeric", "choice"):
        raise ValueError(f"mode={mode!r}; expected 'auto', 'exact', 'numeric' or 'choice'")
    if mode == "auto":
        mode = "choice" if _is_choice_reference(answer) else "numeric" if _parse_number(answer) else "exact"
    if mode == "choice":
        letter = _parse_choice(answer)
        if letter is None:
            raise ValueError(f"reference answer {answer!r} is not a multiple-choice option letter (mode='choice')")
        return _parse_choice(predicted) == letter
    if _normalise_text(predicted) == _normalise_text(answer):
        return True
    if mode == "numeric":
        ref, pred = _parse_number(answer), _parse_number(predicted)
        if ref is None:
            raise ValueError(f"reference answer {answer!r} is not a number (mode='numeric')")
        return pred is not None and _numbers_match(pred, ref, rel_tol, abs_tol)
    return False


# ---------------------------------------------------------------------------- reward functions


def accuracy_reward(
    completion: str,
    answer: str,
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
    mode: str = "auto",
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-8,
) -> float:
    """1.0 when the last \\boxed{...} of the completion matches the reference answer (see
    `answers_match`), else 0.0; no box is 0.0."""
    predicted = extract_boxed(completion)
    if predicted is None:
        return 0.0
    return float(answers_match(predicted, answer, mode, rel_tol, abs_tol))


# What may follow the box and still count as "nothing after it": whitespace, a closing math
# delimiter, a full stop, and end-of-turn markers when decoding kept special tokens.
_ALLOWED_TAIL = re.compile(r"^(?:\s|\$|\\\]|\\\)|\.|<\|im_end\|>|<\|endoftext\|>)*$")


def format_reward(
    completion: str,
    answer: str = "",
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
    min_reasoning_chars: int = 1,
) -> float:
    """1.0 when the completion is reasoning followed by exactly one non-empty \\boxed{...} at the
    very end (nothing but whitespace, '.', a closing math delimiter or an end-of-turn marker
    after it), else 0.0."""
    spans, unclosed = _boxed_spans(completion)
    if unclosed or len(spans) != 1:
        return 0.0
    start, end, content = spans[0]
    if not content.strip() or not _ALLOWED_TAIL.match(completion[end:]):
        return 0.0
    reasoning = re.sub(r"(?:\$|\\\[|\\\()+\s*$", "", completion[:start].rstrip()).strip()
    return float(len(reasoning) >= min_reasoning_chars)


def _functional_set(functional_ids: Sequence[int]) -> frozenset[int]:
    ids = frozenset(int(i) for i in functional_ids)
    if not ids:
        raise ValueError("functional_ids is empty; the reward needs the vocabulary ids of the functional tokens")
    return ids


def functional_usage_reward(
    completion: str,
    answer: str = "",
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
) -> float:
    """1.0 when the completion's token ids contain at least one functional token, else 0.0."""
    ids = _functional_set(functional_ids)
    return float(any(int(t) in ids for t in token_ids))


def expected_usage_reward(
    expected_by_task: Mapping[str, Collection[int]], other_token_credit: float = 0.5
) -> RewardFunction:
    """A usage reward that knows which functional token each sample calls for.

    expected_by_task: task name -> ids of the functional tokens that task's operation needs (e.g.
    'shape_count' -> {id of <|Shape|>}). The returned function gives 1.0 for using an expected
    token, other_token_credit for using only other functional tokens, 0.0 for none. The expected
    tokens are the record's own (`expected_functional_ids`, from a JSONL record's `ops`) when it
    names any, else its task's; a sample with neither falls back to `functional_usage_reward`.
    """
    table = {task: frozenset(int(i) for i in ids) for task, ids in expected_by_task.items()}
    empty = [task for task, ids in table.items() if not ids]
    if empty:
        raise ValueError(f"expected_by_task has no token ids for tasks {empty}")

    def expected_usage(completion, answer, token_ids, /, *, task, functional_ids, expected_functional_ids=()):
        used = {int(t) for t in token_ids} & _functional_set(functional_ids)
        expected = frozenset(int(i) for i in expected_functional_ids) or table.get(task)
        if expected is None:
            return float(bool(used))
        return 1.0 if used & expected else other_token_credit if used else 0.0

    return expected_usage


def verbosity_penalty(
    completion: str,
    answer: str = "",
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
    budget: int = 768,
    per_token: float | None = None,
    max_penalty: float = 1.0,
) -> float:
    """0 up to `budget` completion tokens, then linearly negative: -per_token * (len - budget),
    floored at -max_penalty. per_token defaults to 1 / budget (-1 at twice the budget)."""
    slope = 1.0 / budget if per_token is None else per_token
    return -min(max_penalty, slope * max(0, len(token_ids) - budget))


def spam_penalty(
    completion: str,
    answer: str = "",
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
    max_functional: int = 4,
    per_excess: float = 0.25,
    per_repeat: float = 0.25,
    max_penalty: float = 1.0,
    gap_ids: Collection[int] = (),
) -> float:
    """Negative for functional-token spam: per_excess for each functional token beyond
    max_functional, per_repeat for each functional token that directly follows another one (only
    ids in gap_ids, e.g. whitespace, may sit between and still count as back-to-back); floored at
    -max_penalty. A trajectory should say what it does before each operation, so adjacent
    functional tokens carry no reasoning."""
    ids, gaps = _functional_set(functional_ids), frozenset(int(i) for i in gap_ids)
    count = repeats = 0
    previous_functional = False
    for t in map(int, token_ids):
        if t in ids:
            count += 1
            repeats += previous_functional
            previous_functional = True
        elif t not in gaps:
            previous_functional = False
    return -min(max_penalty, per_excess * max(0, count - max_functional) + per_repeat * repeats)


def overlong_penalty(
    completion: str,
    answer: str = "",
    token_ids: Sequence[int] = (),
    /,
    *,
    task: str = "",
    functional_ids: Sequence[int] = (),
    max_length: int = 96,
    buffer: int = 16,
    penalty: float = 1.0,
) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer completion tokens, then linear
    down to -penalty at max_length (and beyond). max_length: the sampler's max_new_tokens."""
    excess = len(token_ids) - (max_length - buffer)
    return -penalty * min(1.0, max(0, excess) / buffer)


# Paper: correctness + functional-token usage + format, minus verbosity and spam penalties (the
# penalty functions return values <= 0, so every weight is positive). Correctness dominates so
# that usage and format bonuses cannot outweigh a wrong answer.
DEFAULT_REWARDS: Mapping[str, tuple[float, RewardFunction]] = types.MappingProxyType(
    {
        "accuracy": (1.0, accuracy_reward),
        "functional_usage": (0.2, functional_usage_reward),
        "format": (0.2, format_reward),
        "verbosity": (0.5, verbosity_penalty),
        "spam": (0.5, spam_penalty),
    }
)


# ---------------------------------------------------------------------------- user rewards


def load_reward(spec: str) -> tuple[str, float, RewardFunction]:
    """(name, weight, fn) of 'package.module:function=weight' (weight defaults to 1): the function
    imported and checked to accept `RewardFunction`'s arguments. Raises ValueError naming the entry."""
    path, _, weight_text = spec.partition("=")
    module_name, _, name = path.strip().partition(":")
    try:
        weight = float(weight_text) if weight_text.strip() else 1.0
    except ValueError:
        raise ValueError(f"{spec!r}: the weight {weight_text!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"{spec!r}: the weight must be finite")
    if not module_name or not name:
        raise ValueError(f"{spec!r}: expected 'package.module:function=weight'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    try:
        inspect.signature(fn).bind("completion", "answer", [1], task="task", functional_ids=(1,))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec!r}: expected fn(completion_text, answer, token_ids, /, *, task, functional_ids) -> float; {e}") from None
    return path.strip(), weight, fn


# ---------------------------------------------------------------------------- combine


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` can be called with the keyword argument `name` (it names it, or takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called the documented way only
        return False
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind == p.VAR_KEYWORD or (p.name == name and p.kind in kinds) for p in params)


def _as_reward_value(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"returned {value!r} of type {type(value).__name__}; expected a float")
    if not math.isfinite(value):
        raise ValueError(f"returned {value!r}; expected a finite float")
    return float(value)


def combine(
    rewards: Mapping[str, tuple[float, Callable[..., float]]],
    completions: Sequence[str],
    answers: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    tasks: Sequence[str] | None,
    functional_ids: Sequence[int],
    on_error: str = "raise",
    expected_functional_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Weighted sum of reward functions over N completions.

    rewards: name -> (weight, RewardFunction). completions / answers / token_ids / tasks: one per
    completion (answers and tasks repeated for each of a prompt's G completions); tasks None means
    '' for all. functional_ids: vocabulary ids of the functional tokens.
    expected_functional_ids: one per completion, the ids of the functional tokens its record names
    (`ops`; () for none), passed to the functions that accept that keyword; None passes nothing.
    Returns (total float32[N] = sum_k weight_k * value_k, {name: unweighted float32[N]},
    {name: samples on which it failed}).
    A function that raises or returns a non-float / NaN / inf raises RewardError naming the
    function, the sample and a snippet of its completion (on_error='raise'), or scores 0 there and
    is counted (on_error='zero').
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'zero'")
    n = len(completions)
    tasks = [""] * n if tasks is None else tasks
    sequences = [("answers", answers), ("token_ids", token_ids), ("tasks", tasks)]
    if expected_functional_ids is not None:
        sequences.append(("expected_functional_ids", expected_functional_ids))
    for name, seq in sequences:
        if len(seq) != n:
            raise ValueError(f"combine: {name} has {len(seq)} entries; expected {n}, one per completion")
    for name, entry in rewards.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1])):
            raise ValueError(f"rewards[{name!r}] = {entry!r}; expected a (weight, reward function) pair")
        if isinstance(entry[0], bool) or not isinstance(entry[0], (int, float)) or not math.isfinite(entry[0]):
            raise ValueError(f"rewards[{name!r}] weight {entry[0]!r}; expected a finite float")
    functional_ids = tuple(int(i) for i in functional_ids)
    total = np.zeros(n, np.float64)
    per_function, errors = {}, {}
    for name, (weight, fn) in rewards.items():
        values = np.zeros(n, np.float64)
        errors[name] = 0
        with_expected = expected_functional_ids is not None and accepts_keyword(fn, "expected_functional_ids")
        for i in range(n):
            extra = {"expected_functional_ids": tuple(expected_functional_ids[i])} if with_expected else {}
            try:
                values[i] = _as_reward_value(
                    fn(completions[i], answers[i], token_ids[i], task=tasks[i], functional_ids=functional_ids, **extra)
                )
            except Exception as e:  # noqa: BLE001 - re-raised with the reward and sample named, or counted
                if on_error == "raise":
                    raise RewardError(name, i, tasks[i], completions[i], f"{type(e).__name__}: {e}") from e
                errors[name] += 1
        per_function[name] = values.astype(np.float32)
        total += weight * values
    return total.astype(np.float32), per_function, errors
