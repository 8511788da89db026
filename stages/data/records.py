"""The record types of task data (one per problem, one per preference pair) and its error type.

Every data problem raises `DataError` (a ValueError) with one line naming the file, line or field.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data problem, described in one line naming the dataset, file, line or field."""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within its dataset, stable across runs (e.g. "gsm8k/test/17", "arith-3fa9c1...")
    dataset: str  # picks the prompt template and grader: arith, gsm8k, aime24, aime25, math500, or a user's
    # dataset's grader (numeric, boxed)
    question: str
    answer: str  # the final answer only ("1080", "\\frac{14}{3}")
    solution: str | None = None  # worked solution (SFT target, chosen side of preference pairs)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # response only (the prompt is not repeated)
    rejected: str
    margin: float | None = None  # optional Bradley-Terry margin (`bradley_terry_loss(..., margin_B)`)
