"""DeepSpeed engines: lr schedule (pure), config completion, RNG state, and resume through the commit protocol.

DeepSpeed and torch.distributed keep process-global state, so every test that builds an engine runs
`tests/engine_ranks_script.py` in fresh processes: one process (ZeRO 0/2/3) or two CPU ranks under
the deepspeed launcher (ZeRO-2). Resume tests compare a run that trains 4 steps (saving at step 2)
with a new process that loads step 2 and trains steps 3-4: losses, parameters, lr schedule position
and RNG draws must be equal exactly (same shapes, same threads: CPU training is deterministic).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from pydantic import ValidationError
from safetensors.torch import load_file

from flows.launcher import remove_shm_buffers
from stages.config.batches import BatchLayout
from stages.config.models import OptimConfig
from stages.models.engine import (
    deepspeed_config,
    load_training_state,
    lr_factor,
    lr_lambda,
    rng_state,
    save_training_state,
    set_rng_state,
)
from storage.checkpoints import commit_checkpoint, committed_steps, read_commit_record
from storage.location import Location

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "engine_ranks_script.py"
SAVE_STEP, TOTAL_STEPS = 2, 4


# ---- learning-rate schedule (pure) ---------------------------------------------------------------
def test_warmup_then_constant():
    # warmup 3: (step + 1) / (3 + 1) for steps 0, 1, 2, then 1 for ever.
    got = [lr_factor(s, warmup_steps=3) for s in (0, 1, 2, 3, 4, 1000)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], abs=1e-12)
    assert lr_factor(0, warmup_steps=0) == 1.0  # no warmup: the first update uses the peak lr


def test_warmup_then_cosine():
    # warmup 2, total 6, min ratio 0.1; after warmup p = (step - 2) / 4 and
    # factor = 0.1 + 0.9 * (1 + cos(pi * p)) / 2:
    #   step 0: 1/3; step 1: 2/3; step 2: p=0 -> 1; step 3: p=1/4 -> 0.1 + 0.45 * (1 + sqrt(2)/2) = 0.868198;
    #   step 4: p=1/2 -> 0.55; step 5: p=3/4 -> 0.1 + 0.45 * (1 - sqrt(2)/2) = 0.231802; step 6 and on: 0.1.
    kw = dict(warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    got = [lr_factor(s, **kw) for s in range(9)]
    expected = [1 / 3, 2 / 3, 1.0, 0.8681980515, 0.55, 0.2318019485, 0.1, 0.1, 0.1]
    assert got == pytest.approx(expected, abs=1e-9)


def test_lambda_lr_follows_the_schedule():
    optim = OptimConfig(lr=0.5, warmup_steps=1, schedule="cosine", total_steps=3, min_lr_ratio=0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # step 0: warmup 1/2 -> 0.25; step 1: p=0 -> 0.5; step 2: p=1/2 -> 0.25; step 3: p=1 -> 0.
    assert lrs == pytest.approx([0.25, 0.5, 0.25, 0.0], abs=1e-12)


def test_optim_config_validation():
    with pytest.raises(ValidationError, match="total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValidationError, match="warmup_steps"):
        OptimConfig(warmup_steps=10, total_steps=5)
    with pytest.raises(ValidationError):
        OptimConfig(zero_stage=1)
    with pytest.raises(ValidationError, match="extra"):
        OptimConfig(learning_rate=1e-5)
    assert all(f.description for f in OptimConfig.model_fields.values())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_config_completes_the_infra_file(stage):
    optim = OptimConfig(zero_stage=stage, micro_batch_size=3, grad_clip=0.5)
    config = deepspeed_config(optim, world_size=2, layout=BatchLayout(12, 3, 4))
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 2
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is torch.cuda.is_available()  # precision auto
    assert deepspeed_config(OptimConfig(precision="bf16"), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(OptimConfig(grad_clip=None), 1)["gradient_clipping"] == 0.0
    assert "optimizer" not in config and "scheduler" not in config  # both are built in code, per engine


def test_rng_state_roundtrips_through_json():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    saved = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    set_rng_state(saved)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---- engines in fresh processes ------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, (
            f"{' '.join(cmd[:4])}... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _script_args(phase: str, zero: int, checkpoints: Location, tmp: Path, extra: list[str]) -> list[str]:
    args = [str(SCRIPT), "--phase", phase, "--zero", str(zero), "--root", checkpoints.uri]
    args += ["--staging", str(tmp / f"staging_{phase}"), "--out", str(tmp / phase)]
    args += ["--save-step", str(SAVE_STEP), "--total-steps", str(TOTAL_STEPS), *extra]
    return args + (["--endpoint", checkpoints.endpoint_url] if checkpoints.endpoint_url else [])


def _single(phase, zero, checkpoints, tmp, extra=(), expect_ok=True):
    return _run([sys.executable, *_script_args(phase, zero, checkpoints, tmp, list(extra))], expect_ok)


def _ranks(phase, zero, checkpoints, tmp, n=2):
    launcher, port = Path(sys.executable).parent / "deepspeed", free_port()
    cmd = [str(launcher), "--num_gpus", str(n), "--master_port", str(port)]
    try:
        return _run(cmd + _script_args(phase, zero, checkpoints, tmp, []))
    finally:
        remove_shm_buffers(("127.0.0.1", port))  # what rlpipe's launcher does after every launch


def _outputs(tmp: Path, phase: str, rank: int) -> tuple[dict, dict]:
    record = json.loads((tmp / phase / f"rank{rank}.json").read_text())
    return record, load_file(str(tmp / phase / f"params_rank{rank}.safetensors"))


def _assert_resume_matches(tmp: Path, rank: int, engines: list[str]) -> None:
    first, first_params = _outputs(tmp, "first", rank)
    resumed, resumed_params = _outputs(tmp, "resume", rank)
    after = [str(s) for s in range(SAVE_STEP + 1, TOTAL_STEPS + 1)]
    assert resumed["losses"] == {s: first["losses"][s] for s in after}  # exact
    assert resumed["lrs"] == {s: first["lrs"][s] for s in after}
    assert resumed["sched"] == {s: first["sched"][s] for s in after}
    assert resumed["rand"] == first["rand"]  # this rank's torch, python and numpy RNG restored
    assert resumed["trainer_state"] == {"data_cursor": 2 * SAVE_STEP, "note": "tiny", "step": SAVE_STEP}
    assert resumed["global_steps"] == {name: SAVE_STEP for name in engines}
    for name in engines:
        # The resumed process started from another init: equality means the weights were loaded.
        assert not torch.equal(resumed_params[f"{name}/init"], first_params[f"{name}/init"])
        assert torch.equal(resumed_params[f"{name}/final"], first_params[f"{name}/final"]), name


def _committed_files(checkpoints: Location, step: int) -> list[str]:
    return sorted(read_commit_record(checkpoints, step)["files"])


@pytest.mark.parametrize(
    "zero, backend, critic",
    [(0, "local", False), (2, "s3", True), (3, "local", False)],
    ids=["zero0-local", "zero2-s3-policy+critic", "zero3-local"],
)
def test_single_process_resume_matches_uninterrupted(zero, backend, critic, request, tmp_path):
    root = request.getfixturevalue("s3_root" if backend == "s3" else "local_root")
    checkpoints = root / "run" / "ppo" / "checkpoints"
    extra = ["--critic"] if critic else []
    engines = ["policy", "value"] if critic else ["policy"]

    _single("first", zero, checkpoints, tmp_path, extra)
    assert committed_steps(checkpoints) == [SAVE_STEP]
    files = _committed_files(checkpoints, SAVE_STEP)
    assert {"trainer_state.json", "rng/rank_00000.json"} <= set(files)
    for name in engines:
        assert any(f.startswith(f"{name}/deepspeed/") and f.endswith("model_states.pt") for f in files)
        if zero:
            assert f"{name}/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert not [f for f in files if f.endswith(".py")]  # no code in a checkpoint

    _single("resume", zero, checkpoints, tmp_path, extra)
    _assert_resume_matches(tmp_path, rank=0, engines=engines)


def test_two_cpu_ranks_zero2_train_save_resume(local_root, tmp_path):
    checkpoints = local_root / "run" / "ppo" / "checkpoints"
    _ranks("first", 2, checkpoints, tmp_path)

    records = [_outputs(tmp_path, "first", r) for r in (0, 1)]
    for record, params in records:
        losses = [record["losses"][str(s)]["policy"] for s in range(1, TOTAL_STEPS + 1)]
        assert all(math.isfinite(x) for x in losses)
        assert all(b < a for a, b in itertools.pairwise(losses)), losses  # fixed batch: loss goes down
        assert not torch.equal(params["policy/init"], params["policy/final"])
    assert torch.equal(records[0][1]["policy/final"], records[1][1]["policy/final"])  # ranks agree
    assert records[0][0]["rand"] != records[1][0]["rand"]  # each rank has its own RNG stream

    assert committed_steps(checkpoints) == [SAVE_STEP]
    files = _committed_files(checkpoints, SAVE_STEP)
    for rank in (0, 1):
        assert f"policy/deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng/rank_{rank:05d}.json" in files

    _ranks("resume", 2, checkpoints, tmp_path)
    for rank in (0, 1):
        _assert_resume_matches(tmp_path, rank=rank, engines=["policy"])


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_refuses_a_checkpoint_that_runs_code(local_root, tmp_path):
    checkpoints = local_root / "run" / "ppo" / "checkpoints"
    staged = tmp_path / "evil"
    (staged / "policy" / "deepspeed").mkdir(parents=True)
    (staged / "rng").mkdir()
    evil_file = staged / "policy" / "deepspeed" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code_ran"
    torch.save({"module": _Payload(str(marker))}, evil_file)
    # The payload is live: a plain unpickling runs it.
    torch.load(evil_file, weights_only=False)
    assert marker.exists()
    marker.unlink()
    (staged / "trainer_state.json").write_text(json.dumps({"step": SAVE_STEP}))
    (staged / "rng" / "rank_00000.json").write_text(json.dumps(rng_state()))
    # Committed with valid hashes: the sha256 check proves integrity, not that the writer is benign.
    commit_checkpoint(staged, checkpoints, SAVE_STEP)

    proc = _single("resume", 0, checkpoints, tmp_path, expect_ok=False)
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr
    assert not marker.exists()


def test_nothing_committed_means_a_fresh_start(local_root, tmp_path):
    checkpoints = local_root / "run" / "ppo" / "checkpoints"
    (checkpoints / "step_000004" / "trainer_state.json").write_text("{}")  # a crashed upload: no COMMITTED
    assert load_training_state({}, checkpoints, tmp_path / "staging") is None


def test_save_training_state_needs_json_state(tmp_path):
    # trainer_state is JSON, never pickled: a non-JSON value fails before anything is committed.
    with pytest.raises(TypeError):
        save_training_state({}, {"cursor": object()}, Location(str(tmp_path / "ck")), 1, None, tmp_path / "s")
    assert not (tmp_path / "ck").exists()


class _EngineStandIn:
    """The part of a DeepSpeed engine `step_engine` reads (the real engine runs in the PPO stage tests)."""

    def __init__(self, grads, boundary=True, optimizer_norm=None):
        self.module = torch.nn.Linear(2, 1, bias=False)
        self.module.weight.grad = torch.tensor([grads], dtype=torch.float32)
        self.optimizer = (
            type("Opt", (), {"_global_grad_norm": optimizer_norm})() if optimizer_norm else object()
        )
        self.boundary, self.steps = boundary, 0

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def step(self):
        self.steps += 1

    def get_global_grad_norm(self):
        return getattr(self.optimizer, "_global_grad_norm", None)


def test_step_engine_reports_the_gradient_norm_of_an_update():
    from stages.models.engine import step_engine

    plain = _EngineStandIn([3.0, 4.0])
    assert step_engine(plain) == pytest.approx(5.0, rel=1e-7) and plain.steps == 1  # fp32 ZeRO-0: from grads
    assert step_engine(_EngineStandIn([3.0, 4.0], boundary=False)) is None  # accumulating: no update yet
    zero = _EngineStandIn([3.0, 4.0], optimizer_norm=7.5)  # ZeRO/bf16 optimizers report their own
    assert step_engine(zero) == 7.5
