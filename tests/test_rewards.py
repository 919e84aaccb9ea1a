"""Reward functions on hand-written completions, `combine` weighting, and RewardError."""

import functools
import math

import numpy as np
import pytest

from atlas_jax.rl.rewards import (
    DEFAULT_REWARDS,
    RewardError,
    accuracy_reward,
    answers_match,
    combine,
    expected_usage_reward,
    extract_boxed,
    format_reward,
    functional_usage_reward,
    load_reward,
    overlong_penalty,
    spam_penalty,
    verbosity_penalty,
)

LINE, SHAPE, ARROW = 151665, 151666, 151667  # ids of three functional tokens in the vocabulary
FUNCTIONAL = (LINE, SHAPE, ARROW)
KW = dict(task="", functional_ids=FUNCTIONAL)


# ---------------------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so the area is \boxed{12}", "12"),
        (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"first \boxed{1}, then \boxed{ 2 }.", " 2 "),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are literal, not grouping
        (r"\boxed {x^{2}+1}", "x^{2}+1"),
        (r"\boxed{a{b}c{d{e}}}", "a{b}c{d{e}}"),
        ("no box here", None),
        (r"\boxed{12", None),  # unclosed
        (r"\boxed{7} then \boxed{8", "7"),  # the last *complete* box
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------------------- correctness


def boxed(answer, before="I count the dots <|Shape|> so the answer is "):
    return before + r"\boxed{" + answer + "}"


@pytest.mark.parametrize(
    "predicted,answer",
    [
        ("12", "12"),
        ("12.0", "12"),
        ("0.75", "3/4"),
        (r"\frac{3}{4}", "0.75"),
        (r"\dfrac{-1}{2}", "-0.5"),
        ("-\\frac{1}{2}", "-1/2"),
        ("75%", "0.75"),
        (r"75\%", "75"),
        ("1,000", "1000"),
        ("3.14159", "3.14159265"),  # relative error 8e-7 < 1e-4
        ("5 cm", "5"),
        (r"45^\circ", "45"),
        (r"\text{7}", "7"),
        ("  Red   Square ", "red square"),
        ("Paris.", "paris"),
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("option B", "B"),
        ("Option (C)", "C"),
        ("(D) 12 cm", "D"),
        ("A", "(A)"),
        ("C) triangle", "C. triangle"),
    ],
)
def test_accuracy_correct(predicted, answer):
    assert accuracy_reward(boxed(predicted), answer) == 1.0


@pytest.mark.parametrize(
    "predicted,answer",
    [
        ("13", "12"),
        ("12.01", "12"),  # relative error 8e-4 > 1e-4
        ("0.7", "3/4"),
        ("-12", "12"),
        ("C", "B"),
        ("(A)", "B"),
        ("option D", "B"),
        ("blue square", "red square"),
        ("", "12"),
        ("12 apples or 13", "12"),
        ("1/0", "0"),
    ],
)
def test_accuracy_incorrect(predicted, answer):
    assert accuracy_reward(boxed(predicted), answer) == 0.0


def test_accuracy_uses_the_last_box_and_needs_one():
    assert accuracy_reward(r"maybe \boxed{3}, no: \boxed{4}", "4") == 1.0
    assert accuracy_reward(r"maybe \boxed{4}, no: \boxed{3}", "4") == 0.0
    assert accuracy_reward("the answer is 4", "4") == 0.0
    assert accuracy_reward(r"\boxed{4", "4") == 0.0


