"""The procedural `arith` task: seeded word problems ("Tom has 3 apples. Tom buys 4 more. ...") with
one equation per step and a GSM8K-style `#### N` final line.

Train and test are disjoint by construction: a problem's split is a hash of its canonical text,
and generation skips the other split's problems.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from stages.config.task import ArithDifficulty
from stages.data.records import DataError, Problem

ARITH_TEST_PERCENT = 20  # share of the arith problem space that belongs to the test split


_NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy", "Kai", "Eva")
_ITEMS = (("apple", "apples"), ("pen", "pens"), ("card", "cards"), ("book", "books"), ("egg", "eggs"),
          ("stamp", "stamps"), ("coin", "coins"), ("shell", "shells"), ("marble", "marbles"))  # fmt: skip
_STEP_TEXT: dict[str, tuple[str, ...]] = {
    "+": ("{name} buys {b} more.", "{name} finds {b} more.", "A friend gives {name} {b} more."),
    "-": ("{name} gives away {b}.", "{name} loses {b}.", "{name} sells {b}."),
    "*": ("Then {name} has {b} times as many {items} as before.",),
    "/": ("Then {name} splits the {items} into {b} equal piles and keeps one pile.",),
}


def arith_split(question: str) -> Literal["train", "test"]:
    """The split a problem text belongs to: a hash of its canonical (lower-cased, space-collapsed) text."""
    bucket = int(_text_hash(question)[:8], 16) % 100
    return "test" if bucket < ARITH_TEST_PERCENT else "train"


def arith_problems(
    split: Literal["train", "test"], n: int, seed: int, difficulty: ArithDifficulty | None = None
) -> list[Problem]:
    """`n` distinct problems of `split`, the same list for the same (split, n, seed, difficulty).

    The i-th problem does not depend on n (a longer list extends a shorter one).
    """
    if split not in ("train", "test"):
        raise DataError(f"arith has splits 'train' and 'test', not {split!r}")
    difficulty = difficulty or ArithDifficulty()
    if difficulty.max_ops < difficulty.min_ops:
        raise DataError(f"arith: max_ops ({difficulty.max_ops}) < min_ops ({difficulty.min_ops})")
    rng = random.Random(f"arith:{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(max(10_000, 100 * n)):
        if len(problems) == n:
            break
        question, steps = _sample_arith(rng, difficulty)
        key = _text_hash(question)
        if key in seen or arith_split(question) != split:
            continue
        seen.add(key)
        answer = steps[-1][3]
        lines = [f"{x} {op} {b} = {y}" for x, op, b, y in steps]
        solution = "\n".join([*lines, f"#### {answer}"])
        problems.append(Problem(f"arith-{key[:16]}", "arith", question, str(answer), solution))
    if len(problems) < n:
        raise DataError(
            f"arith: only {len(problems)} distinct {split} problems at this difficulty, asked for {n}"
        )
    return problems


def _sample_arith(rng: random.Random, d: ArithDifficulty) -> tuple[str, list[tuple[int, str, int, int]]]:
    """One problem: its text and its steps (x, op, b, x op b). Retries until every step is feasible."""
    while True:
        name, (one, many) = rng.choice(_NAMES), rng.choice(_ITEMS)
        total = rng.randint(1, d.max_operand)
        sentences = [f"{name} has {total} {one if total == 1 else many}."]
        steps = []
        for _ in range(rng.randint(d.min_ops, d.max_ops)):
            options = {op: _operands(op, total, d.max_operand) for op in d.operations}
            options = {op: bs for op, bs in options.items() if bs}
            if not options:
                break
            op = rng.choice(sorted(options))
            b = rng.choice(options[op])
            result = {"+": total + b, "-": total - b, "*": total * b, "/": total // max(b, 1)}[op]
            sentences.append(rng.choice(_STEP_TEXT[op]).format(name=name, b=b, items=many))
            steps.append((total, op, b, result))
            total = result
        else:
            sentences.append(f"How many {many} does {name} have now?")
            return " ".join(sentences), steps


def _operands(op: str, total: int, max_operand: int) -> list[int]:
    """Operands that keep every amount a non-negative whole number."""
    if op == "+":
        return list(range(1, max_operand + 1))
    if op == "-":
        return list(range(1, min(total, max_operand) + 1))
    if op == "*":
        return list(range(2, max_operand + 1))
    return [b for b in range(2, min(total, max_operand) + 1) if total % b == 0]


def _text_hash(text: str) -> str:
    canonical = " ".join(text.lower().split())
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
