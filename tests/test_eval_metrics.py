"""pass@k and maj@k against hand-computed values and brute-force enumeration."""

from __future__ import annotations

import itertools
import random

import pytest

from stages.evaluation.checkpoint import benchmark_metrics
from stages.evaluation.metrics import k_values, majority_answer, mean_maj_at_k, mean_pass_at_k, pass_at_k


def test_k_values_are_powers_of_two_up_to_n():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4]
    assert k_values(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError):
        k_values(0)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),  # pass@1 = c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (4, 0, 4, 0.0),
        (4, 3, 2, 1.0),  # n - c < k: every draw of 2 holds a correct one
        (8, 8, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumeration_over_all_k_subsets():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 9)
        flags = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(flags, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, sum(flags), k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k([], 1) == 0.0


def test_majority_answer_ties_go_to_the_first_seen_and_none_does_not_vote():
    assert majority_answer(["3", "5", "5", "3"]) == 0  # tie 2-2: "3" appeared first
    assert majority_answer(["3", "5", "5"]) == 1
    assert majority_answer([None, None, "7"]) == 2
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_maj_at_k_votes_over_the_first_k_samples():
    answers = [["4", "5", "5", "4"], ["1", None, None, "2"], [None, None, None, None]]
    correct = [[True, False, False, True], [False, False, False, True], [False] * 4]
    # k=1: first answers: 4 (right), 1 (wrong), none -> 1/3
    assert mean_maj_at_k(answers, correct, 1) == pytest.approx(1 / 3)
    # k=2: {4,5} tie -> 4 (right); {1} -> wrong; none -> 1/3
    assert mean_maj_at_k(answers, correct, 2) == pytest.approx(1 / 3)
    # k=4: 4 and 5 tie 2-2 -> 4 first (right); 1 and 2 tie -> 1 (wrong) -> 1/3
    assert mean_maj_at_k(answers, correct, 4) == pytest.approx(1 / 3)
    # majority of wrong answers beats a correct minority
    assert mean_maj_at_k([["9", "8", "8"]], [[True, False, False]], 3) == 0.0
    with pytest.raises(ValueError):
        mean_maj_at_k([["1"]], [[True]], 2)


def _row(answer, correct, finish="stop", length=10):
    return {"extracted_answer": answer, "correct": correct, "finish_reason": finish, "response_len": length}


def test_benchmark_metrics_from_graded_rows():
    greedy = [[_row("4", True)], [_row("2", False)]]
    sampled = [
        # problem 1: the truncated sample carries the right number but neither counts nor votes
        [
            _row("4", True, length=6),
            _row("4", False, "length", 20),
            _row("3", False, length=4),
            _row("3", False, length=10),
        ],
        [_row("7", True), _row("1", False), _row(None, False), _row("7", True)],
    ]
    m = benchmark_metrics(greedy, sampled, 4)
    assert m["n_problems"] == 2 and m["n_samples"] == 4
    assert m["greedy"] == 0.5
    assert m["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert m["pass@k"]["2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert m["pass@k"]["4"] == 1.0
    # maj@4: problem 1 votes 4 (1 vote, the truncated one does not vote) vs 3 (2) -> wrong;
    # problem 2: 7 (2) vs 1 (1) -> right
    assert m["maj@k"]["4"] == 0.5
    assert m["maj@k"]["1"] == 1.0  # first samples: 4 (right), 7 (right)
    assert m["mean_response_len"] == pytest.approx((6 + 20 + 4 + 10 + 40) / 8)
    assert m["truncated_frac"] == pytest.approx(1 / 8)
