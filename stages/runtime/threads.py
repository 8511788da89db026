"""How many CPU threads a process computes with: a fair share of the CPUs it may use.

torch sizes its thread pool by the machine's cores. Two processes on one machine (the ranks of
`--nproc 2`, a sweep's variants, an evaluation beside a training stage) then run twice the threads
the cores hold, and OpenMP's busy-waiting makes each many times slower than half its solo speed
(BENCHMARKS.md, "CPU threads"). So every process that computes takes its threads from here:

- the CPUs it may use: its affinity mask, capped by the cgroup CPU quota (v2 `cpu.max`, v1
  `cpu.cfs_quota_us`) - a Kubernetes CPU limit - never `os.cpu_count()`;
- divided by the processes that share them. The ranks of one launch on a node are each bound to
  their own slice of the mask (they are known in advance). Any other rlpipe process is found
  through its lease: a small file under `$RLPIPE_CACHE/cpu-share/`, held with an `flock` the
  kernel drops when the process dies, so a killed process never counts. A process re-counts
  between steps (`refresh_threads`, at most once a second): a stage started alone gives threads
  back when a second one starts and takes them again when it ends.

`runtime.threads: N` fixes the count instead, e.g. where results must be bit-identical across
launch shapes (CPU reductions round differently with another number of threads);
`runtime.threads: torch` leaves torch's default (the behaviour before the budget, to measure it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from stages.runtime.cache_dir import cache_root

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
REFRESH_EVERY_S = 1.0  # re-counting lists one small folder: cheap, but not on every micro-step


# --- The CPUs a process may use ---------------------------------------------------------------


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the process's cgroup (or any parent) may use; None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one unified hierarchy
            quotas += [q for folder in _cgroup_folders(root, path) if (q := _v2_quota(folder)) is not None]
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                quotas += [
                    q for folder in _cgroup_folders(mount, path) if (q := _v1_quota(folder)) is not None
                ]
    return min(quotas) if quotas else None


def _cgroup_folders(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to the mount (inside a container the path the
    kernel reports may not exist: then the mount itself is the container's cgroup)."""
    folder = mount / path.strip("/")
    folders = []
    while True:
        if folder.is_dir():
            folders.append(folder)
        if folder == mount or mount not in folder.parents:
            return folders
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cpus(mask: set[int] | None = None, quota: float | None = None) -> int:
    """CPUs this process may compute on: its affinity mask, capped by a CPU quota (whole CPUs, at least 1)."""
    count = len(mask if mask is not None else os.sched_getaffinity(0))
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def launch_ranks() -> tuple[int, int]:
    """(local rank, ranks on this node) of the launch this process belongs to; (0, 1) alone."""
    size = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"  # DeepSpeed, torchrun
    return int(os.environ.get("LOCAL_RANK", "0")), int(size)


def rank_slice(mask: set[int], local_rank: int, local_size: int) -> set[int]:
    """The rank's own contiguous share of `mask` (the first ranks take one CPU more when it does
    not divide); the whole mask when there are fewer CPUs than ranks (they must share)."""
    cpus = sorted(mask)
    if local_size <= 1 or len(cpus) < local_size:
        return set(cpus)
    base, extra = divmod(len(cpus), local_size)
    start = local_rank * base + min(local_rank, extra)
    return set(cpus[start : start + base + (local_rank < extra)])


