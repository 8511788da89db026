"""Preference pairs for reward-model training: generated offline from problems with worked solutions
(chosen = the reference solution, rejected = a corrupted one), or read from any dataset with
chosen/rejected columns.
"""

from __future__ import annotations

import random
import re
from typing import Any

from stages.data.dataset_files import open_dataset, require_fields
from stages.data.grading import grade
from stages.data.problems import format_prompt
from stages.data.records import DataError, PreferencePair, Problem

# One step of an arith worked solution: `x op b = y`.
_STEP_LINE = re.compile(r"^(-?\d+) ([-+*/]) (\d+) = (-?\d+)$")


def preference_pairs_from_problems(problems: list[Problem], seed: int) -> list[PreferencePair]:
    """chosen = the reference solution, rejected = a corrupted copy whose final answer is wrong.

    Corruption (seeded): for arith-style solutions (one `x op b = y` per line) half of the pairs get a
    wrong intermediate result that propagates through the later steps; otherwise the final answer
    (`#### N`, or an integer in the last `\\boxed{}`) is changed. Problems without a solution, or
    whose pair the verifier does not grade as (correct, wrong), are left out.
    """
    rng = random.Random(f"pairs:{seed}")
    pairs = []
    for problem in problems:
        if not problem.solution:
            continue
        rejected = _corrupt_solution(problem.solution, rng)
        if rejected is None or not grade(problem.dataset, problem.solution, problem.answer):
            continue
        if grade(problem.dataset, rejected, problem.answer):
            continue
        pairs.append(PreferencePair(format_prompt(problem), problem.solution, rejected))
    return pairs


def _corrupt_solution(solution: str, rng: random.Random) -> str | None:
    lines = solution.split("\n")
    steps = [_STEP_LINE.match(line) for line in lines[:-1]]
    if steps and all(steps) and lines[-1].startswith("#### ") and rng.random() < 0.5:
        return _corrupt_step(steps, rng)  # type: ignore[arg-type]
    hashes = solution.rfind("#### ")
    if hashes >= 0:
        match = re.match(r"\s*(-?[\d,]+)", solution[hashes + 5 :])
        if match:
            wrong = _wrong_number(int(match.group(1).replace(",", "")), rng)
            return solution[: hashes + 5] + str(wrong) + solution[hashes + 5 + match.end() :]
    boxed = solution.rfind("\\boxed{")
    if boxed >= 0:
        match = re.match(r"\\boxed\{(-?\d+)\}", solution[boxed:])
        if match:
            wrong = _wrong_number(int(match.group(1)), rng)
            return solution[:boxed] + f"\\boxed{{{wrong}}}" + solution[boxed + match.end() :]
    return None


def _corrupt_step(steps: list[re.Match], rng: random.Random) -> str | None:
    """Change one intermediate result and recompute the steps after it (so the error propagates)."""
    i = rng.randrange(len(steps))
    if any(m.group(2) == "/" for m in steps[i + 1 :]):
        return None  # a wrong amount need not divide evenly: keep the problem out instead
    lines, total = [], None
    for j, m in enumerate(steps):
        x, op, b = int(m.group(1)) if total is None else total, m.group(2), int(m.group(3))
        result = int(m.group(4)) if j < i else _apply(x, op, b)
        if j == i:
            result = _wrong_number(result, rng)
        lines.append(f"{x} {op} {b} = {result}")
        total = result
    return "\n".join([*lines, f"#### {total}"])


def _apply(x: int, op: str, b: int) -> int:
    return {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]


def _wrong_number(value: int, rng: random.Random) -> int:
    delta = rng.randint(1, 9)
    return value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta


def preference_pairs_from_hf(
    dataset_id_or_path: str,
    split: str = "train",
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    limit: int | None = None,
    margin_field: str | None = None,
) -> list[PreferencePair]:
    """Pairs from any dataset with chosen/rejected columns: a hub id, a `save_to_disk` folder, or a
    .jsonl/.json/.parquet file. A field holding a chat (list of {role, content}) contributes the
    content of its last message. `prompt_field=None`: the responses carry their own prompt."""
    ds = open_dataset(dataset_id_or_path, split, "preference data")
    wanted = [f for f in (prompt_field, chosen_field, rejected_field, margin_field) if f]
    require_fields(ds, dataset_id_or_path, split, wanted)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    pairs = []
    for i, row in enumerate(ds):
        where = f"{dataset_id_or_path} ({split}) row {i}"
        prompt = _as_text(row[prompt_field], where, prompt_field) if prompt_field else ""
        margin = None if margin_field is None or row[margin_field] is None else float(row[margin_field])
        chosen, rejected = (
            _as_text(row[chosen_field], where, chosen_field),
            _as_text(row[rejected_field], where, rejected_field),
        )
        pairs.append(PreferencePair(prompt, chosen, rejected, margin))
    return pairs


def _as_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise DataError(f"{where}: field '{field}' is neither text nor a list of chat messages")
