"""Rollouts: one Parquet row per sampled response, one part file per rank per step.

    {root}/{run_id}/{stage}/rollouts/step=000040/part-00000.parquet    (paths: storage.layout)

Each rank writes its own part for its own step, so writers never share a file and a part is
written whole (atomically). Writing a part again replaces it, and on resume
`delete_rollouts_after(step)` drops the steps after the resumed checkpoint, so a run's rollouts
hold every step exactly once.

Schema (`ROLLOUT_SCHEMA`, DESIGN section 5): the column order is fixed, every column except
`rm_score` is non-nullable (lists may be empty: GRPO has no `values`, but are never null), and
the version is stored in the file's key-value metadata so that a reader can refuse files it
does not understand instead of misreading them.

Reading a run's rollouts with other tools, as one dataset:

    read_rollouts(rollouts, steps=range(0, 100))                       # this module
    pyarrow.dataset.dataset(folder_or_files, format="parquet").to_table()
    pyarrow.parquet.read_table(folder_or_files, partitioning=None)
    pandas.read_parquet(folder_or_files, partitioning=None)
    datasets.load_dataset("parquet", data_files=rollout_data_files(rollouts), split="train")

`partitioning=None` is needed by `pq.read_table` and `pd.read_parquet` (pyarrow 26): by default
they treat `step=000040` as a hive partition key, infer it as dictionary<int32>, and fail with
"Unable to merge: Field step has incompatible types: int32 vs dictionary<...>" against the
int32 `step` column - for a folder and for a list of files alike. The folder name and the
column always agree (`write_rollouts` checks it), so ignoring the folder loses nothing.
`pyarrow.dataset.dataset` does not partition by default, and `datasets` reads the files as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.location import Location

ROLLOUT_SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"rlpipe.rollout_schema_version"

_INT_LIST = pa.list_(pa.int32())
_FLOAT_LIST = pa.list_(pa.float32())
ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field(name, type_, nullable=(name == "rm_score"))
        for name, type_ in [
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("step", pa.int32()),
            ("policy_version", pa.int32()),
            ("prompt_id", pa.string()),
            ("sample_idx", pa.int32()),
            ("dataset", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("ground_truth", pa.string()),
            ("prompt_ids", _INT_LIST),
            ("response_ids", _INT_LIST),
            ("logprobs", _FLOAT_LIST),
            ("ref_logprobs", _FLOAT_LIST),
            ("values", _FLOAT_LIST),
            ("advantages", _FLOAT_LIST),
            ("returns", _FLOAT_LIST),
            ("score", pa.float32()),  # task / verifier score
            ("rm_score", pa.float32()),  # reward model score; null when no reward model is used
            ("reward", pa.float32()),  # total scalar reward
            ("is_correct", pa.bool_()),
            ("finish_reason", pa.string()),
            ("response_len", pa.int32()),
        ]
    ],
    metadata={SCHEMA_VERSION_KEY: ROLLOUT_SCHEMA_VERSION.encode()},
)

# Mirrors RunLayout.rollout_part: `step=` six or more digits, `part-` five or more digits.
_PART = re.compile(r"^step=(\d{6,})/part-(\d{5,})\.parquet$")
_STEP_DIR = re.compile(r"^step=(\d{6,})$")


class RolloutSchemaError(ValueError):
    """Rollout data does not match ROLLOUT_SCHEMA (message is one line naming the column or file)."""


def _kind(type_: pa.DataType) -> str:
    """Coarse type family: casts are allowed within a family (and int -> float), never across."""
    for family, test in [
        ("int", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        ("list", lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)),
        ("null", pa.types.is_null),
    ]:
        if test(type_):
            return family
    return str(type_)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    # Arrow would also cast '12' -> 12 and True -> 1: such casts hide bugs, so they are refused.
    src, dst = _kind(source), _kind(target)
    if src == "null":
        return True  # all-null or empty input: the null check below decides
    if src == dst == "list":
        return _castable(source.value_type, target.value_type)
    return src == dst or (src, dst) == ("int", "float")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _column(name: str, values: Sequence | pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    field = ROLLOUT_SCHEMA.field(name)
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    elif not isinstance(values, pa.ChunkedArray):
        try:
            values = pa.chunked_array([pa.array(values)])
        except (pa.ArrowException, TypeError, ValueError) as err:
            raise RolloutSchemaError(
                f"rollouts: column {name!r} cannot be converted to {field.type}: {_first_line(err)}"
            ) from None
    if not _castable(values.type, field.type):
        raise RolloutSchemaError(f"rollouts: column {name!r} has type {values.type}, expected {field.type}")
    try:
        column = values.cast(field.type, safe=True)  # safe: out-of-range ints and truncated floats raise
    except pa.ArrowException as err:
        raise RolloutSchemaError(
            f"rollouts: column {name!r} does not fit {field.type}: {_first_line(err)}"
        ) from None
    if not field.nullable and column.null_count:
        raise RolloutSchemaError(f"rollouts: column {name!r} has nulls")
    if pa.types.is_list(field.type) and pc.list_flatten(column).null_count:
        raise RolloutSchemaError(f"rollouts: column {name!r} has nulls inside its lists")
    return column


def build_rollout_table(columns: Mapping[str, Sequence | pa.Array] | pa.Table) -> pa.Table:
    """Validate columns (python lists, arrays or a Table) and return a Table with exactly ROLLOUT_SCHEMA."""
    if isinstance(columns, pa.Table):
        if len(set(columns.column_names)) != columns.num_columns:
            raise RolloutSchemaError(f"rollouts: duplicate column names in {columns.column_names}")
        columns = dict(zip(columns.column_names, columns.columns, strict=True))
    for name in ROLLOUT_SCHEMA.names:
        if name not in columns:
            raise RolloutSchemaError(f"rollouts: missing column {name!r}")
    for name in columns:
        if name not in ROLLOUT_SCHEMA.names:
            raise RolloutSchemaError(f"rollouts: unexpected column {name!r}")
    first = ROLLOUT_SCHEMA.names[0]
    for name in ROLLOUT_SCHEMA.names:
        if len(columns[name]) != len(columns[first]):
            raise RolloutSchemaError(
                f"rollouts: column {name!r} has {len(columns[name])} rows but column {first!r} has {len(columns[first])}"
            )
    arrays = [_column(name, columns[name]) for name in ROLLOUT_SCHEMA.names]
    return pa.Table.from_arrays(arrays, schema=ROLLOUT_SCHEMA)


def write_rollouts(part: Location, table_or_columns: Mapping[str, Sequence | pa.Array] | pa.Table) -> int:
    """Write one part file (`RunLayout.rollout_part(stage, step, rank)`) atomically; returns rows written.

    Everything is validated and serialised in memory first, so a bad batch writes nothing and a
    crash leaves the previous part or none, never half a file.
    """
    table = build_rollout_table(table_or_columns)
    parent = part.uri.rstrip("/").split("/")[-2:-1]  # the `step=NNNNNN` folder, if any
    step_dir = _STEP_DIR.match(parent[0]) if parent else None
    if step_dir and table.num_rows:
        step = int(step_dir.group(1))
        if pc.min(table["step"]).as_py() != step or pc.max(table["step"]).as_py() != step:
            raise RolloutSchemaError(
                f"rollouts: column 'step' has values other than {step}, the step of {part.uri}"
            )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    part.write_bytes(sink.getvalue().to_pybytes())
    return table.num_rows


def rollout_parts(rollouts: Location, steps: range | Iterable[int] | None = None) -> list[Location]:
    """Part files under a stage's `rollouts/` folder, sorted by step then rank, optionally only `steps`.

    Anything not named like a part (temporary files of an interrupted write, stray files) is ignored.
    """
    wanted = None if steps is None else steps if isinstance(steps, range) else set(steps)
    found = []
    for relative in rollouts.walk_files():  # one recursive listing, not one per step
        match = _PART.match(relative)
        if match and (wanted is None or int(match.group(1)) in wanted):
            found.append((int(match.group(1)), int(match.group(2)), rollouts / relative))
    return [location for _, _, location in sorted(found, key=lambda item: item[:2])]


def rollout_steps(rollouts: Location) -> list[int]:
    """The steps that have at least one part file, ascending."""
    return sorted(
        {int(_PART.match(relative).group(1)) for relative in rollouts.walk_files() if _PART.match(relative)}
    )


def rollout_data_files(rollouts: Location, steps: range | Iterable[int] | None = None) -> list[str]:
    """URIs of the part files, for other readers: `datasets.load_dataset("parquet", data_files=...)`."""
    return [part.uri for part in rollout_parts(rollouts, steps)]


def read_rollouts(rollouts: Location, steps: range | Iterable[int] | None = None) -> pa.Table:
    """All parts (of `steps`, default all) as one Table with ROLLOUT_SCHEMA; empty if there are none."""
    tables = []
    for part in rollout_parts(rollouts, steps):
        table = pq.read_table(pa.BufferReader(part.read_bytes()))
        version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"").decode() or None
        if version != ROLLOUT_SCHEMA_VERSION:
            raise RolloutSchemaError(
                f"rollouts: {part.uri} has schema version {version!r}, expected {ROLLOUT_SCHEMA_VERSION!r}"
            )
        try:
            tables.append(build_rollout_table(table))
        except RolloutSchemaError as err:
            raise RolloutSchemaError(f"{err} (in {part.uri})") from None
    return pa.concat_tables(tables) if tables else ROLLOUT_SCHEMA.empty_table()


def delete_rollouts_after(rollouts: Location, step: int) -> list[int]:
    """Remove the step folders after `step`; returns the removed steps.

    Called on resume from the checkpoint of `step`: the steps after it are sampled again, and
    their old rollouts must be replaced, never kept beside the new ones.
    """
    removed = []
    for name in rollouts.list_names():
        match = _STEP_DIR.match(name)
        if match and int(match.group(1)) > step:
            (rollouts / name).remove(recursive=True)
            removed.append(int(match.group(1)))
    return sorted(removed)
