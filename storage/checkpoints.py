"""Checkpoint commit protocol: a checkpoint exists for resume only once its COMMITTED marker does.

A trainer stages a checkpoint as plain files in a local directory (safetensors model shards,
optimizer shards per rank, trainer_state.json: the content is not this module's business) and
calls `commit_checkpoint`, which writes under `{checkpoints}/` (DESIGN section 5):

    step_000040/<every staged file, relative paths kept>
    step_000040/COMMITTED      {"step", "created", "files": {relpath: {"sha256", "size"}}}
    latest                     "step_000040"

The order of the writes is the whole protocol; a process may be killed between any two of them:

0. If `step_000040/` already exists (a resumed run re-commits a step), its COMMITTED is deleted
   first, then the rest: a half-overwritten step is never seen as committed.
1. Every file is uploaded (concurrently), its sha256 and size computed from the local copy.
   A crash here leaves a folder without COMMITTED, which every reader ignores.
2. COMMITTED is written, as one atomic object, only after every upload has returned. It lists
   each file with its hash, so a reader can tell a complete checkpoint from a damaged one
   (bit rot, a hand-edited bucket, a partial copy between buckets).
3. `latest` is written after COMMITTED, so it never names a step that was not committed. It is
   a shortcut, not the truth: if it is missing, unreadable or names an uncommitted folder,
   readers fall back to the newest committed folder in the listing.
4. Retention runs last, so a crash while pruning can only lose old checkpoints, never the new one.
   A pruned step loses its COMMITTED before its files, for the same reason as in step 0.
   Uncommitted folders older than the new step (crashed uploads) are removed too.

Resume (`restore_latest`) downloads the newest committed step, checks every file's sha256, and
when a checkpoint is corrupt falls back to the next older committed one, logging a warning that
names the corrupt step. This module only moves bytes: it never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from storage.layout import parse_step_dir_name, step_dir_name
from storage.location import Location

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
LATEST = "latest"
_CHUNK = 8 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be committed or read (message is one line naming it)."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint's files do not match its COMMITTED record."""


# ---- writing -------------------------------------------------------------------------------
def commit_checkpoint(
    local_dir: str | Path,
    checkpoints: Location,
    step: int,
    *,
    keep_last: int | None = None,
    max_workers: int = 8,
) -> Location:
    """Upload the files under `local_dir` as checkpoint `step`, commit it, point `latest` at it.

    `keep_last` keeps the newest K committed checkpoints (None keeps all). Returns the step's location.
    """
    local_dir = Path(local_dir)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise CheckpointError(f"nothing to commit: {local_dir} holds no files")
    if COMMITTED in files:
        raise CheckpointError(f"cannot commit {local_dir}: {COMMITTED} is a reserved file name")
    target = checkpoints / step_dir_name(step)

    # 0. A re-committed step stops being committed before any of its files change.
    _remove_checkpoint(target)

    # 1. Upload every file; hash the local copy first so the record describes what was sent.
    def upload(relpath: str) -> tuple[str, dict]:
        with open(local_dir / relpath, "rb") as f:
            record = _hash_stream(f)
        (target / relpath).upload_file(str(local_dir / relpath))
        return relpath, record

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        records = dict(pool.map(upload, files))

    # 2. The marker, written only once every upload has returned.
    marker = {
        "step": step,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": records,
    }
    (target / COMMITTED).write_text(json.dumps(marker, indent=1, sort_keys=True))

    # 3. The pointer, written only once the step it names is committed.
    (checkpoints / LATEST).write_text(step_dir_name(step))

    # 4. Retention, last: a crash here loses old checkpoints at worst.
    _prune(checkpoints, step, keep_last)
    log.info("committed checkpoint %s (%d files)", target, len(files))
    return target


def _prune(checkpoints: Location, newest: int, keep_last: int | None) -> None:
    """Remove uncommitted step folders older than `newest`, and committed ones beyond `keep_last`.

    Folders newer than `newest` (a run resumed from an older checkpoint) are left alone: whether
    they are stale is the caller's call, not this module's.
    """
    committed = committed_steps(checkpoints)
    keep = set([s for s in committed if s <= newest][-keep_last:] if keep_last else committed)
    for step in _step_dirs(checkpoints):
        if step < newest and step not in keep:
            log.info("removing checkpoint %s", checkpoints / step_dir_name(step))
            _remove_checkpoint(checkpoints / step_dir_name(step))


def _remove_checkpoint(step_loc: Location) -> None:
    # COMMITTED goes first, so a step whose removal is interrupted reads as uncommitted, not as damaged.
    (step_loc / COMMITTED).remove()
    step_loc.remove(recursive=True)


# ---- listing -------------------------------------------------------------------------------
def _step_dirs(checkpoints: Location) -> list[int]:
    steps = (parse_step_dir_name(name) for name in checkpoints.list_names())
    return sorted(s for s in steps if s is not None)


