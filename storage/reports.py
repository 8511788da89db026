"""Evaluation outputs in storage: graded samples (Parquet) and report files, `report.json` last.

    {root}/{run_id}/evaluate/{label}/samples.parquet   one row per graded response
    {root}/{run_id}/evaluate/{label}/plots/*.png
    {root}/{run_id}/evaluate/{label}/report.md, report.html
    {root}/{run_id}/evaluate/{label}/report.json       written LAST: its presence means the label is done

Rendering the report (markdown, HTML, plots) is the evaluation stage's business; this module only
fixes the samples schema and the order of writes, and redacts secrets from what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.location import Location
from storage.secrets import redact

SAMPLES_SCHEMA_VERSION = "1"
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("label", pa.string(), nullable=False),  # the checkpoint's label (initial, final, ...)
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("problem", pa.string(), nullable=False),
        pa.field("ground_truth", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # greedy | sampled
        pa.field("sample_idx", pa.int32(), nullable=False),  # 0..N-1 (greedy: 0)
        pa.field("response", pa.string(), nullable=False),
        pa.field("extracted_answer", pa.string(), nullable=True),  # null: no answer found
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length | prompt_too_long
        pa.field("response_len", pa.int32(), nullable=False),  # tokens
    ],
    metadata={"rlpipe.samples_schema_version": SAMPLES_SCHEMA_VERSION},
)


class ReportError(ValueError):
    """A stored report or samples file that cannot be read as one."""


def write_samples(location: Location, columns: Mapping[str, Sequence]) -> int:
    """Write graded samples (every schema column, in any order) as one Parquet file; returns rows."""
    missing = [name for name in SAMPLES_SCHEMA.names if name not in columns]
    if missing:
        raise ReportError(f"samples: missing columns {', '.join(missing)}")
    arrays = [pa.array(columns[f.name], type=f.type) for f in SAMPLES_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SAMPLES_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    location.write_bytes(sink.getvalue().to_pybytes())
    return table.num_rows


def read_samples(location: Location) -> pa.Table:
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        raise ReportError(f"no samples at {location.uri}") from None
    table = pq.read_table(pa.BufferReader(data))
    version = (table.schema.metadata or {}).get(b"rlpipe.samples_schema_version", b"").decode()
    if version != SAMPLES_SCHEMA_VERSION:
        raise ReportError(f"samples at {location.uri} have schema version {version!r}, expected 1")
    return table


def write_report(
    folder: Location,
    report: dict[str, Any],
    *,
    markdown: str,
    html: str,
    plots: Mapping[str, bytes],
) -> Location:
    """Write plots, report.md and report.html, then report.json (last); returns report.json's location.

    The JSON is redacted and must be finite (NaN is not JSON: callers write None for "no value").
    """
    for name, png in plots.items():
        (folder / "plots" / name).write_bytes(png)
    (folder / "report.md").write_text(markdown)
    (folder / "report.html").write_text(html)
    target = folder / "report.json"
    target.write_bytes(report_json_bytes(report))
    return target


def report_json_bytes(report: dict[str, Any]) -> bytes:
    # Insertion order is kept: checkpoints stay in the order they were evaluated (initial first).
    return (json.dumps(redact(report), indent=2, allow_nan=False) + "\n").encode()


def read_report(location: Location) -> dict[str, Any] | None:
    """A stored report.json; None if there is none."""
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        return None
    try:
        report = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"report at {location.uri} is not valid JSON: {err}") from None
    if not isinstance(report, dict) or not isinstance(report.get("checkpoints"), dict):
        raise ReportError(f"report at {location.uri} has no 'checkpoints' object")
    return report
