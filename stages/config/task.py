"""The training task: which problems (and the arith generator's difficulty) every stage trains on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.section import Section

ArithOp = Literal["+", "-", "*", "/"]


class ArithDifficulty(Section):
    """Knobs of the arith task; embed it in a stage config to make them settable."""

    min_ops: int = Field(1, ge=1, le=8, description="Fewest arithmetic steps in a problem.")
    max_ops: int = Field(2, ge=1, le=8, description="Most arithmetic steps in a problem (>= min_ops).")
    max_operand: int = Field(
        10, ge=2, le=1000, description="Largest number in a problem statement (starting amount and operands)."
    )
    operations: tuple[ArithOp, ...] = Field(
        ("+", "-"),
        min_length=1,
        description="Allowed steps: + (gets more), - (gives away), * (times as many), / (equal piles).",
    )


class TaskConfig(Section):
    dataset: Literal["arith", "gsm8k"] = Field(
        "arith", description="Training problems: procedurally generated `arith` (offline) or `gsm8k`."
    )
    train_size: int = Field(
        4000, ge=1, description="Training problems (arith: generated; gsm8k: the first N)."
    )
    heldout_size: int = Field(
        200, ge=1, description="Held-out problems for in-stage accuracy (the test split)."
    )
    data_seed: int = Field(
        0, ge=0, description="Seed of the arith generator (independent of the training seed)."
    )
    difficulty: ArithDifficulty = Field(
        default_factory=ArithDifficulty, description="Arith difficulty knobs."
    )