def committed_steps(checkpoints: Location) -> list[int]:
    """Steps with a COMMITTED marker, ascending. Folders without one do not exist for resume."""
    return [s for s in _step_dirs(checkpoints) if (checkpoints / step_dir_name(s) / COMMITTED).exists()]


def latest_committed_step(checkpoints: Location) -> int | None:
    """The step named by `latest`, or, if that is missing, unreadable or uncommitted, the newest committed one."""
    try:
        name = (checkpoints / LATEST).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        name = ""
    step = parse_step_dir_name(name)
    if step is not None and (checkpoints / name / COMMITTED).exists():
        return step
    steps = committed_steps(checkpoints)
    if steps:
        log.warning("%s/latest is stale (%r); using %s", checkpoints, name[:40], step_dir_name(steps[-1]))
    return steps[-1] if steps else None


def read_commit_record(checkpoints: Location, step: int) -> dict:
    """The parsed COMMITTED marker of `step`: {"step", "created", "files": {relpath: {"sha256", "size"}}}."""
    marker = checkpoints / step_dir_name(step) / COMMITTED
    try:
        record = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoints / step_dir_name(step)} is not committed") from None
    except ValueError as err:  # bad JSON or bad UTF-8
        raise CorruptCheckpointError(f"corrupt checkpoint marker {marker}: {err}") from None
    files = record.get("files") if isinstance(record, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(v, dict) and {"sha256", "size"} <= v.keys() for v in files.values()
    )
    if not valid:
        raise CorruptCheckpointError(f"corrupt checkpoint marker {marker}: no valid file list")
    return record


# ---- reading -------------------------------------------------------------------------------


def download_checkpoint(
    checkpoints: Location, step: int, local_dir: str | Path, *, max_workers: int = 8
) -> Path:
    """Download the files listed in COMMITTED into `local_dir`, checking each one's sha256 and size.

    A file that does not match is deleted locally and CorruptCheckpointError is raised.
    """
    local_dir = Path(local_dir)
    step_loc = checkpoints / step_dir_name(step)
    files = read_commit_record(checkpoints, step)["files"]

    def fetch(relpath: str) -> None:
        parts = PurePosixPath(relpath).parts
        if PurePosixPath(relpath).is_absolute() or ".." in parts:
            raise _corrupt(step_loc, relpath, "leaves the folder")
        dest = local_dir.joinpath(*parts)
        try:
            (step_loc / relpath).download_file(str(dest))
        except FileNotFoundError:
            raise _corrupt(step_loc, relpath, "is missing") from None
        with open(dest, "rb") as f:
            actual = _hash_stream(f)
        try:
            _compare(step_loc, relpath, files[relpath], actual)
        except CorruptCheckpointError:
            os.remove(dest)
            raise

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(fetch, sorted(files)))
    return local_dir


def restore_latest(
    checkpoints: Location, local_dir: str | Path, *, max_workers: int = 8
) -> tuple[int, Path] | None:
    """Download the newest intact committed checkpoint to `local_dir/step_XXXXXX`; None if none is committed.

    Tries the step `latest_committed_step` names, then older committed steps, newest first; each
    corrupt one is logged as a warning and its partial download deleted. Raises
    CorruptCheckpointError if every committed checkpoint is corrupt.
    """

    def attempt(step: int) -> None:
        dest = Path(local_dir) / step_dir_name(step)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            download_checkpoint(checkpoints, step, dest, max_workers=max_workers)
        except CorruptCheckpointError:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    step = _first_intact(checkpoints, attempt)
    return None if step is None else (step, Path(local_dir) / step_dir_name(step))


def _first_intact(checkpoints: Location, attempt: Callable[[int], None]) -> int | None:
    latest = latest_committed_step(checkpoints)
    if latest is None:
        return None
    candidates = [s for s in reversed(committed_steps(checkpoints)) if s < latest]
    for step in [latest, *candidates]:
        try:
            attempt(step)
            return step
        except CorruptCheckpointError as err:
            log.warning(
                "checkpoint %s is corrupt, falling back to an older one: %s", step_dir_name(step), err
            )
    raise CorruptCheckpointError(
        f"no intact committed checkpoint in {checkpoints}: steps {[latest, *candidates]} are all corrupt; "
        "rerun the stage with --force to start it over"
    )


# ---- hashing -------------------------------------------------------------------------------
def _hash_stream(f) -> dict:
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _corrupt(step_loc: Location, relpath: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"corrupt checkpoint {step_loc}: file {relpath} {problem}")


def _compare(step_loc: Location, relpath: str, expected: dict, actual: dict) -> None:
    if actual["size"] != expected["size"]:
        raise _corrupt(step_loc, relpath, f"has {actual['size']} bytes, expected {expected['size']}")
    if actual["sha256"] != expected["sha256"]:
        raise _corrupt(
            step_loc, relpath, f"sha256 {actual['sha256'][:12]}..., expected {expected['sha256'][:12]}..."
        )