def fair_share(setting: int | str, cpus: int, sharing: int) -> int:
    """Threads for a process: the fixed `setting`, or (`auto`) its CPUs divided by the processes sharing them."""
    if setting != "auto":
        return int(setting)
    return max(1, cpus // max(1, sharing))


# --- Leases: the rlpipe processes computing on this machine --------------------------------------


@dataclass
class CpuLeases:
    """This process's lease in `folder`, and a count of the live leases on CPUs it uses too."""

    folder: Path
    cpus: set[int]
    host: str = field(default_factory=socket.gethostname)
    _held: IO[str] | None = None

    def acquire(self) -> None:
        """Write the lease under a temporary name, lock it, then rename it into place: nobody
        ever sees it unlocked (a lock follows the file through the rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".lease-")
        held = os.fdopen(fd, "w")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        json.dump({"pid": os.getpid(), "cpus": sorted(self.cpus)}, held)
        held.flush()
        os.replace(temporary, self.path)
        self._held = held

    @property
    def path(self) -> Path:
        return self.folder / f"{self.host}-{os.getpid()}.json"

    def release(self) -> None:
        if self._held is not None:
            self.path.unlink(missing_ok=True)
            self._held.close()
            self._held = None

    def sharing(self) -> int:
        """Live leases of this host whose CPUs overlap this process's (itself included); a lease
        whose lock can be taken belongs to a dead process and is removed."""
        count = 1 if self._held is not None else 0
        for path in self.folder.glob(f"{self.host}-*.json"):
            if path == self.path:
                continue
            cpus = _live_lease_cpus(path)
            if cpus is not None and cpus & self.cpus:
                count += 1
        return max(1, count)


def _live_lease_cpus(path: Path) -> set[int] | None:
    """The CPUs of a live lease; None when it is gone, unreadable, or its holder died (then removed)."""
    try:
        with open(path) as lease:
            try:
                fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its process is alive
                return set(json.load(lease)["cpus"])
            path.unlink(missing_ok=True)  # nobody holds it: a killed process's lease
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- The budget of this process ------------------------------------------------------------------


@dataclass
class ThreadBudget:
    """The thread count of this process, applied to torch and to the environment of its children."""

    setting: int | str
    cpus: int
    leases: CpuLeases | None
    threads: int = 0
    fewest: int = 0  # the fewest threads it ran with (stored with the stage's metrics)
    _checked_at: float = -math.inf

    def apply(self, threads: int) -> None:
        torch.set_num_threads(threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # children (and torch's own subprocesses)
            os.environ[name] = str(threads)
        self.threads = threads
        self.fewest = min(self.fewest or threads, threads)

    def refresh(self, now: float | None = None) -> int:
        """Re-count the processes sharing the CPUs (at most once a second) and follow the fair share."""
        now = time.monotonic() if now is None else now
        if self.setting == "auto" and self.leases is not None and now - self._checked_at >= REFRESH_EVERY_S:
            self._checked_at = now
            share = fair_share(self.setting, self.cpus, self.leases.sharing())
            if share != self.threads:
                _say(f"threads: {self.threads} -> {share} (processes sharing the CPUs changed)")
                self.apply(share)
        return self.threads

    def metrics(self) -> dict[str, int]:
        return {"cpu_threads": self.threads, "cpu_threads_fewest": self.fewest, "usable_cpus": self.cpus}

    def close(self) -> None:
        if self.leases is not None:
            self.leases.release()


_budget: ThreadBudget | None = None
# Where the budget's lines go: stdout, with a stage's other progress lines (stderr is for the one
# line of an error); a command whose stdout is data (`--json`) sends them to stderr. The stream is
# looked up when a line is printed, never kept: the budget outlives whoever set sys.stdout then.
_log_to_stderr = False


def _say(text: str) -> None:
    print(text, file=sys.stderr if _log_to_stderr else sys.stdout, flush=True)


def start_thread_budget(
    setting: int | str = "auto", lease: bool = True, name: str = "rlpipe", log_to_stderr: bool = False
) -> ThreadBudget:
    """Decide and apply this process's threads for the rest of its life, once (later calls
    return the same budget). The lease goes with the process (the kernel drops its lock).

    `lease`: take part in the machine-wide count (every process that computes for long: stages,
    ranks, benchmarks); a process that launches stages and waits for them does not.
    `log_to_stderr`: report the chosen count on stderr instead of stdout.
    """
    global _budget, _log_to_stderr
    if _budget is None:
        _log_to_stderr = log_to_stderr
        _budget = _decide(setting, lease, name)
    return _budget


@contextlib.contextmanager
def thread_budget(setting: int | str = "auto", name: str = "rlpipe") -> Iterator[ThreadBudget]:
    """`start_thread_budget` for a block (a stage): the lease is given back at its end, unless
    the process had its budget already (then that one is used and kept)."""
    global _budget
    owned = _budget is None
    budget = start_thread_budget(setting, name=name)
    try:
        yield budget
    finally:
        if owned:
            budget.close()
            _budget = None


def _decide(setting: int | str, lease: bool, name: str) -> ThreadBudget:
    if setting == "torch":  # no binding, no lease: every process takes all the machine's cores
        threads = torch.get_num_threads()
        _say(f"{name}: {threads} CPU thread(s) (torch's default)")
        return ThreadBudget(setting, os.cpu_count() or 1, None, threads, threads)
    local_rank, local_size = launch_ranks()
    mask, quota = os.sched_getaffinity(0), cgroup_cpu_quota()
    if local_size > 1:
        # The ranks of one launch are known before any lease exists: they split the node's CPUs
        # (and its cgroup quota), each bound to its own slice where there are enough CPUs.
        quota = quota / local_size if quota is not None else None
        if len(mask) >= local_size:
            mask = rank_slice(mask, local_rank, local_size)
            os.sched_setaffinity(0, mask)
        else:
            quota = min(quota or math.inf, len(mask) / local_size)
    cpus = usable_cpus(mask, quota)
    leases = CpuLeases(cache_root() / "cpu-share", mask) if lease and setting == "auto" else None
    if leases is not None:
        leases.acquire()
    sharing = leases.sharing() if leases is not None else 1
    budget = ThreadBudget(setting, cpus, leases)
    budget.apply(fair_share(setting, cpus, sharing))
    try:
        torch.set_num_interop_threads(budget.threads)
    except RuntimeError:  # inter-op work already ran in this process: its pool is fixed
        pass
    how = "runtime.threads" if setting != "auto" else f"{cpus} usable CPU(s) shared by {sharing} process(es)"
    _say(f"{name}: {budget.threads} CPU thread(s) ({how})")
    return budget


def refresh_threads() -> None:
    """Between steps: follow the fair share when other processes start or end (no-op without a budget)."""
    if _budget is not None:
        _budget.refresh()


def thread_metrics() -> dict[str, int]:
    """What this process ran with, for the stage's metrics ({} without a budget)."""
    return _budget.metrics() if _budget is not None else {}
