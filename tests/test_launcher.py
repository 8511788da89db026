"""The stage launcher leaves no process behind when the orchestrating process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
from cli_runs import RLPIPE

LONG_SFT = ["--set", "wandb.mode=disabled", "--set", "sft.steps=100000", "--set", "task.train_size=50"]


def start_stage(tmp_path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    proc = subprocess.Popen(
        [RLPIPE, "stage", "sft", "--run-id", "k", "--storage", str(tmp_path), *LONG_SFT],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while True:
        children = psutil.Process(proc.pid).children(recursive=True)
        if any("stages.sft" in " ".join(c.cmdline()) for c in children):
            return proc, children
        assert proc.poll() is None and time.time() < deadline, "the stage process never started"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_launcher_kills_the_stage(tmp_path, sig):
    proc, children = start_stage(tmp_path)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned stage processes: {[p.pid for p in alive]}"
    if sig == signal.SIGTERM:  # a clean stop: one line, the conventional 128 + signal exit code
        assert proc.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines()[-1].startswith("error: stopped by signal SIGTERM"), stderr
        assert "Traceback" not in stderr


def test_progress_lines_parse_into_stage_done_total():
    from flows.launcher import progress_of

    assert progress_of("ppo:  12%|#2        | 96/800 [00:10<01:30,  7.8step/s, loss=0.1]") == ("ppo", 96, 800)
    assert progress_of("critic_warmup: 100%|##########| 6/6 [00:03<00:00]") == ("critic_warmup", 6, 6)
    assert progress_of("Loading weights:  50%|#####     | 13/26") is None  # not a stage's bar
    assert progress_of("ppo: done; held-out sampled 0.1 -> 0.3") is None


def test_line_throttle_rate_limits_bars_and_floods_but_never_errors():
    from flows.launcher import LineThrottle

    throttle = LineThrottle(progress_every_s=10.0, burst=3, window_s=10.0)
    bar = "ppo:  {}%|#   | {}/100 [..]"
    assert throttle.admit(bar.format(1, 1), now=0.0) == [bar.format(1, 1)]
    assert throttle.admit(bar.format(2, 2), now=5.0) == []  # redraw within 10 s
    assert throttle.admit(bar.format(3, 3), now=10.5) == [bar.format(3, 3)]
    assert throttle.admit("ppo: 100%|####| 100/100", now=11.0) == ["ppo: 100%|####| 100/100"]  # the end shows
    assert throttle.admit("", now=11.0) == [] and throttle.admit("[rank1]: hello", now=11.0) == []
    assert throttle.admit("[rank0]: hello", now=11.0) == ["[rank0]: hello"]
    assert [throttle.admit(f"line {i}", now=12.0) for i in range(4)] == [["line 0"], ["line 1"], [], []]
    assert throttle.admit("error: bad input", now=12.5) == [
        "(2 lines not logged here: rate limit)",
        "error: bad input",
    ]
    assert throttle.admit("line 4", now=12.6) == []  # still over the burst in this window
    assert throttle.admit("line 5", now=22.0) == ["(1 lines not logged here: rate limit)", "line 5"]


def test_output_reader_stops_at_the_deadline_even_when_the_child_prints_nothing():
    from flows.launcher import _output_lines, kill_process_group

    child = subprocess.Popen(
        ["sh", "-c", "echo first; sleep 60"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        lines = list(_output_lines(child, deadline=time.monotonic() + 2.0))
        assert lines == ["first\n"] and child.poll() is None  # returned while the child still sleeps
    finally:
        kill_process_group(child, grace_s=1.0)
    assert child.poll() is not None