def test_accuracy_modes_and_tolerance():
    assert accuracy_reward(boxed("12.01"), "12", mode="numeric", rel_tol=1e-2) == 1.0
    assert accuracy_reward(boxed("1e-3"), "0.001") == 1.0
    # exact mode never parses numbers; choice mode never compares text.
    assert accuracy_reward(boxed("12.0"), "12", mode="exact") == 0.0
    assert accuracy_reward(boxed("(B) 7"), "B. 9", mode="choice") == 1.0
    # A lower-case one-letter reference is a word in auto mode, an option letter in choice mode.
    assert accuracy_reward(boxed("(a)"), "a") == 0.0
    assert accuracy_reward(boxed("(a)"), "a", mode="choice") == 1.0
    with pytest.raises(ValueError, match="not a number"):
        accuracy_reward(boxed("3"), "three", mode="numeric")
    with pytest.raises(ValueError, match="mode"):
        answers_match("3", "3", mode="fuzzy")


def test_numeric_values_against_fractions_module():
    from fractions import Fraction

    for num, den in [(3, 4), (-7, 8), (22, 7), (1, 3)]:
        value = float(Fraction(num, den))
        assert answers_match(f"{num}/{den}", repr(value))
        assert answers_match(rf"\frac{{{num}}}{{{den}}}", f"{value:.6f}")
        assert not answers_match(f"{num}/{den}", repr(value + 0.01))


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion,expected",
    [
        (r"The region holds 3 dots. \boxed{3}", 1.0),
        (r"The region holds 3 dots, so $\boxed{3}$.", 1.0),
        ("The region holds 3 dots. \\boxed{3}\n<|im_end|>", 1.0),
        (r"Reasoning \[\boxed{3}\]", 1.0),
        (r"\boxed{3}", 0.0),  # no reasoning
        (r"$\boxed{3}$", 0.0),  # no reasoning, only a math delimiter
        (r"It is \boxed{3} because of the dots.", 0.0),  # text after the box
        (r"It is \boxed{3} or \boxed{4}", 0.0),  # two boxes
        (r"It is \boxed{}", 0.0),  # empty box
        (r"It is \boxed{3", 0.0),  # unclosed
        ("It is 3", 0.0),  # no box
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "3", (), **KW) == expected


# ---------------------------------------------------------------------------- functional tokens and penalties


def test_functional_usage():
    assert functional_usage_reward("...", "3", [10, 11, SHAPE, 12], **KW) == 1.0
    assert functional_usage_reward("...", "3", [10, 11, 12], **KW) == 0.0
    assert functional_usage_reward("...", "3", np.array([10, LINE]), **KW) == 1.0
    with pytest.raises(ValueError, match="functional_ids is empty"):
        functional_usage_reward("...", "3", [LINE], task="", functional_ids=())


def test_expected_usage_per_task():
    fn = expected_usage_reward({"shape_count": [SHAPE], "line_geometry": [LINE]})
    assert fn("", "", [1, SHAPE, 2], task="shape_count", functional_ids=FUNCTIONAL) == 1.0
    assert fn("", "", [1, ARROW, 2], task="shape_count", functional_ids=FUNCTIONAL) == 0.5
    assert fn("", "", [1, 2], task="shape_count", functional_ids=FUNCTIONAL) == 0.0
    assert fn("", "", [ARROW], task="unknown_task", functional_ids=FUNCTIONAL) == 1.0
    with pytest.raises(ValueError, match="no token ids"):
        expected_usage_reward({"shape_count": []})


def test_expected_usage_prefers_the_records_ops_to_the_task_table():
    fn = expected_usage_reward({"shape_count": [SHAPE]})
    kw = dict(functional_ids=FUNCTIONAL)
    # A record naming <|Line|>: a line is the expected token, a shape only another one, whatever the task.
    assert fn("", "", [1, LINE], task="shape_count", expected_functional_ids=(LINE,), **kw) == 1.0
    assert fn("", "", [1, SHAPE], task="shape_count", expected_functional_ids=(LINE,), **kw) == 0.5
    assert fn("", "", [1, SHAPE], task="", expected_functional_ids=(LINE, SHAPE), **kw) == 1.0
    assert fn("", "", [1, 2], task="", expected_functional_ids=(LINE,), **kw) == 0.0
    # No ops: the task table, then any functional token, as without the keyword.
    assert fn("", "", [ARROW], task="shape_count", expected_functional_ids=(), **kw) == 0.5
    assert fn("", "", [ARROW], task="", expected_functional_ids=(), **kw) == 1.0


