"""Evaluation metrics over graded samples: pass@k (unbiased), maj@k. Pure functions, no I/O.

- pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", eq. 1): with n samples of which c are correct, the probability that at least
  one of k samples drawn without replacement is correct, 1 - C(n-c, k) / C(n, k), averaged over
  problems. pass@1 is then the mean correctness over all n samples.
- maj@k is majority voting over the first k samples of a problem: the most frequent extracted
  answer wins (ties go to the answer that appeared first); the problem counts as solved when the
  winning answer is correct. Samples without an answer (no `#### N` / `\\boxed{}`, cut at the
  token limit) do not vote; a problem with no votes is not solved. Using the first k samples (not
  a random subset) keeps maj@k deterministic given the samples.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def k_values(n_samples: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    ks, k = [], 1
    while k <= n_samples:
        ks.append(k)
        k *= 2
    return ks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples, `c` of them correct.

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which equals 1 - C(n-c, k)/C(n, k) without the
    huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[p]` holds problem p's samples (all the same count)."""
    if not correct:
        return 0.0
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def majority_answer(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample carrying the most frequent non-None answer; None if nothing voted."""
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, index)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[answer] for answer, count in counts.items() if count == best)


def mean_maj_at_k(
    answers: Sequence[Sequence[Hashable | None]], correct: Sequence[Sequence[bool]], k: int
) -> float:
    """maj@k averaged over problems: majority vote over each problem's first k samples."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answer rows but {len(correct)} correctness rows")
    if not answers:
        return 0.0
    solved = 0
    for row_answers, row_correct in zip(answers, correct, strict=True):
        if k > len(row_answers):
            raise ValueError(f"maj@{k} needs at least {k} samples per problem, got {len(row_answers)}")
        winner = majority_answer(row_answers[:k])
        solved += winner is not None and bool(row_correct[winner])
    return solved / len(answers)
