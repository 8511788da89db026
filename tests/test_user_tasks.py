"""Training on a user's dataset: local JSONL / Parquet files and `save_to_disk` folders, read through
`datasets` (the loading code the hub path uses too), with configurable fields, answer formats and
graders; the held-out rows never overlap the trained ones; bad files and fields fail in one line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import rlpipe, sets

from stages.config.task import TaskConfig
from stages.data.grading import grade
from stages.data.problems import format_prompt
from stages.data.records import DataError
from stages.data.tasks import task_problems
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_style(n: int) -> list[dict]:
    return [
        {
            "problem": f"Tom has {i} apples and buys 2 more. How many?",
            "worked": f"{i} + 2 = {i + 2}\n#### {i + 2:,}",
        }
        for i in range(n)
    ]


def test_a_jsonl_file_with_its_own_field_names_and_a_held_out_tail(tmp_path):
    path = write_jsonl(tmp_path / "apples.jsonl", gsm8k_style(10))
    task = TaskConfig(
        dataset=str(path), question_field="problem", answer_field="worked", solution_field="worked",
        answer_format="hash", test_split=None, train_size=5, heldout_size=3,
    )  # fmt: skip
    train, heldout = task_problems(task, "train"), task_problems(task, "test")
    assert [p.id for p in train] == [f"{path}/train/{i}" for i in range(5)]
    assert [p.id for p in heldout] == [f"{path}/train/{i}" for i in (7, 8, 9)]  # the last 3 rows
    assert [p.answer for p in heldout] == ["9", "10", "11"]  # "1,000"-style commas would be removed too
    assert train[0].solution == "0 + 2 = 2\n#### 2" and train[0].dataset == "numeric"
    assert format_prompt(train[0]).startswith("Question: Tom has 0 apples")  # the GSM8K-style prompt
    assert grade(train[0].dataset, "so 0 + 2 = 2\n#### 2", train[0].answer)
    assert not grade(train[0].dataset, "#### 3", train[0].answer)

    # train_size larger than what is left: every row but the held-out tail, never an overlap
    task = task.model_copy(update={"train_size": 100})
    assert {p.id for p in task_problems(task, "train")}.isdisjoint(p.id for p in heldout)
    assert len(task_problems(task, "train")) == 7


def test_a_parquet_file_with_boxed_answers_graded_by_math_verify(tmp_path):
    rows = {
        "q": ["What is one half?", "What is 2 + 2?", "Simplify 6/8."],
        "sol": ["Half is \\boxed{\\frac{1}{2}}.", "It is \\boxed{4}", "That is \\boxed{\\frac{3}{4}}"],
    }
    path = tmp_path / "math.parquet"
    pq.write_table(pa.table(rows), path)
    task = TaskConfig(
        dataset=str(path), question_field="q", answer_field="sol", answer_format="boxed", grader="boxed",
        test_split=None, heldout_size=1,
    )  # fmt: skip
    train = task_problems(task, "train")
    assert [p.answer for p in train] == ["\\frac{1}{2}", "4"] and train[0].solution is None
    assert "\\boxed{}" in format_prompt(train[0])  # the MATH-style prompt
    assert grade("boxed", "so the answer is \\boxed{0.5}", train[0].answer)  # math-verify equivalence
    assert not grade("boxed", "0.5", train[0].answer)  # no boxed answer: wrong
    assert [p.answer for p in task_problems(task, "test")] == ["\\frac{3}{4}"]


def test_a_saved_dataset_folder_with_train_and_test_splits(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"question": f"q{i}", "answer": str(i)} for i in range(6)]),
            "test": datasets.Dataset.from_list([{"question": "t0", "answer": "40"}]),
        }
    ).save_to_disk(str(folder))
    task = TaskConfig(dataset=str(folder), answer_format="plain", train_size=4, heldout_size=5)
    assert [p.question for p in task_problems(task, "train")] == ["q0", "q1", "q2", "q3"]
    assert [(p.question, p.answer) for p in task_problems(task, "test")] == [("t0", "40")]


@pytest.mark.parametrize(
    "update, rows, message",
    [
        (
            {"test_split": "test"},
            gsm8k_style(4),
            "is one file, so it has one split: set task.test_split=null",
        ),
        ({"question_field": "question"}, gsm8k_style(4), "no field 'question' (fields: problem, worked)"),
        ({"heldout_size": 4}, gsm8k_style(4), "4 rows leave none to train on"),
        (
            {},
            [{"problem": "p", "worked": "no final line"}] * 3,
            "row 0: field 'worked' has no '#### ' final answer",
        ),
        ({}, [{"problem": "", "worked": "#### 1"}] * 3, "row 0: field 'problem' is empty"),
    ],
)
def test_bad_files_and_fields_fail_in_one_line(tmp_path, update, rows, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fields = {"question_field": "problem", "answer_field": "worked", "test_split": None, "heldout_size": 1}
    task = TaskConfig(dataset=str(path), **{**fields, **update})
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        task_problems(task, "train")
    assert "\n" not in str(err.value)


def test_an_evaluation_benchmark_is_not_a_training_set():
    with pytest.raises(ValueError, match="math500 is an evaluation benchmark"):
        TaskConfig(dataset="math500")


def test_sft_trains_on_a_user_file_through_the_cli(tmp_path):
    path = write_jsonl(tmp_path / "apples.jsonl", gsm8k_style(40))
    overrides = [
        "wandb.mode=disabled", f"task.dataset={path}", "task.question_field=problem",
        "task.answer_field=worked", "task.solution_field=worked", "task.test_split=null",
        "task.heldout_size=4", "sft.steps=2", "sft.batch_size=8", "sft.save_every=2", "sft.log_every=1",
    ]  # fmt: skip
    proc = rlpipe("stage", "sft", "--run-id", "user", "--storage", str(tmp_path / "runs"), *sets(overrides))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = read_manifest(RunLayout(Location(str(tmp_path / "runs")), "user").manifest("sft"))
    assert manifest is not None and manifest.metrics["train_problems"] == 36

    bad = rlpipe(
        "stage", "sft", "--run-id", "user2", "--storage", str(tmp_path / "runs"),
        *sets([*overrides, "task.question_field=nope"]),
    )  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ")
    assert "no field 'nope'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