def test_combine_passes_expected_ops_only_to_rewards_that_take_them():
    seen = []

    def documented(completion_text, answer, token_ids, /, *, task, functional_ids):
        return 0.25

    def wants_ops(completion_text, answer, token_ids, /, *, task, functional_ids, expected_functional_ids):
        seen.append(expected_functional_ids)
        return float(len(expected_functional_ids))

    def takes_any(completion_text, answer, token_ids, /, **kw):
        return float("expected_functional_ids" in kw)

    rewards = {
        "expected_usage": (1.0, expected_usage_reward({"shape_count": [SHAPE]})),
        "documented": (1.0, documented),
        "ops": (1.0, wants_ops),
        "any": (1.0, takes_any),
        "partial": (1.0, functools.partial(spam_penalty, max_functional=0, per_excess=1.0)),
    }
    token_ids = [[LINE], [SHAPE], [SHAPE]]
    tasks = ["shape_count"] * 3
    expected = [(LINE,), (LINE,), ()]  # two completions of a record that names Line, one of one that names none
    total, parts, _ = combine(rewards, ["c"] * 3, ["1"] * 3, token_ids, tasks, FUNCTIONAL, expected_functional_ids=expected)
    np.testing.assert_array_equal(parts["expected_usage"], [1.0, 0.5, 1.0])  # the record's Line, then the task's Shape
    np.testing.assert_array_equal(parts["documented"], [0.25] * 3)
    np.testing.assert_array_equal(parts["ops"], [1, 1, 0])
    np.testing.assert_array_equal(parts["any"], [1, 1, 1])
    np.testing.assert_array_equal(parts["partial"], [-1, -1, -1])
    np.testing.assert_allclose(total, [1 + 0.25 + 1 + 1 - 1, 0.5 + 0.25 + 1 + 1 - 1, 1 + 0.25 + 0 + 1 - 1])
    assert seen == [(LINE,), (LINE,), ()]
    # Without expected ops nothing extra is passed: today's call, the task table's value.
    _, parts, _ = combine({k: rewards[k] for k in ("expected_usage", "documented", "any")}, ["c"] * 3, ["1"] * 3,
                          token_ids, tasks, FUNCTIONAL)
    np.testing.assert_array_equal(parts["expected_usage"], [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(parts["any"], [0, 0, 0])
    with pytest.raises(ValueError, match="expected_functional_ids has 1 entries"):
        combine(rewards, ["c"] * 3, ["1"] * 3, token_ids, tasks, FUNCTIONAL, expected_functional_ids=[()])


def test_verbosity_penalty_is_linear_beyond_budget():
    penalty = functools.partial(verbosity_penalty, budget=100)
    assert penalty("", "", [0] * 100, **KW) == 0.0
    assert penalty("", "", [0] * 10, **KW) == 0.0
    assert math.isclose(penalty("", "", [0] * 150, **KW), -0.5)
    assert math.isclose(penalty("", "", [0] * 125, **KW), -0.25)
    assert penalty("", "", [0] * 1000, **KW) == -1.0  # floored at -max_penalty
    assert math.isclose(verbosity_penalty("", "", [0] * 110, budget=100, per_token=0.01, **KW), -0.1)


def test_spam_penalty():
    ok = [1, LINE, 2, 3, SHAPE, 4]
    assert spam_penalty("", "", ok, **KW) == 0.0
    # back-to-back: one functional token directly after another.
    assert spam_penalty("", "", [1, LINE, LINE, 2], **KW) == -0.25
    assert spam_penalty("", "", [1, LINE, SHAPE, ARROW, 2], **KW) == -0.5
    # a whitespace id between them still counts as back-to-back only when declared a gap id.
    assert spam_penalty("", "", [LINE, 220, LINE], **KW) == 0.0
    assert spam_penalty("", "", [LINE, 220, LINE], gap_ids=[220], **KW) == -0.25
    # too many: 6 tokens (none adjacent) with a limit of 4 -> 2 * 0.25.
    many = [t for _ in range(6) for t in (LINE, 5)]
    assert spam_penalty("", "", many, **KW) == -0.5
    assert spam_penalty("", "", [LINE] * 40, **KW) == -1.0  # floored


# ---------------------------------------------------------------------------- combine


def test_combine_weights_and_per_function_values():
    completions = [
        r"I outline the region <|Shape|> and count 3 dots. \boxed{3}",  # right, uses, formatted
        r"There are \boxed{4} dots",  # wrong, no token, text after box
        r"I outline it <|Shape|><|Shape|> so \boxed{3}",  # right, spam (back-to-back)
    ]
    token_ids = [[5, SHAPE, 6, 7], [5, 6], [5, SHAPE, SHAPE, 7]]
    total, parts, errors = combine(DEFAULT_REWARDS, completions, ["3", "3", "3"], token_ids, None, FUNCTIONAL)
    np.testing.assert_array_equal(parts["accuracy"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["functional_usage"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["format"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(parts["verbosity"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(parts["spam"], [0.0, 0.0, -0.25])
    weights = {name: w for name, (w, _) in DEFAULT_REWARDS.items()}
    expected = sum(weights[k] * parts[k] for k in parts)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(total, [1.4, 0.0, 1.4 - 0.125], rtol=1e-6)
    assert total.dtype == np.float32 and total.shape == (3,)
    assert errors == {name: 0 for name in DEFAULT_REWARDS}

    custom = {"acc": (2.0, accuracy_reward), "neg": (-1.0, format_reward)}
    total, _, _ = combine(custom, completions, ["3"] * 3, token_ids, ["t"] * 3, FUNCTIONAL)
    np.testing.assert_allclose(total, [1.0, 0.0, 1.0])


def test_reward_error_names_function_and_sample():
    def broken(completion, answer, token_ids, *, task, functional_ids):
        if "boom" in completion:
            raise KeyError("missing")
        return 1.0

    completions = ["fine", "fine too", "this one goes boom " + "x" * 300]
    with pytest.raises(RewardError) as info:
        combine({"my_reward": (1.0, broken)}, completions, ["1"] * 3, [[1]] * 3, ["a", "b", "shape_count"], FUNCTIONAL)
    err = info.value
    assert err.reward_name == "my_reward" and err.sample_index == 2
    message = str(err)
    assert "'my_reward'" in message and "sample 2" in message and "shape_count" in message
    assert "this one goes boom" in message and "KeyError" in message
    assert len(message) < 400  # a snippet, not the whole completion
    assert isinstance(err.__cause__, KeyError)


def test_on_error_zero_scores_failures_zero_and_counts_them():
    def flaky(completion, answer, token_ids, *, task, functional_ids):
        return float("nan") if "nan" in completion else 1 / 0 if "boom" in completion else 0.5

    rewards = {"flaky": (2.0, flaky), "acc": (1.0, accuracy_reward)}
    total, parts, errors = combine(rewards, [r"\boxed{1}", "nan", "boom"], ["1"] * 3, [[1]] * 3, None, FUNCTIONAL, on_error="zero")
    np.testing.assert_array_equal(parts["flaky"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(total, [2.0, 0.0, 0.0])
    assert errors == {"flaky": 2, "acc": 0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1.0", True, np.array([1.0])])
def test_reward_returning_non_float_is_an_error(bad):
    def returns_bad(*args, **kwargs):
        return bad

    with pytest.raises(RewardError, match="'odd'.*sample 0"):
        combine({"odd": (1.0, returns_bad)}, ["c"], ["1"], [[1]], None, FUNCTIONAL)


def test_combine_accepts_numpy_scalars_and_rejects_mismatched_lengths():
    numpy_scalar = {"np": (0.5, lambda *a, **k: np.float32(2.0))}
    total, _, _ = combine(numpy_scalar, ["c", "d"], ["1", "1"], [[1], [2]], None, FUNCTIONAL)
    np.testing.assert_array_equal(total, [1.0, 1.0])
    with pytest.raises(ValueError, match="answers has 1 entries; expected 2"):
        combine(DEFAULT_REWARDS, ["c", "d"], ["1"], [[1], [2]], None, FUNCTIONAL)
    with pytest.raises(ValueError, match="weight"):
        combine({"w": (float("nan"), accuracy_reward)}, ["c"], ["1"], [[1]], None, FUNCTIONAL)


def test_gold_synthetic_trajectories_score_full_marks():
    """The built-in suite's reference trajectories are correct, well formatted and use their task's
    functional tokens, so the default rewards give them the maximum."""
    from atlas_jax.data.synthetic.registry import TASKS, generate
    from atlas_jax.functional_tokens import DEFAULT_TOKENS

    ids = {t.token: 1000 + k for k, t in enumerate(DEFAULT_TOKENS)}
    by_name = {t.name: ids[t.token] for t in DEFAULT_TOKENS}
    expected = expected_usage_reward({name: [by_name[op] for op in spec.ops] for name, spec in TASKS.items()})
    for task in TASKS:
        sample = generate(task, "train", 0, seed=0)
        token_ids = [ids[tok] for tok in ids for _ in range(sample.response.count(tok))]
        kw = dict(task=task, functional_ids=tuple(ids.values()))
        assert accuracy_reward(sample.response, sample.answer) == 1.0, (task, sample.answer)
        assert format_reward(sample.response, sample.answer, token_ids, **kw) == 1.0, task
        assert expected(sample.response, sample.answer, token_ids, **kw) == 1.0, task
        wrong = sample.response.replace("\\boxed{" + sample.answer + "}", "\\boxed{" + sample.answer + "0}")
        assert accuracy_reward(wrong, sample.answer) == 0.0, task


# ---------------------------------------------------------------------------- overlong, user rewards


@pytest.mark.parametrize("length,expected", [(0, 0.0), (80, 0.0), (81, -0.0625), (88, -0.5), (96, -1.0), (100, -1.0)])
def test_overlong_penalty_is_dapo_soft_punishment(length, expected):
    # DAPO: 0 up to L_max - L_cache, then (L_max - L_cache - |y|) / L_cache, -1 at L_max.
    got = overlong_penalty("c", "a", [7] * length, task="", functional_ids=(), max_length=96, buffer=16)
    assert got == pytest.approx(expected)
    assert overlong_penalty("c", "a", [7] * 88, max_length=96, buffer=16, penalty=0.5) == pytest.approx(-0.25)


def length_bonus(completion, answer, token_ids, /, *, task, functional_ids):
    """A user's reward: used by test_load_reward_* as 'test_rewards:length_bonus'."""
    return len(token_ids) / 10


def wrong_signature(completion):
    return 0.0


def test_load_reward_imports_and_checks_the_signature():
    name, weight, fn = load_reward("test_rewards:length_bonus=0.5")
    assert (name, weight, fn) == ("test_rewards:length_bonus", 0.5, length_bonus)
    assert load_reward("test_rewards:length_bonus")[1] == 1.0
    for spec, problem in (("test_rewards:wrong_signature=1", "expected fn"), ("no_such_module_xyz:f", "cannot import"),
                          ("test_rewards:missing", "cannot import"), ("test_rewards:length_bonus=lots", "not a number"),
                          ("length_bonus", "package.module:function")):
        with pytest.raises(ValueError, match=problem) as info:
            load_reward(spec)
        assert repr(spec) in str(info.value)
