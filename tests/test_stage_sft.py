"""The stage contract, exercised on the SFT stage of the tiny recipe through `rlpipe stage`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import RLPIPE, rlpipe, sets
from kill_points import kill_in_turn
from safetensors.torch import load_file

from storage.checkpoints import committed_steps, read_commit_record
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import read_metrics

# Small enough for CI, big enough that the loss moves: 8 steps of 16 sequences.
FAST = [
    "wandb.mode=disabled",
    "task.train_size=200",
    "task.heldout_size=16",
    "generation.max_new_tokens=24",
    "sft.steps=8",
    "sft.save_every=4",
    "sft.log_every=1",
    "sft.batch_size=16",
    "sft.optim.micro_batch_size=8",  # 2 micro-batches accumulated per step
]


def final_weights(layout: RunLayout) -> dict[str, torch.Tensor]:
    directory = layout.final("sft", "policy")
    assert directory.is_local
    return load_file(os.path.join(directory.path, "model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted SFT run, shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    proc = rlpipe("stage", "sft", "--run-id", "base", "--storage", str(root), *sets(FAST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return RunLayout(Location(str(root)), "base"), proc


def test_sft_completes_writes_manifest_and_a_loadable_export(finished_run):
    layout, proc = finished_run
    manifest = read_manifest(layout.manifest("sft"))
    assert manifest is not None and manifest.outputs["policy"] == str(layout.final("sft", "policy"))
    assert manifest.inputs["policy"].uri.startswith("tiny:")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(layout.final("sft", "policy").path)
    tokenizer = AutoTokenizer.from_pretrained(layout.final("sft", "policy").path)
    assert model.config.model_type == "qwen2" and tokenizer.eos_token_id is not None
    # The loss went down and the held-out accuracy was measured.
    losses = [r["sft/loss"] for r in read_metrics(layout.metrics("sft")) if "sft/loss" in r]
    assert len(losses) == 8 and all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert 0.0 <= manifest.metrics["heldout_greedy"] <= 1.0
    assert committed_steps(layout.checkpoints("sft")) == [4, 8]


def test_sft_changes_the_policy_weights(finished_run):
    layout, _ = finished_run
    from stages.config.pipeline import load_config
    from stages.models.tiny import tiny_model_path

    initial = load_file(str(tiny_model_path(load_config().tiny_model) / "model.safetensors"))
    trained = final_weights(layout)
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert len(changed) == len(initial)


def test_rerun_of_a_complete_stage_is_skipped_and_force_recomputes(finished_run):
    layout, _ = finished_run
    before = layout.manifest("sft").read_text()
    proc = rlpipe("stage", "sft", "--run-id", "base", "--storage", layout.root.uri)
    assert proc.returncode == 0 and "skipped" in proc.stdout
    assert layout.manifest("sft").read_text() == before
    weights = final_weights(layout)
    forced = rlpipe("stage", "sft", "--run-id", "base", "--storage", layout.root.uri, "--force")
    assert forced.returncode == 0 and "skipped" not in forced.stdout
    after = read_manifest(layout.manifest("sft"))
    assert after.started_at >= json.loads(before)["finished_at"]  # recomputed, not skipped
    recomputed = final_weights(layout)
    assert all(torch.equal(weights[name], recomputed[name]) for name in weights)  # same seed, same result


def test_killed_at_every_point_in_turn_resumes_to_the_same_result(finished_run, tmp_path):
    """kill -9 after the first commit, then (each try resuming the last) in an optimizer step, in the
    middle of step 8's checkpoint upload and on the manifest rename; committed state intact after
    every kill; the final rerun matches the uninterrupted run bit for bit."""
    base_layout, _ = finished_run
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "killed")
    command = [RLPIPE, "stage", "sft", "--run-id", "killed", "--storage", str(root)]
    files = len(read_commit_record(base_layout.checkpoints("sft"), 4)["files"])
    # counted from each resume at step 4: 2 micro-batches per step (train:3 is in step 6)
    points = ["after_commit", "train:3", f"upload:{files // 2}", "manifest:1"]
    committed = kill_in_turn([*command, *sets(FAST)], command, layout, "sft", points)
    assert committed == [[4], [4], [4], [4, 8]]  # each kill landed where it was aimed

    rerun = rlpipe("stage", "sft", "--run-id", "killed", "--storage", str(root))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert read_manifest(layout.manifest("sft")) is not None
    # Metrics of the steps after the resumed checkpoint were replaced, not duplicated.
    steps = [r["step"] for r in read_metrics(layout.metrics("sft")) if "sft/loss" in r]
    assert steps == list(range(1, 9))
    # Same seed, same data order, restored optimizer and RNG: bit-identical weights.
    base, resumed = final_weights(base_layout), final_weights(layout)
    assert all(torch.equal(base[name], resumed[name]) for name in base)


def test_every_checkpoint_corrupt_is_one_line_and_force_starts_over(finished_run, tmp_path):
    """A run whose committed checkpoints all fail their sha256: a clear error, nothing deleted; --force recovers."""
    base_layout, _ = finished_run
    root = tmp_path / "runs"
    shutil.copytree(base_layout.run.path, root / "base")
    layout = RunLayout(Location(str(root)), "base")
    Path(layout.manifest("sft").path).unlink()  # the stage is incomplete: it must resume
    for step in committed_steps(layout.checkpoints("sft")):
        state = Path(layout.checkpoints("sft").path) / f"step_{step:06d}" / "trainer_state.json"
        state.write_text(state.read_text().replace("{", "{ ", 1))  # same meaning, other bytes
    rerun = rlpipe("stage", "sft", "--run-id", "base", "--storage", str(root))
    lines = rerun.stderr.strip().splitlines()
    assert rerun.returncode != 0 and len(lines) == 1 and "Traceback" not in rerun.stderr, rerun.stderr
    assert "steps [8, 4] are all corrupt" in lines[0] and "--force" in lines[0]
    assert committed_steps(layout.checkpoints("sft")) == [4, 8]  # evidence kept, not deleted

    forced = rlpipe("stage", "sft", "--run-id", "base", "--storage", str(root), "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    base, again = final_weights(base_layout), final_weights(layout)
    assert all(torch.equal(base[name], again[name]) for name in base)


def test_stage_uses_another_runs_output_when_given_its_uri(finished_run, tmp_path):
    base_layout, _ = finished_run
    other = str(base_layout.final("sft", "policy"))
    overrides = [*FAST, f"model.policy={other}", "sft.steps=2", "sft.save_every=2"]
    proc = rlpipe(
        "stage", "sft", "--run-id", "swapped", "--storage", str(tmp_path / "runs"), *sets(overrides)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = read_manifest(RunLayout(Location(str(tmp_path / "runs")), "swapped").manifest("sft"))
    assert manifest.inputs["policy"].uri == other
    # Pinned to the producing stage's manifest: rerunning that stage would invalidate this one.
    assert manifest.inputs["policy"].manifest_sha256 is not None


def test_stage_runs_on_s3_storage(s3_root):
    overrides = [*FAST, "sft.steps=2", "sft.save_every=1", f"storage.endpoint_url={s3_root.endpoint_url}"]
    proc = rlpipe("stage", "sft", "--run-id", "s3run", "--storage", s3_root.uri, *sets(overrides))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = RunLayout(s3_root, "s3run")
    assert read_manifest(layout.manifest("sft")) is not None
    assert committed_steps(layout.checkpoints("sft")) == [1, 2]
    assert "model.safetensors" in layout.final("sft", "policy").list_names()


def test_unknown_stage_and_bad_config_fail_with_one_line(tmp_path):
    proc = rlpipe("stage", "nope", "--run-id", "x", "--storage", str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown stage 'nope'")
    proc = rlpipe("stage", "sft", "--run-id", "x", "--storage", str(tmp_path), "--set", "sft.stepz=3")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: unknown config key 'sft.stepz'"


def test_module_entry_point_requires_a_run_id(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"seed": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.sft", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3 and "has no run_id" in proc.stderr  # USER_ERROR_EXIT: bad input, not retried


def test_two_ranks_commit_every_ranks_state_and_resume_exactly(tmp_path):
    """`--nproc 2`: both ranks' optimizer shards and RNG are committed, and a 2-rank resume is exact."""
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "two")
    small = [
        *FAST,
        "sft.steps=4",
        "sft.save_every=2",
        "sft.batch_size=8",
        "sft.optim.micro_batch_size=4",
    ]
    first = rlpipe("stage", "sft", "--run-id", "two", "--storage", str(root), "--nproc", "2", *sets(small))
    assert first.returncode == 0, first.stdout + first.stderr
    files = json.loads((layout.checkpoint("sft", 4) / "COMMITTED").read_text())["files"]
    for rank in (0, 1):
        assert f"policy/deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng/rank_{rank:05d}.json" in files
    uninterrupted = final_weights(layout)
    # A crash right after step 2 was committed: no manifest, no step 4.
    layout.manifest("sft").remove()
    layout.checkpoint("sft", 4).remove(recursive=True)
    layout.final("sft", "policy").remove(recursive=True)
    # On another number of ranks the checkpoint of step 2 is refused in one line, before any work.
    other = rlpipe("stage", "sft", "--run-id", "two", "--storage", str(root), "--nproc", "1")
    assert other.returncode == 1 and other.stderr.strip().splitlines()[-1] == (
        "error: stage sft failed: sft of run two was checkpointed on 2 rank(s) (step 2) and resumes only "
        "on as many: rerun with --nproc 2, or with --force to start it over"
    )
    assert committed_steps(layout.checkpoints("sft")) == [2]
    second = rlpipe("stage", "sft", "--run-id", "two", "--storage", str(root), "--nproc", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = final_weights(layout)
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
