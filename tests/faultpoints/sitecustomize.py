"""Test-only faults at named points of a run: a kill -9, or a NaN where a number should be.

Tests put this folder on PYTHONPATH, so Python imports it at the start of every process of the
run (the CLI, the launcher, the stage). It patches where the work happens, before any stage
module binds the names; a point never fires in a process that does not reach it.

`RLPIPE_TEST_KILL=point:N` sends SIGKILL to the process the N-th time it reaches `point`:

    generate   each HF generation call (a step's sampling, the held-out evaluation)
    train      each `engine.step()` of any engine built by `stages.models.engine.build_engine`
    upload     each file upload to storage (the checkpoint protocol uploads its files concurrently)
    manifest   the rename that publishes a manifest.json (its temporary file is fully written)

`RLPIPE_TEST_NAN=point:N` puts a NaN in the N-th result of `point`:

    reward       the first scored sample's reward (`stages.sampling.rollout_rows.score_samples`)
    policy_loss  the clipped surrogate (`stages.algorithms.policy_loss`)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading


def _nth_call(nth: int):
    """A function that returns True on its nth call (thread-safe: uploads run in a pool)."""
    calls = {"n": 0}
    lock = threading.Lock()

    def reached() -> bool:
        with lock:
            calls["n"] += 1
            return calls["n"] == nth

    return reached


def _wrap(owner, name: str, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args)
        result = original(*args, **kwargs)
        return after(result) if after else result

    setattr(owner, name, wrapper)


def _install_kill(point: str, nth: int) -> None:
    reached = _nth_call(nth)

    def kill(*_args) -> None:
        if reached():
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "generate":
        from stages.sampling import hf_sampler

        _wrap(hf_sampler.HFGenerator, "generate", before=kill)
    elif point == "train":
        from stages.models import engine

        def watch_steps(built):
            step = built.step

            def watched_step(*args, **kwargs):
                kill()
                return step(*args, **kwargs)

            built.step = watched_step
            return built

        _wrap(engine, "build_engine", after=watch_steps)
    elif point == "upload":
        from storage.location import Location

        _wrap(Location, "upload_file", before=kill)
    elif point == "manifest":

        def kill_on_manifest(src, dst, *_args) -> None:
            if str(dst).endswith("manifest.json"):
                kill()

        _wrap(os, "replace", before=kill_on_manifest)
    else:
        raise SystemExit(f"RLPIPE_TEST_KILL: unknown point {point!r}")


def _install_nan(point: str, nth: int) -> None:
    reached = _nth_call(nth)
    if point == "reward":
        from stages.sampling import rollout_rows

        def poison(scored):
            if reached() and scored:
                scored[0] = dataclasses.replace(scored[0], reward=float("nan"))
            return scored

        _wrap(rollout_rows, "score_samples", after=poison)
    elif point == "policy_loss":
        from stages import algorithms

        def poison_loss(result):
            loss, stats = result
            return (loss * float("nan"), stats) if reached() else result

        _wrap(algorithms, "policy_loss", after=poison_loss)
    else:
        raise SystemExit(f"RLPIPE_TEST_NAN: unknown point {point!r}")


for _variable, _install in (("RLPIPE_TEST_KILL", _install_kill), ("RLPIPE_TEST_NAN", _install_nan)):
    if os.environ.get(_variable):
        _point, _, _nth = os.environ[_variable].partition(":")
        _install(_point, int(_nth or 1))
