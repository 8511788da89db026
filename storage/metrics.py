"""A stage's metrics as JSON lines: `{root}/{run_id}/{stage}/metrics.jsonl`, one record per line.

A record is a flat dict with at least an integer "step"; values are JSON numbers, strings,
booleans or null. Numpy and torch scalars are converted with `.item()`.

Non-finite floats are written as the strings "nan", "inf" and "-inf", not as null: a NaN loss
must stay visible in the file (null reads as "not logged"), and bare NaN/Infinity tokens are not
JSON, so DuckDB, pandas and `jq` would reject the line.

Crash safety: a crash can leave a partial last line. `read_metrics` skips lines that are not
JSON, and `append_metrics` repairs the tail before appending (drops a partial line, or ends a
complete one with its missing newline), so every append starts on a fresh line.

On resume, `truncate_metrics_after(loc, checkpoint_step)` drops the records logged after the
checkpoint, so the resumed steps replace them instead of appearing twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from storage.location import Location

log = logging.getLogger(__name__)


def json_value(value: Any, name: str = "value") -> float | int | str | bool | None:
    """One metric value as a JSON scalar (non-finite floats as "nan"/"inf"/"-inf"; see module doc)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalar (a multi-element tensor raises here, as it should)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    raise TypeError(f"metric {name!r} has type {type(value).__name__}; use a number, string, bool or None")


def _record_line(record: dict) -> bytes:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(json_value(step, "step"), int):
        raise ValueError(f"a metrics record needs an integer 'step', got {step!r}")
    clean = {str(key): json_value(value, str(key)) for key, value in record.items()}
    return (json.dumps(clean, allow_nan=False) + "\n").encode("utf-8")


def _parse_line(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _repaired_tail(tail: bytes) -> bytes:
    """What to keep of the bytes after the last newline: a complete record gets its newline back,
    a partial one (crash mid-write) is dropped."""
    if not tail.strip():
        return b""
    return tail + b"\n" if _parse_line(tail) is not None else b""


def append_metrics(location: Location, record: dict) -> None:
    """Append one record. Local: a real append (flush + fsync). Object stores cannot append, so
    the whole object is read and rewritten in one PUT: fine because metrics files stay small
    (one short line per step). One writer per file (rank 0)."""
    line = _record_line(record)
    if location.is_local:
        path = location.path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # rare: only after a crash mid-write, so read it all
                    f.seek(0)
                    existing = f.read()
                    cut = existing.rfind(b"\n") + 1
                    f.truncate(cut)
                    line = _repaired_tail(existing[cut:]) + line
            f.write(line)  # "a" mode: always at the end
            f.flush()
            os.fsync(f.fileno())
    else:
        try:
            existing = location.read_bytes()
        except FileNotFoundError:
            existing = b""
        if existing and not existing.endswith(b"\n"):
            cut = existing.rfind(b"\n") + 1
            existing = existing[:cut] + _repaired_tail(existing[cut:])
        location.write_bytes(existing + line)


def _parse_records(data: bytes, uri: str) -> list[dict]:
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_line(line)
        if record is None:
            if number < len(lines):  # not the unterminated tail: unexpected, but still skip it
                log.warning("skipping unreadable line %d of %s", number, uri)
            continue
        records.append(record)
    return records


def read_metrics(location: Location) -> list[dict]:
    """All records in file order; [] if the file does not exist. Lines that are not JSON objects
    (a crash mid-write) are skipped."""
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        return []
    return _parse_records(data, location.uri)


def truncate_metrics_after(location: Location, step: int) -> int:
    """Keep only records with "step" <= `step` (rewritten atomically); returns how many were dropped.

    Called on resume from the checkpoint at `step`, so the resumed steps are logged once. A
    partial line left by a crash is dropped as well (and not counted)."""
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        return 0
    records = _parse_records(data, location.uri)
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    new_data = b"".join((json.dumps(r, allow_nan=False) + "\n").encode("utf-8") for r in kept)
    if new_data != data:
        location.write_bytes(new_data)
    return len(records) - len(kept)
