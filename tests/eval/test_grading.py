"""Answer extraction and equivalence, including the MATH-500 and GSM8K reference solutions."""

import json

import pytest

from freeprm.eval.grading import (
    answer_key,
    extract_answer,
    gold_from_gsm8k,
    grade,
    group_answers,
    is_equiv,
    last_boxed,
    parse_number,
)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last box wins
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
    (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 9$", "9"),
    (r"\boxed{3} and an unclosed \boxed{4", "3"),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text, task, expected", [
    ("5 + 3 = 8\n#### 1,234", "gsm8k", "1,234"),
    ("Step 1 ...\n\nThe answer is 42.", "gsm8k", "42"),
    ("The answer is $18. That is all.", "gsm8k", "$18"),
    ("The final answer is: 42 apples. Done", "gsm8k", "42"),
    ("The answer is 3.5.", "arith", "3.5"),
    (r"The answer is \boxed{7}. Earlier I said the answer is 6", "math", "7"),  # boxed beats the phrase
    ("He had 5 and got 7 more", "gsm8k", "7"),  # last-number fallback on numeric tasks
    ("He had 5 and got 7 more", "math", None),  # ... never on MATH
    ("", "gsm8k", None),
])
def test_extract_answer(text, task, expected):
    assert extract_answer(text, task) == expected


def test_strict_extraction_has_no_fallback():
    assert extract_answer("He had 5 and got 7 more", "gsm8k", fallback=None) is None
    assert extract_answer("He had 5 and got 7 more", "math", fallback="last_number") == "7"
    with pytest.raises(ValueError, match="fallback"):
        extract_answer("x", "gsm8k", fallback="first")
    with pytest.raises(ValueError, match="task"):
        extract_answer("x", "aime")


EQUIVALENT_MATH = [
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"(3,\pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    ("90", r"90^\circ"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    ("1/3", r"\frac{1}{3}"),
    ("3,000", "3000"),
    (r"10\%", "10"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"\text{(C)}", "C"),
    ("x=5", "5"),
]
NOT_EQUIVALENT_MATH = [
    (r"\frac{1}{3}", "0.33"),
    (r"(3,\pi)", r"(3,\frac{\pi}{2})"),
    ("x+1", "x-1"),
    ("2", "-2"),
    ("[1,2]", "[1,2)"),
    ("12", "21"),
    (r"\sqrt{2}", r"\sqrt{3}"),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT_MATH)
def test_math_equivalent_forms(pred, gold):
    assert is_equiv(pred, gold, "math")


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT_MATH)
def test_math_non_equivalent_forms(pred, gold):
    assert not is_equiv(pred, gold, "math")


@pytest.mark.parametrize("pred, gold, equal", [
    ("1,234", "1234", True), ("$5.50", "5.5", True), ("3/4", "0.75", True), ("18 dollars", "18", True),
    ("12%", "12", True), ("-7", "-7.0", True), (r"\frac{3}{4}", "0.75", True), ("1e3", "1000", True),
    ("18", "18.5", False), ("180", "18", False), ("-3", "3", False), ("seven", "7", False), (None, "7", False),
])
def test_numeric_equality(pred, gold, equal):
    assert is_equiv(pred, gold, "gsm8k") is equal


def test_parse_number_rejects_expressions():
    assert parse_number("2+3") is None and parse_number("x") is None and parse_number("") is None
    assert parse_number("3/0") is None


def test_answer_keys_and_groups():
    assert answer_key("1,000", "gsm8k") == answer_key("1000.0", "gsm8k")
    assert answer_key(None, "gsm8k") is None and answer_key("  ", "math") is None
    keys = group_answers([r"\frac{1}{2}", "0.5", r"\dfrac{1}{2}", "3", None, r"\sqrt{9}"], "math")
    assert keys[0] == keys[1] == keys[2]  # equivalent forms vote together
    assert keys[3] == keys[5] != keys[0]  # sqrt(9) == 3
    assert keys[4] is None


def test_grade_returns_answer_and_flag():
    assert grade("so it is 24.\n\nThe answer is 24.", "24", "gsm8k") == ("24", True)
    assert grade(r"thus $\boxed{\frac{2}{4}}$", r"\frac12", "math") == (r"\frac{2}{4}", True)
    assert grade("I do not know", "24", "gsm8k") == (None, False)


def _rows(root, name):
    with open(root / name) as f:
        return [json.loads(line) for line in f]


def test_math500_reference_answers_grade_equal(shared_data):
    """Each reference solution's boxed answer must grade equal to the `answer` field.

    Measured: 500/500 through ``grade`` (string match or math-verify) and 500/500 through
    math-verify alone (no string shortcut). The floor leaves room for math-verify versions.
    """
    from math_verify import verify

    from freeprm.eval.grading import _mv_parse

    rows = _rows(shared_data("math500.jsonl"), "math500.jsonl")
    full = [grade(r["solution"], r["answer"], "math")[1] for r in rows]
    mv_only = []
    for r in rows:
        g, p = _mv_parse(r["answer"]), _mv_parse(last_boxed(r["solution"]))
        mv_only.append(bool(g and p and verify(g, p)))
    rate_full, rate_mv = sum(full) / len(rows), sum(mv_only) / len(rows)
    print(f"MATH-500 reference boxed == answer: grade {rate_full:.3f}, math-verify only {rate_mv:.3f}")
    assert len(rows) == 500
    assert rate_full >= 0.998
    assert rate_mv >= 0.99
    # and the answers are not all equal to each other: a wrong gold fails
    wrong = sum(grade(a["solution"], b["answer"], "math")[1] for a, b in zip(rows[:100], rows[1:101]))
    assert wrong <= 3


def test_gsm8k_reference_answers_grade_equal(shared_data):
    rows = _rows(shared_data("gsm8k_test.jsonl"), "gsm8k_test.jsonl")
    ok = [grade(r["answer"], gold_from_gsm8k(r["answer"]), "gsm8k")[1] for r in rows]
    assert len(rows) == 1319 and sum(ok) == len(rows)
    shifted = sum(grade(a["answer"], gold_from_gsm8k(b["answer"]), "gsm8k")[1] for a, b in zip(rows, rows[1:]))
    assert shifted < 0.05 * len(rows)
