"""Rollout Parquet files: schema, validation, round trip on both backends, other readers, resume."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from storage.layout import RunLayout
from storage.rollouts import (
    ROLLOUT_SCHEMA,
    ROLLOUT_SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    RolloutSchemaError,
    build_rollout_table,
    delete_rollouts_after,
    read_rollouts,
    rollout_data_files,
    rollout_parts,
    write_rollouts,
)

STAGE = "ppo"


def make_columns(step: int, rank: int, n: int = 3, seed: int = 0) -> dict[str, list]:
    """`n` valid rows as python lists. Floats are multiples of 1/8, exact in float32, so values compare exactly."""
    rng = random.Random(seed * 1000 + step * 10 + rank)

    def floats(k: int) -> list[float]:
        return [rng.randint(-64, 64) / 8 for _ in range(k)]

    lengths = [rng.randint(0, 4) for _ in range(n)]
    return {
        "run_id": ["run1"] * n,
        "stage": [STAGE] * n,
        "step": [step] * n,
        "policy_version": [step] * n,
        "prompt_id": [f"p{rank}-{i // 2}" for i in range(n)],
        "sample_idx": [i % 2 for i in range(n)],
        "dataset": ["gsm8k"] * n,
        "prompt": [f"prompt {step}/{rank}/{i}" for i in range(n)],
        "response": [f"response {rng.random()}" for _ in range(n)],
        "ground_truth": [str(rng.randint(0, 99)) for _ in range(n)],
        "prompt_ids": [[rng.randint(0, 50_000) for _ in range(5)] for _ in range(n)],
        "response_ids": [[rng.randint(0, 50_000) for _ in range(k)] for k in lengths],
        "logprobs": [floats(k) for k in lengths],
        "ref_logprobs": [floats(k) for k in lengths],
        "values": [floats(k) for k in lengths],
        "advantages": [floats(k) for k in lengths],
        "returns": [floats(k) for k in lengths],
        "score": floats(n),
        "rm_score": floats(n),
        "reward": floats(n),
        "is_correct": [rng.random() < 0.5 for _ in range(n)],
        "finish_reason": [rng.choice(["stop", "length"]) for _ in range(n)],
        "response_len": lengths,
    }


def write_run(layout: RunLayout, steps=range(1, 4), ranks=(0, 1)) -> dict[tuple[int, int], dict]:
    written = {}
    for step in steps:
        for rank in ranks:
            written[step, rank] = make_columns(step, rank)
            assert write_rollouts(layout.rollout_part(STAGE, step, rank), written[step, rank]) == 3
    return written


def rows(columns: dict[str, list]) -> list[dict]:
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


# ---- schema -------------------------------------------------------------------------------------


def test_schema_columns_order_and_nullability():
    assert ROLLOUT_SCHEMA.names[:3] == ["run_id", "stage", "step"]
    assert ROLLOUT_SCHEMA.names[-1] == "response_len" and len(ROLLOUT_SCHEMA) == 23
    assert [f.name for f in ROLLOUT_SCHEMA if f.nullable] == ["rm_score"]
    assert ROLLOUT_SCHEMA.field("response_ids").type == pa.list_(pa.int32())
    assert ROLLOUT_SCHEMA.field("advantages").type == pa.list_(pa.float32())
    assert ROLLOUT_SCHEMA.metadata == {b"rlpipe.rollout_schema_version": b"1"}


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip_two_ranks_three_steps(storage_root):
    layout = RunLayout(storage_root, "run1")
    written = write_run(layout)
    rollouts = layout.rollouts(STAGE)

    table = read_rollouts(rollouts)
    assert table.schema.equals(ROLLOUT_SCHEMA, check_metadata=True)
    assert table.num_rows == 18
    expected = [row for step in (1, 2, 3) for rank in (0, 1) for row in rows(written[step, rank])]
    assert table.to_pylist() == expected

    parts = rollout_parts(rollouts, steps=range(2, 4))
    assert [p.uri.split("/rollouts/")[1] for p in parts] == [
        "step=000002/part-00000.parquet",
        "step=000002/part-00001.parquet",
        "step=000003/part-00000.parquet",
        "step=000003/part-00001.parquet",
    ]
    assert read_rollouts(rollouts, steps=range(2, 4)).to_pylist() == expected[6:]
    assert read_rollouts(rollouts, steps=[3, 1]).column("step").to_pylist() == [1] * 6 + [3] * 6
    assert read_rollouts(rollouts, steps=[7]).num_rows == 0

    with parts[0].fs.open(parts[0].path, "rb") as f:
        metadata = pq.read_schema(f).metadata
    assert metadata[SCHEMA_VERSION_KEY] == ROLLOUT_SCHEMA_VERSION.encode()


def test_rewriting_a_part_replaces_it(storage_root):
    part = RunLayout(storage_root, "run1").rollout_part(STAGE, 5, 0)
    write_rollouts(part, make_columns(5, 0, seed=1))
    write_rollouts(part, make_columns(5, 0, seed=2))
    assert read_rollouts(RunLayout(storage_root, "run1").rollouts(STAGE)).to_pylist() == rows(
        make_columns(5, 0, seed=2)
    )


def test_empty_and_stray_files(storage_root):
    rollouts = RunLayout(storage_root, "run1").rollouts(STAGE)
    empty = read_rollouts(rollouts)
    assert empty.num_rows == 0 and empty.schema.equals(ROLLOUT_SCHEMA)

    write_rollouts(rollouts / "step=000001" / "part-00000.parquet", make_columns(1, 0))
    (rollouts / "step=000001" / ".tmp-abc123").write_bytes(b"half a file")
    (rollouts / "step=000001" / "notes.txt").write_text("not a part")
    (rollouts / "other" / "part-00000.parquet").write_bytes(b"not in a step folder")
    assert [p.name for p in rollout_parts(rollouts)] == ["part-00000.parquet"]
    assert read_rollouts(rollouts).num_rows == 3


def test_rm_score_may_be_null(storage_root):
    columns = make_columns(1, 0)
    columns["rm_score"] = [None, 0.5, None]
    columns["values"] = [[], [], []]  # GRPO: no critic, empty lists
    rollouts = RunLayout(storage_root, "run1").rollouts(STAGE)
    write_rollouts(rollouts / "step=000001" / "part-00000.parquet", columns)
    table = read_rollouts(rollouts)
    assert table.column("rm_score").to_pylist() == [None, 0.5, None]
    assert table.column("values").to_pylist() == [[], [], []]


def test_arrays_and_tables_are_accepted_and_cast():
    columns = make_columns(1, 0)
    columns["response_len"] = pa.array(columns["response_len"], pa.int64())  # safe cast to int32
    columns["score"] = pa.array([1, 2, 3], pa.int64())  # ints are exact in float32
    table = build_rollout_table(columns)
    assert table.schema.equals(ROLLOUT_SCHEMA, check_metadata=True)
    assert table.column("score").to_pylist() == [1.0, 2.0, 3.0]
    assert build_rollout_table(table.select(list(reversed(table.column_names)))).equals(table)


# ---- other readers ------------------------------------------------------------------------------


def test_plain_pyarrow_reads_parts_as_one_dataset(storage_root):
    layout = RunLayout(storage_root, "run1")
    write_run(layout)
    rollouts = layout.rollouts(STAGE)
    expected = read_rollouts(rollouts)
    paths = [p.path for p in rollout_parts(rollouts)]

    from_files = ds.dataset(paths, filesystem=rollouts.fs, format="parquet").to_table()
    from_folder = ds.dataset(rollouts.path, filesystem=rollouts.fs, format="parquet").to_table()
    assert from_files.equals(expected)
    assert from_folder.num_rows == 18
    assert sorted(from_folder.to_pylist(), key=str) == sorted(expected.to_pylist(), key=str)


def test_pyarrow_and_pandas_need_partitioning_none(local_root):
    layout = RunLayout(local_root, "run1")
    write_run(layout)
    rollouts = layout.rollouts(STAGE)
    expected = read_rollouts(rollouts)
    files = rollout_data_files(rollouts)

    # The documented pitfall: `step=` folders are taken as a dictionary-typed hive key.
    with pytest.raises(pa.ArrowTypeError, match="step"):
        pq.read_table(rollouts.path)
    assert pq.read_table(files, partitioning=None).equals(expected)
    assert pq.read_table(rollouts.path, partitioning=None).num_rows == 18

    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(files, partitioning=None)
    assert len(frame) == 18 and str(frame["step"].dtype) == "int32"
    assert frame["response"].tolist() == expected.column("response").to_pylist()


def test_huggingface_datasets_reads_data_files(local_root, tmp_path):
    datasets = pytest.importorskip("datasets")
    layout = RunLayout(local_root, "run1")
    write_run(layout)
    rollouts = layout.rollouts(STAGE)
    expected = read_rollouts(rollouts, steps=range(2, 4))

    loaded = datasets.load_dataset(
        "parquet",
        data_files=rollout_data_files(rollouts, steps=range(2, 4)),
        split="train",
        cache_dir=str(tmp_path / "hf_cache"),
    )
    assert loaded.num_rows == 12
    assert loaded.column_names == ROLLOUT_SCHEMA.names
    assert loaded["step"][:] == expected.column("step").to_pylist()
    assert loaded["advantages"][:] == expected.column("advantages").to_pylist()


# ---- validation ---------------------------------------------------------------------------------


def _missing(c):
    del c["score"]


def _mistyped(c):
    c["response_len"] = ["7", "8", "9"]


def _null(c):
    c["reward"] = [0.5, None, 1.0]


def _null_in_list(c):
    c["logprobs"] = [[0.5, None], [], []]


def _unequal(c):
    c["prompt"] = c["prompt"][:2]


def _extra(c):
    c["foo"] = [1, 2, 3]


def _lossy_int(c):
    c["step"] = [2**40] * 3


def _truncated_float(c):
    c["sample_idx"] = [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_missing, "missing column 'score'"),
        (_mistyped, "column 'response_len' has type string, expected int32"),
        (_null, "column 'reward' has nulls"),
        (_null_in_list, "column 'logprobs' has nulls inside its lists"),
        (_unequal, "column 'prompt' has 2 rows but column 'run_id' has 3"),
        (_extra, "unexpected column 'foo'"),
        (_lossy_int, "column 'step' does not fit int32"),
        (_truncated_float, "column 'sample_idx' has type double, expected int32"),
    ],
)
def test_invalid_columns_are_rejected_and_nothing_is_written(storage_root, corrupt, message):
    columns = make_columns(1, 0)
    corrupt(columns)
    rollouts = RunLayout(storage_root, "run1").rollouts(STAGE)
    with pytest.raises(RolloutSchemaError) as info:
        write_rollouts(rollouts / "step=000001" / "part-00000.parquet", columns)
    assert str(info.value).startswith(f"rollouts: {message}")
    assert "\n" not in str(info.value)
    assert rollouts.walk_files() == []


def test_string_digits_in_an_int_array_are_not_parsed():
    columns = make_columns(1, 0)
    columns["policy_version"] = pa.array(["1", "1", "1"])  # Arrow's own cast would parse these
    with pytest.raises(RolloutSchemaError, match="'policy_version' has type string"):
        build_rollout_table(columns)


def test_step_column_must_match_the_step_folder(storage_root):
    rollouts = RunLayout(storage_root, "run1").rollouts(STAGE)
    with pytest.raises(RolloutSchemaError, match="column 'step' has values other than 2"):
        write_rollouts(rollouts / "step=000002" / "part-00000.parquet", make_columns(1, 0))
    assert rollouts.walk_files() == []


def test_schema_version_mismatch_names_the_file(storage_root):
    rollouts = RunLayout(storage_root, "run1").rollouts(STAGE)
    write_rollouts(rollouts / "step=000001" / "part-00000.parquet", make_columns(1, 0))
    old = build_rollout_table(make_columns(2, 0)).replace_schema_metadata({SCHEMA_VERSION_KEY: b"0"})
    sink = pa.BufferOutputStream()
    pq.write_table(old, sink)
    bad = rollouts / "step=000002" / "part-00000.parquet"
    bad.write_bytes(sink.getvalue().to_pybytes())

    with pytest.raises(RolloutSchemaError, match=r"step=000002/part-00000\.parquet has schema version '0'"):
        read_rollouts(rollouts)
    assert read_rollouts(rollouts, steps=[1]).num_rows == 3


# ---- resume -------------------------------------------------------------------------------------


def test_delete_rollouts_after_removes_later_steps_only(storage_root):
    layout = RunLayout(storage_root, "run1")
    write_run(layout, steps=range(1, 5))
    rollouts = layout.rollouts(STAGE)
    other_stage = layout.rollout_part("critic_warmup", 9, 0)
    write_rollouts(other_stage, make_columns(9, 0))

    assert delete_rollouts_after(rollouts, 2) == [3, 4]
    assert sorted({int(p.uri.split("step=")[1][:6]) for p in rollout_parts(rollouts)}) == [1, 2]
    assert read_rollouts(rollouts).column("step").to_pylist() == [1] * 6 + [2] * 6
    assert [name for name in rollouts.list_names()] == ["step=000001", "step=000002"]
    assert delete_rollouts_after(rollouts, 2) == []
    assert other_stage.exists()

    # resumed steps are written again: each step appears once
    write_run(layout, steps=[3])
    assert read_rollouts(rollouts).num_rows == 18


def test_delete_rollouts_after_without_rollouts(storage_root):
    assert delete_rollouts_after(RunLayout(storage_root, "run1").rollouts(STAGE), 0) == []
