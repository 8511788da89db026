"""Verifiers: extraction rules, a hand-decided grading table, and every reference answer of the
eval files graded against itself."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from stages.data.grading import extract_boxed_answer, extract_gsm8k_answer, grade, normalise_latex
from stages.data.problems import load_problems
from stages.sampling.rewards import apply_missing_eos_penalty, combined_score


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 1,000 + 80 = 1,080\n#### 1,080", "1080"),
        ("#### 72", "72"),
        ("#### -3", "-3"),
        ("#### $18.00", "18"),
        ("#### 0.50", "0.5"),
        ("#### 7.", "7"),
        ("#### 5 apples and 6 pears", "5"),  # first number after the marker
        ("#### 2\nmore text 9\n#### 4", "4"),  # last marker wins
        ("The answer is $1,234.50.", "1234.5"),
        ("She has 3 apples, then 12 apples.", "12"),  # last-number fallback
        ("temperature drops to -7 degrees", "-7"),
        ("pages 3-5 were read", "5"),  # a range, not -5
        ("-0", "0"),
        ("####", None),  # announced, never given
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"first \boxed{1}, then \boxed{2}", "2"),  # last wins
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content, not nesting
        (r"$\boxed 5$", "5"),
        (r"\boxed{3} then \boxed{4", "3"),  # an unclosed (truncated) box is not an answer
        (r"\boxed{}", ""),
        ("the answer is 5", None),
        (r"\boxed{ x^{2} + 1 }", "x^{2} + 1"),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# grading table (decisions by hand)
# ---------------------------------------------------------------------------------------------
GRADE_TABLE = [
    # dataset, response, ground truth, correct?
    ("gsm8k", "10 * 108 = 1080\n#### 1,080", "1080", True),
    ("gsm8k", "#### 1080", "1,080", True),  # commas in the reference too
    ("gsm8k", "#### 1,081", "1080", False),
    ("gsm8k", "#### -5", "-5", True),
    ("gsm8k", "#### 5", "-5", False),
    ("gsm8k", "She pays $18.00 in total.", "18", True),
    ("gsm8k", "#### 0.50", "0.5", True),
    ("gsm8k", "#### 18", "18.0", True),  # numeric, not string, equality
    ("gsm8k", "First 3, then 4, so 7", "7", True),  # last number fallback
    ("gsm8k", "First 7, then 4 more", "7", False),  # the last number is what counts
    ("gsm8k", "I don't know", "7", False),
    ("gsm8k", "#### 7\nWait, actually #### 8", "7", False),  # last marker wins
    ("arith", "3 + 4 = 7\n#### 7", "7", True),
    ("arith", "3 + 4 = 8\n#### 8", "7", False),
    ("math500", r"so $\boxed{\frac{1}{2}}$", "0.5", True),
    ("math500", r"\boxed{0.5}", r"\frac{1}{2}", True),
    ("math500", r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
    ("math500", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", False),
    ("math500", r"\boxed{[2, 5)}", "[2,5)", True),
    ("math500", r"\boxed{(2, 5]}", "[2,5)", False),  # interval ends matter
    ("math500", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("math500", r"\boxed{1+x^2}", "x^2+1", True),
    ("math500", r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),  # text answer
    ("math500", r"\boxed{\text{(C)}}", r"\text{(C)}", True),
    ("math500", r"\boxed{\text{(B)}}", r"\text{(C)}", False),
    ("math500", r"\boxed{90^\circ}", "90", True),
    ("math500", r"\boxed{3.14159}", r"\pi", False),  # no numeric rounding to constants
    ("math500", r"the answer is \frac{1}{2}", r"\frac{1}{2}", False),  # no box: wrong
    ("math500", r"\boxed{}", "5", False),  # empty box: wrong
    ("math500", "", "5", False),  # no answer at all
    ("math500", r"\boxed{4} no wait \boxed{5}", "5", True),  # several boxes: the last wins
    ("math500", r"\boxed{5} no wait \boxed{4}", "5", False),
    ("aime24", r"\boxed{5}", "05", True),  # decided: AIME answers are integers; 05 == 5
    ("aime24", r"\boxed{204}", "204", True),
    ("aime25", r"\boxed{70}", "7", False),
    ("aime25", r"\boxed{\frac{140}{2}}", "70", True),
]


@pytest.mark.parametrize("dataset, response, ground_truth, expected", GRADE_TABLE)
def test_grade_table(dataset, response, ground_truth, expected):
    assert grade(dataset, response, ground_truth) is expected


def test_grade_from_worker_thread_matches_main_thread():
    """math-verify's signal timeout only works in the main thread: the grader must still work off it."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: grade(*case[:3]), GRADE_TABLE))
    assert results == [case[3] for case in GRADE_TABLE]


def test_grade_falls_back_to_string_match_when_math_verify_fails(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert grade("math500", r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}")  # same after normalisation
    assert not grade("math500", r"\boxed{0.5}", r"\frac{1}{2}")  # equal, but only math-verify knows


def test_normalise_latex():
    assert normalise_latex(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalise_latex(r"\text{Evelyn}.") == "evelyn"
    assert normalise_latex(r"90^\circ") == normalise_latex("90")


def test_unknown_dataset_is_one_line():
    with pytest.raises(ValueError, match="no grader for dataset 'mmlu'; known: ") as info:
        grade("mmlu", "A", "A")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# whole eval files: every reference grades correct against itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, count", [("train", 7473), ("test", 1319)])
def test_every_gsm8k_reference_solution_grades_correct(data_dir, split, count):
    problems = load_problems("gsm8k", split)
    assert len(problems) == count
    wrong = [p.id for p in problems if not grade("gsm8k", p.solution, p.answer)]
    assert wrong == []


@pytest.mark.parametrize("name, count", [("aime24", 30), ("aime25", 30), ("math500", 500)])
def test_every_boxed_reference_answer_grades_correct_against_itself(data_dir, name, count):
    problems = load_problems(name)
    assert len(problems) == count
    wrong = [p.id for p in problems if not grade(name, rf"The answer is $\boxed{{{p.answer}}}$.", p.answer)]
    assert wrong == []


def test_aime_reference_answers_are_not_graded_correct_against_another_answer(data_dir):
    """The self-check above must not pass because everything passes."""
    problems = load_problems("aime24")
    shifted = [grade("aime24", rf"\boxed{{{int(p.answer) + 1}}}", p.answer) for p in problems]
    assert not any(shifted)


# ---------------------------------------------------------------------------------------------
# reward shaping
# ---------------------------------------------------------------------------------------------
def test_missing_eos_penalty():
    assert apply_missing_eos_penalty(1.0, "length", 0.5) == 0.5  # truncated: 1 - 0.5
    assert apply_missing_eos_penalty(0.0, "length", 1.0) == -1.0
    assert apply_missing_eos_penalty(1.0, "stop", 0.5) == 1.0  # ended with EOS: untouched
    assert apply_missing_eos_penalty(1.0, "length", 0.0) == 1.0  # penalty off


def test_combined_score():
    assert combined_score(1.0, 0.5, 0.2) == pytest.approx(1.1, abs=1e-12)  # 1 + 0.2 * 0.5
    assert combined_score(0.0, -2.0, 0.5) == pytest.approx(-1.0, abs=1e-12)  # 0 + 0.5 * -2
    assert combined_score(1.0, None, 0.2) == 1.0  # no reward model
