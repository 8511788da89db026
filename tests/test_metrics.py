"""metrics.jsonl: append, read, crash tolerance, truncation on resume; on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from storage.metrics import append_metrics, read_metrics, truncate_metrics_after


def test_append_read_round_trip(storage_root):
    loc = storage_root / "run-1" / "ppo" / "metrics.jsonl"
    assert read_metrics(loc) == []
    append_metrics(loc, {"step": 1, "ppo/loss": 0.5, "note": "warmup", "done": False, "kl": None})
    append_metrics(
        loc, {"step": np.int64(2), "ppo/loss": np.float32(0.25), "bad": float("nan"), "up": float("inf")}
    )
    assert read_metrics(loc) == [
        {"step": 1, "ppo/loss": 0.5, "note": "warmup", "done": False, "kl": None},
        # float32(0.25) is exact; NaN and inf stay visible as strings.
        {"step": 2, "ppo/loss": 0.25, "bad": "nan", "up": "inf"},
    ]
    lines = loc.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert json.loads(lines[1])["step"] == 2


@pytest.mark.parametrize("record", [{"loss": 1.0}, {"step": "3"}, {"step": True}, {"step": 1, "x": [1, 2]}])
def test_invalid_records_rejected(local_root, record):
    with pytest.raises((ValueError, TypeError)):
        append_metrics(local_root / "m.jsonl", record)
    assert not (local_root / "m.jsonl").exists()


def test_truncate_after(storage_root):
    loc = storage_root / "metrics.jsonl"
    for step in range(1, 6):
        append_metrics(loc, {"step": step, "loss": step / 10})
    assert truncate_metrics_after(loc, 3) == 2  # steps 4 and 5 dropped
    assert [r["step"] for r in read_metrics(loc)] == [1, 2, 3]
    assert truncate_metrics_after(loc, 3) == 0
    # Resume from step 3: steps 4.. are logged again, once.
    append_metrics(loc, {"step": 4, "loss": 0.45})
    assert read_metrics(loc) == [
        {"step": 1, "loss": 0.1},
        {"step": 2, "loss": 0.2},
        {"step": 3, "loss": 0.3},
        {"step": 4, "loss": 0.45},
    ]
    assert truncate_metrics_after(storage_root / "absent.jsonl", 0) == 0


def test_partial_last_line_skipped_and_repaired(storage_root):
    loc = storage_root / "metrics.jsonl"
    append_metrics(loc, {"step": 1, "loss": 0.5})
    # A crash mid-write leaves half a line behind.
    loc.write_bytes(loc.read_bytes() + b'{"step": 2, "lo')
    assert read_metrics(loc) == [{"step": 1, "loss": 0.5}]
    append_metrics(loc, {"step": 2, "loss": 0.4})
    # The partial line is gone and the new record is on its own line.
    assert loc.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'


def test_complete_last_line_without_newline_kept(storage_root):
    loc = storage_root / "metrics.jsonl"
    loc.write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}')  # crash before the newline
    assert [r["step"] for r in read_metrics(loc)] == [1, 2]
    append_metrics(loc, {"step": 3, "loss": 0.3})
    assert loc.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n'


def test_truncate_drops_partial_line(storage_root):
    loc = storage_root / "metrics.jsonl"
    loc.write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert truncate_metrics_after(loc, 5) == 0
    assert loc.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
