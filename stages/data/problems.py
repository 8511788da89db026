"""Benchmark and task problems from files or the hub, and the prompt each becomes.

- `gsm8k`, `aime24`, `aime25`, `math500`: JSONL files under `$RLPIPE_DATA_DIR` (layout in the
  data README: `gsm8k/{train,test}.jsonl`, `aime/aime2024.jsonl`, ...), else the usual Hugging Face
  dataset ids; `arith` comes from the generator (`stages.data.arith`). Problems of every source
  become one record type, `Problem`.
- Prompts are plain text (a template per dataset); applying a chat template is the model's business.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from stages.data.arith import arith_problems
from stages.data.records import DataError, Problem

DATA_DIR_ENV = "RLPIPE_DATA_DIR"


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
    "numeric": HASH_PROMPT,  # a user's dataset graded like GSM8K (task.grader)
    "boxed": BOXED_PROMPT,  # a user's dataset graded like MATH
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
