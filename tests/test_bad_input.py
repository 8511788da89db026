"""Bad input through the real CLI: one line naming the problem, a non-zero exit, nothing committed.

The CLI-level cases (unknown keys, types, recipes, stages, runs, benchmarks) are in test_cli and
test_stage_evaluate; these are the ones that reach a stage: broken or empty data files, prompts
that do not fit the model's context, unusable storage roots and missing credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_runs import RLPIPE

from storage.checkpoints import committed_steps
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest

GSM8K_SFT = [
    "--set", "wandb.mode=disabled", "--set", "task.dataset=gsm8k", "--set", "task.train_size=8",
    "--set", "task.heldout_size=4", "--set", "sft.steps=2", "--set", "generation.max_new_tokens=16",
]  # fmt: skip
GOOD = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}


def write_gsm8k(root: Path, train: list[dict] | str) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    lines = train if isinstance(train, str) else "".join(json.dumps(r) + "\n" for r in train)
    (root / "gsm8k" / "train.jsonl").write_text(lines)
    (root / "gsm8k" / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
    return root


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "train,message",
    [
        ([GOOD, {"question": "no answer here"}], "train.jsonl:2: record has no field 'answer'"),
        (
            [GOOD, {"question": "x", "answer": "no final line"}],
            "train.jsonl:2: field 'answer' has no '#### '",
        ),
        ('{"question": "cut off', "train.jsonl:1: not valid JSON"),
        ("", "task dataset 'gsm8k' split 'train' has no problems"),
        (
            [GOOD, {"question": "1 + " * 400 + "1?", "answer": "#### 401"}],
            "sft train: 1 of 2 prompts do not fit the model's context of 512 tokens",
        ),
    ],
    ids=["missing-field", "no-final-answer", "bad-json", "empty-file", "prompt-too-long"],
)
def test_bad_data_stops_the_stage_with_one_line_and_commits_nothing(tmp_path, train, message):
    data = write_gsm8k(tmp_path / "data", train)
    root = tmp_path / "runs"
    proc = subprocess.run(
        [RLPIPE, "stage", "sft", "--run-id", "bad", "--storage", str(root), *GSM8K_SFT],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RLPIPE_DATA_DIR": str(data)},
    )  # fmt: skip
    line = one_line_failure(proc)
    assert line.startswith("error: stage sft failed: ") and message in line, line
    layout = RunLayout(Location(str(root)), "bad")
    assert read_manifest(layout.manifest("sft")) is None
    assert committed_steps(layout.checkpoints("sft")) == []
    # the run's config record (the run the command created) is all there is: no stage output
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["bad", "bad/pipeline.json"]


def test_storage_root_through_a_file_is_refused_before_anything_is_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [RLPIPE, "run", "--storage", str(blocker / "runs"), "--run-id", "r"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "storage" in one_line_failure(proc) and blocker.read_text() == "not a directory"


def test_s3_storage_without_credentials_is_one_line(s3_endpoint):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    env |= {"AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.run(
        [RLPIPE, "run", "--storage", "s3://no-creds/runs", "--run-id", "r",
         "--set", f"storage.endpoint_url={s3_endpoint}"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert "storage: no credentials" in one_line_failure(proc)
