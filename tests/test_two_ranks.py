"""One recipe on any number of ranks: the default recipe runs every stage on 2 ranks with only its
step counts (and the evaluation's size) overridden, never a batch key; each rank writes its own
rollout part of every step, with the rows of the 1-rank layout split between them."""

from __future__ import annotations

import os

from cli_runs import rlpipe, sets

from flows.launcher import SHM_DIR
from stages.runtime.threads import cgroup_cpu_quota, usable_cpus
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.reports import read_report
from storage.rollouts import read_rollouts

STEPS = [
    "sft.steps=2",
    "reward_model.steps=10",
    "critic_warmup.steps=1",
    "ppo.steps=1",
]  # RM: its warmup is 10
SMALL_EVALUATION = [
    "wandb.mode=disabled",
    "task.heldout_size=8",
    "ppo.eval_samples=1",
    "evaluate.benchmarks=[arith]",
    "evaluate.limits={arith: 8}",
    "evaluate.samples=2",
]


def deepspeed_shm_buffers() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def test_the_default_recipe_runs_every_stage_on_two_ranks_without_a_batch_key(tmp_path):
    root = tmp_path / "runs"
    shm_before = deepspeed_shm_buffers()
    proc = rlpipe(
        "run",
        "--run-id",
        "two",
        "--storage",
        str(root),
        "--nproc",
        "2",
        *sets(STEPS + SMALL_EVALUATION),
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    layout = RunLayout(Location(str(root)), "two")
    for stage in ("sft", "reward_model", "critic_warmup", "ppo", "evaluate"):
        assert read_manifest(layout.manifest(stage)) is not None, stage
    for stage in ("critic_warmup", "ppo"):  # 32 prompts x 4 samples: 64 rows on each rank
        assert all(layout.rollout_part(stage, 1, rank).exists() for rank in (0, 1))
        assert read_rollouts(layout.rollouts(stage), steps=[1]).num_rows == 128
    # The ranks split the CPUs instead of each taking them all (2 threads each on 2 cores before).
    usable = usable_cpus(os.sched_getaffinity(0), cgroup_cpu_quota())
    for stage in ("sft", "reward_model", "critic_warmup", "ppo"):
        threads = read_manifest(layout.manifest(stage)).metrics.get("cpu_threads")
        assert threads is not None and 2 * threads <= max(usable, 2), (stage, threads, usable)
    # evaluation runs as one process (vLLM spreads one model over GPUs with tensor parallelism)
    report = read_report(layout.report("final", "json"))
    assert list(report["checkpoints"]) == ["initial", "final"]
    assert "evaluate" in proc.stdout and "completed" in proc.stdout
    # DeepSpeed's CPU all-reduce segments (69 MB per rank, per stage) are not left in RAM
    assert deepspeed_shm_buffers() <= shm_before
