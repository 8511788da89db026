"""Task data: the procedural `arith` task, benchmark loaders, prompt templates, preference pairs.

- `arith`: seeded word problems ("Tom has 3 apples. Tom buys 4 more. ...") with one equation per
  step and a GSM8K-style `#### N` final line. Train and test are disjoint by construction: a
  problem's split is a hash of its canonical text, and generation skips the other split's problems.
- `gsm8k`, `aime24`, `aime25`, `math500`: JSONL files under `$RLPIPE_DATA_DIR` (layout in the
  data README: `gsm8k/{train,test}.jsonl`, `aime/aime2024.jsonl`, ...), else the usual Hugging Face
  dataset ids. Problems of every source become one record type, `Problem`.
- Prompts are plain text (a template per dataset); applying a chat template is the model's business.
- Preference pairs for reward-model training: generated offline from problems with worked
  solutions (chosen = the reference solution, rejected = a corrupted one), or read from any
  dataset with chosen/rejected columns.

Every data problem raises `DataError` (a ValueError) with one line naming the file, line or field.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from stages.config import Section

DATA_DIR_ENV = "RLPIPE_DATA_DIR"
ARITH_TEST_PERCENT = 20  # share of the arith problem space that belongs to the test split


class DataError(ValueError):
    """A data problem, described in one line naming the dataset, file, line or field."""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within its dataset, stable across runs (e.g. "gsm8k/test/17", "arith-3fa9c1...")
    dataset: str  # registry name: arith, gsm8k, aime24, aime25, math500
    question: str
    answer: str  # the final answer only ("1080", "\\frac{14}{3}")
    solution: str | None = None  # worked solution (SFT target, chosen side of preference pairs)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # response only (the prompt is not repeated)
    rejected: str
    margin: float | None = None  # optional Bradley-Terry margin (`bradley_terry_loss(..., margin_B)`)


# ---------------------------------------------------------------------------------------------
# arith: procedural word problems
# ---------------------------------------------------------------------------------------------
ArithOp = Literal["+", "-", "*", "/"]

_NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy", "Kai", "Eva")
_ITEMS = (("apple", "apples"), ("pen", "pens"), ("card", "cards"), ("book", "books"), ("egg", "eggs"),
          ("stamp", "stamps"), ("coin", "coins"), ("shell", "shells"), ("marble", "marbles"))  # fmt: skip
_STEP_TEXT: dict[str, tuple[str, ...]] = {
    "+": ("{name} buys {b} more.", "{name} finds {b} more.", "A friend gives {name} {b} more."),
    "-": ("{name} gives away {b}.", "{name} loses {b}.", "{name} sells {b}."),
    "*": ("Then {name} has {b} times as many {items} as before.",),
    "/": ("Then {name} splits the {items} into {b} equal piles and keeps one pile.",),
}
_STEP_LINE = re.compile(r"^(-?\d+) ([-+*/]) (\d+) = (-?\d+)$")


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


# ---------------------------------------------------------------------------------------------
# benchmark loaders
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    files: dict[str, str]  # split -> path under $RLPIPE_DATA_DIR
    hub: dict[str, tuple[str, str | None, str]]  # split -> (dataset id, config name, hub split)
    question_field: str
    answer_field: str
    solution_field: str | None = None
    id_field: str | None = None  # None: "<name>/<split>/<row index>"


_SOURCES: dict[str, _Source] = {
    "gsm8k": _Source(
        files={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
        hub={"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")},
        question_field="question",
        answer_field="answer",  # the worked solution, ending "#### N"
        solution_field="answer",
    ),
    "aime24": _Source(
        files={"test": "aime/aime2024.jsonl"},
        hub={"test": ("HuggingFaceH4/aime_2024", None, "train")},
        question_field="problem",
        answer_field="answer",
        solution_field="solution",
        id_field="id",
    ),
    "aime25": _Source(
        files={"test": "aime/aime2025.jsonl"},
        hub={"test": ("yentinglin/aime_2025", None, "train")},
        question_field="problem",
        answer_field="answer",
        solution_field="solution",
        id_field="id",
    ),
    "math500": _Source(
        files={"test": "math500/test.jsonl"},
        hub={"test": ("HuggingFaceH4/MATH-500", None, "test")},
        question_field="problem",
        answer_field="answer",
        solution_field="solution",
        id_field="unique_id",
    ),
}
DATASET_NAMES = ("arith", *_SOURCES)
ARITH_EVAL_SIZE = 500  # arith problems in `load_problems("arith", ...)` when no limit is given


def load_problems(name: str, split: str = "test", limit: int | None = None) -> list[Problem]:
    """The problems of a dataset split, in file order (`limit`: the first N).

    `arith` is generated (seed 0, default difficulty, `limit` or 500 problems); the others are read
    from `$RLPIPE_DATA_DIR` when it is set, else downloaded from the Hugging Face Hub.
    """
    if name == "arith":
        return arith_problems(split, ARITH_EVAL_SIZE if limit is None else limit, seed=0)  # type: ignore[arg-type]
    source = _SOURCES.get(name)
    if source is None:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    if split not in source.files:
        raise DataError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(source.files)}")
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        records = _read_jsonl(Path(data_dir) / source.files[split], limit)
    else:
        records = _read_hub(*source.hub[split], limit)
    return [_to_problem(name, split, source, i, record, where) for i, (where, record) in enumerate(records)]


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (set {DATA_DIR_ENV} to the folder holding the data files)"
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((f"{path}:{lineno}", record))
    return records


def _read_hub(dataset_id: str, config: str | None, split: str, limit: int | None) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # network, auth, renamed dataset: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"could not load {dataset_id} ({split}) from the Hugging Face Hub: {reason}; "
            f"set {DATA_DIR_ENV} to a local copy of the data files"
        ) from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [(f"{dataset_id} ({split}) row {i}", dict(row)) for i, row in enumerate(ds)]


def _to_problem(name: str, split: str, source: _Source, index: int, record: dict, where: str) -> Problem:
    def field(key: str) -> str:
        if record.get(key) is None:
            raise DataError(f"{where}: record has no field '{key}'")
        return str(record[key])

    question, answer = field(source.question_field), field(source.answer_field)
    solution = record.get(source.solution_field) if source.solution_field else None
    if name == "gsm8k":
        if "#### " not in answer:
            raise DataError(f"{where}: field '{source.answer_field}' has no '#### ' final answer")
        answer = answer.rsplit("#### ", 1)[1].strip().replace(",", "")
    elif name.startswith("aime") and answer.strip().isdigit():
        answer = str(int(answer))  # "025" -> "25"
    pid = f"{name}/{field(source.id_field)}" if source.id_field else f"{name}/{split}/{index}"
    return Problem(pid, name, question, answer.strip(), None if solution is None else str(solution))


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
HASH_PROMPT = (
    "Question: {question}\n"
    "Solve it step by step, then give the final number on a last line as '#### N'.\n"
    "Answer:\n"
)
BOXED_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
PROMPT_TEMPLATES: dict[str, str] = {
    "arith": HASH_PROMPT,
    "gsm8k": HASH_PROMPT,
    "math500": BOXED_PROMPT,
    "aime24": BOXED_PROMPT,
    "aime25": BOXED_PROMPT,
}


def format_prompt(problem: Problem, template: str | None = None) -> str:
    """The prompt text: `template` is a registry name, a string with `{question}`, or None (the
    problem's dataset's template). Substitution is literal, so templates may contain `\\boxed{}`."""
    if template is None:
        template = problem.dataset
    if template in PROMPT_TEMPLATES:
        template = PROMPT_TEMPLATES[template]
    elif "{question}" not in template:
        raise DataError(
            f"prompt template {template[:40]!r} is neither a known name ({', '.join(PROMPT_TEMPLATES)}) "
            "nor a string containing {question}"
        )
    return template.replace("{question}", problem.question)


# ---------------------------------------------------------------------------------------------
# preference pairs
# ---------------------------------------------------------------------------------------------
def preference_pairs_from_problems(problems: list[Problem], seed: int) -> list[PreferencePair]:
    """chosen = the reference solution, rejected = a corrupted copy whose final answer is wrong.

    Corruption (seeded): for arith-style solutions (one `x op b = y` per line) half of the pairs get a
    wrong intermediate result that propagates through the later steps; otherwise the final answer
    (`#### N`, or an integer in the last `\\boxed{}`) is changed. Problems without a solution, or
    whose pair the verifier does not grade as (correct, wrong), are left out.
    """
    from stages.rewards import grade

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
    ds = _open_pair_dataset(dataset_id_or_path, split)
    wanted = [f for f in (prompt_field, chosen_field, rejected_field, margin_field) if f]
    for name in wanted:
        if name not in ds.column_names:
            raise DataError(
                f"{dataset_id_or_path} ({split}): no field '{name}' (fields: {', '.join(ds.column_names)})"
            )
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


def _open_pair_dataset(source: str, split: str) -> Any:
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        if path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise DataError(
                    f"{source}: unsupported file type (use .jsonl, .json, .parquet or a dataset folder)"
                )
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load preference data {source} ({split}): {reason}") from None


def _as_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise DataError(f"{where}: field '{field}' is neither text nor a list of chat messages")
