"""The evaluation stage's section: which benchmarks, how many samples, which extra checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages.config.section import Section, non_semantic

Benchmark = Literal["arith", "gsm8k", "math500", "aime24", "aime25"]


BENCHMARKS: tuple[str, ...] = ("arith", "gsm8k", "math500", "aime24", "aime25")


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="Evaluate the starting and the final policy.")
    benchmarks: list[Benchmark] = Field(
        default_factory=lambda: list(BENCHMARKS),
        min_length=1,
        description="Benchmarks: arith (the task's held-out split), gsm8k (test), math500, aime24, aime25.",
    )
    samples: int = Field(
        4, ge=1, description="Sampled responses per problem (pass@1 is their mean; pass@k, maj@k for k <= N)."
    )
    temperature: float | None = Field(
        None, ge=0, description="Sampling temperature; null: generation.temperature (the training one)."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Response budget in tokens; null: generation.max_new_tokens."
    )
    limit: int | None = Field(
        None, ge=1, description="First N problems of each benchmark; null: all (arith: task.heldout_size)."
    )
    limits: dict[Benchmark, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="Per-benchmark problem counts that override `limit`, e.g. {arith: 200}.",
    )
    checkpoints: dict[str, str] = Field(
        default_factory=dict,
        description="More checkpoints to evaluate: label -> URI (HF folder, storage URI or hub id).",
    )
    batch_size: int = non_semantic(
        64, ge=1, description="hf backend: prompts per generation call (bounds memory)."
    )
