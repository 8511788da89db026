"""Training problems from a user's dataset: any Hugging Face dataset id, `save_to_disk` folder or
.jsonl / .json / .parquet file, with its fields named in the task config.

Each row becomes a `Problem` whose `dataset` is the task's grader (`numeric` or `boxed`): that
name picks the verifier and the prompt template, as a built-in dataset's name does. The reference
answer is read from `answer_field` as `answer_format` says (GSM8K-style `#### N`, MATH-style
`\\boxed{}`, or the field itself). Without a held-out split (`test_split: null`, always for a single
file) the last `heldout_size` rows of the train split are held out and never trained on.
"""

from __future__ import annotations

from typing import Literal

from stages.config.task import TaskConfig
from stages.data.dataset_files import is_single_file, open_dataset, require_fields
from stages.data.grading import extract_boxed_answer
from stages.data.records import DataError, Problem


def user_problems(task: TaskConfig, split: Literal["train", "test"]) -> list[Problem]:
    """The first `train_size` training problems, or the `heldout_size` held-out ones."""
    source = task.dataset
    if task.test_split is not None and is_single_file(source):
        raise DataError(
            f"{source} is one file, so it has one split: set task.test_split=null to hold out its last "
            f"{task.heldout_size} rows"
        )
    if task.test_split is not None:  # a held-out split of its own
        split_name = task.test_split if split == "test" else task.train_split
        limit = task.heldout_size if split == "test" else task.train_size
        rows, first = _rows(task, split_name, limit), 0
    else:  # the tail of the train split is held out
        split_name = task.train_split
        table = _rows(task, split_name, limit=None)
        cut = len(table) - task.heldout_size
        if cut <= 0:
            raise DataError(
                f"{source} ({split_name}): {len(table)} rows leave none to train on after holding out the "
                f"last {task.heldout_size} (task.heldout_size)"
            )
        rows, first = (table[cut:], cut) if split == "test" else (table[:cut][: task.train_size], 0)
    problems = [_to_problem(task, split_name, first + i, row) for i, row in enumerate(rows)]
    if not problems:
        raise DataError(f"task dataset {source!r} split {split_name!r} has no problems")
    return problems


def _rows(task: TaskConfig, split: str, limit: int | None) -> list[dict]:
    ds = open_dataset(task.dataset, split, "task dataset")
    fields = [task.question_field, task.answer_field] + ([task.solution_field] if task.solution_field else [])
    require_fields(ds, task.dataset, split, fields)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row) for row in ds]


def _to_problem(task: TaskConfig, split: str, index: int, row: dict) -> Problem:
    where = f"{task.dataset} ({split}) row {index}"

    def text(field: str) -> str:
        value = row.get(field)
        if value is None or not str(value).strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return str(value)

    answer = _reference_answer(text(task.answer_field), task.answer_format, where, task.answer_field)
    solution = text(task.solution_field) if task.solution_field else None
    return Problem(
        f"{task.dataset}/{split}/{index}", task.grader, text(task.question_field), answer, solution
    )


def _reference_answer(value: str, answer_format: str, where: str, field: str) -> str:
    if answer_format == "hash":
        if "#### " not in value:
            raise DataError(
                f"{where}: field '{field}' has no '#### ' final answer (task.answer_format is hash)"
            )
        return value.rsplit("#### ", 1)[1].strip().replace(",", "")
    if answer_format == "boxed":
        boxed = extract_boxed_answer(value)
        if not boxed:
            raise DataError(
                f"{where}: field '{field}' has no \\boxed{{}} answer (task.answer_format is boxed)"
            )
        return boxed.strip()
    return value.strip()
