"""The training task of a run: which problems, how they become token ids, in which order.

`TaskConfig` is shared by every stage that trains on prompts (SFT, reward model, critic warmup,
PPO): they all see the same train/held-out split. The data order is a pure function of
(seed, step), so a resumed stage draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from stages.config.task import BUILTIN_TASKS, PromptFormat, TaskConfig
from stages.data.arith import arith_problems
from stages.data.problems import format_prompt, load_problems
from stages.data.prompt_rendering import prompt_token_ids, render_prompt, response_end_id, uses_chat
from stages.data.records import DataError, Problem
from stages.data.user_tasks import user_problems

# Tokenizers with no context length report this sentinel (transformers' VERY_LARGE_INTEGER).
_NO_CONTEXT_LENGTH = 10**9


def task_problems(task: TaskConfig, split: Literal["train", "test"]) -> list[Problem]:
    n = task.train_size if split == "train" else task.heldout_size
    if task.dataset == "arith":
        return arith_problems(split, n, task.data_seed, task.difficulty)
    if task.dataset not in BUILTIN_TASKS:
        return user_problems(task, split)
    problems = load_problems(task.dataset, split, limit=n)
    if not problems:  # an empty file would otherwise fail later, deep in batching
        raise DataError(f"task dataset {task.dataset!r} split {split!r} has no problems")
    return problems


@dataclass(frozen=True)
class EncodedProblem:
    problem: Problem
    prompt: str  # as the model reads it (through the chat template, if one is used)
    prompt_ids: list[int]
    solution_ids: list[int]  # the worked solution + the response end (empty when the problem has none)


def encode_problems(
    problems: list[Problem], tokenizer, prompt_format: PromptFormat = "auto"
) -> list[EncodedProblem]:
    """Prompt and solution tokenised separately, exactly as generation sees them (prompt, then response);
    the prompt rendered as `prompt_format` says (`stages.data.prompt_rendering`)."""
    chat = uses_chat(tokenizer, prompt_format)
    end = response_end_id(tokenizer, chat)
    encoded = []
    for problem in problems:
        text = format_prompt(problem)
        prompt, prompt_ids = render_prompt(text, tokenizer, chat), prompt_token_ids(text, tokenizer, chat)
        solution_ids = (
            tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [end]
            if problem.solution
            else []
        )
        encoded.append(EncodedProblem(problem, prompt, prompt_ids, solution_ids))
    return encoded


def check_fits(
    encoded: list[EncodedProblem], tokenizer, max_new_tokens: int, what: str, with_solution: bool = False
) -> None:
    """DataError naming the first problem whose prompt + `max_new_tokens` (`with_solution`: or + its
    worked solution, if longer) exceeds the tokenizer's context length: a model never trains on or
    samples past its positions."""
    context = getattr(tokenizer, "model_max_length", None)
    if not context or context >= _NO_CONTEXT_LENGTH:
        return

    def needed(p: EncodedProblem) -> int:
        return len(p.prompt_ids) + max(max_new_tokens, len(p.solution_ids) if with_solution else 0)

    too_long = [p for p in encoded if needed(p) > context]
    if too_long:
        first = too_long[0]
        raise DataError(
            f"{what}: {len(too_long)} of {len(encoded)} prompts do not fit the model's context of {context} "
            f"tokens with {max_new_tokens} new tokens (first: {first.problem.id}, {len(first.prompt_ids)} "
            "prompt tokens); shorten them or lower generation.max_new_tokens"
        )


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the global batch of `step`: epochs of seeded permutations, read as one stream.

    Deterministic in (seed, step): resuming at step k continues the same stream (the data cursor
    is step * batch_size).
    """
    cursor = step * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(cursor + len(indices), n_items)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(indices), n_items - offset)
        indices.extend(order[offset : offset + take].tolist())
    return indices


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share of a global batch (interleaved, so shares differ by at most one item)."""
    return items[rank::world_size]
