"""The training task: which problems (and the arith generator's difficulty) every stage trains on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config.section import Section

ArithOp = Literal["+", "-", "*", "/"]
PromptFormat = Literal["auto", "chat", "plain"]


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


BUILTIN_TASKS = ("arith", "gsm8k")
EVALUATION_ONLY = ("math500", "aime24", "aime25")


class TaskConfig(Section):
    dataset: str = Field(
        "arith",
        min_length=1,
        description="Training problems: procedurally generated `arith` (offline), `gsm8k`, or a user's dataset: "
        "a Hugging Face dataset id, a `save_to_disk` folder, or a .jsonl / .json / .parquet file, read with "
        "the *_field, answer_format and grader keys below.",
    )
    question_field: str = Field("question", description="User's dataset: the field holding the problem text.")
    answer_field: str = Field(
        "answer",
        description="User's dataset: the field the reference answer is read from (see answer_format).",
    )
    solution_field: str | None = Field(
        None,
        description="User's dataset: the field holding a worked solution (SFT's target, the reward model's "
        "chosen side); null: none (SFT then has nothing to train on).",
    )
    answer_format: Literal["hash", "boxed", "plain"] = Field(
        "hash",
        description="User's dataset: how the reference answer is read from answer_field: hash = the number "
        "after the last '#### ' (GSM8K's solutions), boxed = the last \\boxed{} (MATH's solutions), plain = "
        "the field as it is.",
    )
    grader: Literal["numeric", "boxed"] = Field(
        "numeric",
        description="User's dataset: how responses are graded, and what the prompt asks for: numeric = the "
        "number after '####' (else the last number), compared numerically; boxed = the last \\boxed{}, "
        "compared by math-verify.",
    )
    train_split: str = Field("train", min_length=1, description="User's dataset: the split trained on.")
    test_split: str | None = Field(
        "test",
        description="User's dataset: the held-out split; null: the last heldout_size rows of the train split "
        "are held out (and never trained on). A single file has one split: use null.",
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

    prompt_format: PromptFormat = Field(
        "auto",
        description="How prompts reach the model: chat = one user turn through the tokenizer's chat template "
        "(generation starts after the assistant header); plain = the text as is; auto = chat when the "
        "tokenizer has a template. Every stage and the evaluation render prompts the same way.",
    )

    @model_validator(mode="after")
    def _not_a_benchmark(self) -> TaskConfig:
        if self.dataset in EVALUATION_ONLY:
            raise ValueError(
                f"task.dataset {self.dataset} is an evaluation benchmark (a test split only); train on arith, "
                "gsm8k or your own dataset and evaluate on it with evaluate.benchmarks"
            )
        return self
