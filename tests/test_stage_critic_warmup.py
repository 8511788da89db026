"""The critic-warmup stage on the tiny recipe, through `rlpipe stage`: value regression with a frozen policy.

The runs start from a short SFT of the tiny model (run once per module, in the run "base"): the
random tiny model never ends a response, so every reward would be the same and there would be
nothing for a critic to explain. Short SFT responses sometimes end in time and sometimes not;
with a missing-EOS penalty the outcome (0 or -penalty, +1 when right) is what the critic learns
to predict from the prompt and the response so far.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
from cli_runs import RLPIPE, rlpipe, sets, stage
from conftest import QUICK_SFT
from kill_points import kill_in_turn
from safetensors.torch import load_file

from storage.checkpoints import committed_steps
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import read_metrics
from storage.rollouts import ROLLOUT_SCHEMA, read_rollouts, rollout_parts

STAGE = "critic_warmup"
SFT = QUICK_SFT
# No RM stage: the critic starts from the policy (zero head); reward = verifier - missing-EOS penalty.
WARMUP = [
    *SFT,
    "reward_model.enabled=false",
    "model.critic_init=policy",
    "generation.max_new_tokens=20",
    "reward.missing_eos_penalty=1.0",
    "critic_warmup.steps=6",
    "critic_warmup.save_every=3",
    "critic_warmup.prompts_per_step=16",
    "critic_warmup.samples_per_prompt=4",
    # every optim field the test relies on is set: a nested override replaces the stage's defaults
    "critic_warmup.optim.lr=0.001",
    "critic_warmup.optim.warmup_steps=2",
    "critic_warmup.optim.micro_batch_size=16",
    "critic_warmup.minibatches=4",  # 64 rows per step: 4 optimizer steps of 16 rows per epoch
    "critic_warmup.epochs=4",  # 4 shuffled passes x 4 mini-batches: 16 updates per step
]


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def critic_weights(layout: RunLayout) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(layout.final(STAGE, "value").path, "model.safetensors"))


def metric(layout: RunLayout, name: str) -> list[float]:
    return [float(r[name]) for r in read_metrics(layout.metrics(STAGE)) if name in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """SFT, then an uninterrupted critic warmup on it; the policy file is hashed before and after."""
    root = tmp_path_factory.mktemp("runs")
    layout = RunLayout(Location(str(root)), "base")
    stage("sft", "base", root, SFT)
    policy_file = os.path.join(layout.final("sft", "policy").path, "model.safetensors")
    before = sha256(policy_file)
    stage(STAGE, "base", root, WARMUP)
    return layout, policy_file, before


def test_completes_with_manifest_loadable_value_model_and_untouched_policy(base):
    layout, policy_file, before = base
    manifest = read_manifest(layout.manifest(STAGE))
    assert manifest is not None and manifest.outputs["value"] == str(layout.final(STAGE, "value"))
    assert manifest.inputs["policy"].uri == str(layout.final("sft", "policy"))
    assert manifest.inputs["policy"].manifest_sha256 is not None  # pinned to SFT's manifest
    assert math.isfinite(manifest.metrics["explained_var"]) and manifest.metrics["value_loss"] > 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    value = AutoModelForSequenceClassification.from_pretrained(layout.final(STAGE, "value").path)
    assert value.config.num_labels == 1 and AutoTokenizer.from_pretrained(layout.final(STAGE, "value").path)
    assert sha256(policy_file) == before  # the policy it sampled from was never written
    assert committed_steps(layout.checkpoints(STAGE)) == [3, 6]


def test_critic_learns_explained_variance_rises_and_weights_change(base):
    layout, policy_file, _ = base
    ev = metric(layout, "critic_warmup/explained_var")  # of the values BEFORE each step's update
    assert len(ev) == 6 and all(math.isfinite(x) for x in ev)
    assert ev[0] == pytest.approx(0.0, abs=1e-6)  # zero head: V = 0 predicts nothing at first
    # positive explained variance on responses the critic has not been trained on yet, 3 steps running
    # (this seed: about 0.03, 0.08, 0.03, 0.05 over steps 3-6; a critic stuck at the mean stays at ~0)
    assert min(ev[-3:]) > 0.01 and sum(ev[-3:]) / 3 > 0.02
    losses = metric(layout, "critic_warmup/value_loss")
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert metric(layout, "critic_warmup/generated") == [64.0] * 6
    # every backbone tensor and the head moved away from the policy they started from
    initial, trained = load_file(policy_file), critic_weights(layout)
    assert torch.count_nonzero(trained["score.weight"]) > 0
    backbone = {name: tensor for name, tensor in trained.items() if name != "score.weight"}
    assert backbone and all(not torch.equal(initial[name], t) for name, t in backbone.items())


def test_rollouts_hold_every_step_once_with_every_column_and_per_token_lengths(base):
    layout, _, _ = base
    parts = rollout_parts(layout.rollouts(STAGE))
    assert [p.uri.split("/")[-2] for p in parts] == [f"step={s:06d}" for s in range(1, 7)]
    table = read_rollouts(layout.rollouts(STAGE))
    assert table.schema.names == ROLLOUT_SCHEMA.names and table.num_rows == 6 * 64
    rows = table.to_pylist()
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4, 5, 6]
    for r in rows:
        n = r["response_len"]
        assert n == len(r["response_ids"]) == len(r["logprobs"]) == len(r["values"]) == len(r["returns"])
        assert len(r["advantages"]) == n and r["ref_logprobs"] == [] and r["rm_score"] is None
        # lam_critic = gamma = 1: every token's return is the outcome; advantages = returns - values
        assert r["returns"] == pytest.approx([r["reward"]] * n, abs=1e-6)
        adv = [ret - v for ret, v in zip(r["returns"], r["values"], strict=True)]
        assert r["advantages"] == pytest.approx(adv, abs=1e-5)
        assert r["run_id"] == "base" and r["stage"] == STAGE and r["policy_version"] == 0
    assert {r["sample_idx"] for r in rows} == {0, 1, 2, 3}
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}  # both outcomes occur
    # values logged are those of the critic before the step's update: the first step's are all 0
    assert all(v == 0.0 for r in rows if r["step"] == 1 for v in r["values"])


def test_killed_at_every_point_in_turn_resumes_to_the_same_critic_and_rollouts(base, tmp_path):
    """kill -9 after the first commit, then in step 5's generation, then in step 5's critic updates
    (one generation and 16 updates per step, counted from the resume at step 3); the final rerun
    matches the uninterrupted run bit for bit."""
    base_layout, _, _ = base
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "killed")
    # the same SFT policy, by URI: the killed run needs no SFT of its own
    overrides = [*WARMUP, "sft.enabled=false", f"model.policy={base_layout.final('sft', 'policy')}"]
    command = [RLPIPE, "stage", STAGE, "--run-id", "killed", "--storage", str(root)]
    points = ["after_commit", "generate:2", "train:20"]
    committed = kill_in_turn([*command, *sets(overrides)], command, layout, STAGE, points)
    assert committed == [[3], [3], [3]]
    rerun = rlpipe("stage", STAGE, "--run-id", "killed", "--storage", str(root))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # every step once, in rollouts and metrics
    steps = [r["step"] for r in read_metrics(layout.metrics(STAGE)) if "critic_warmup/explained_var" in r]
    assert steps == list(range(1, 7))
    table = read_rollouts(layout.rollouts(STAGE))
    assert table.num_rows == 6 * 64 and sorted(set(table["step"].to_pylist())) == list(range(1, 7))
    expected = read_rollouts(base_layout.rollouts(STAGE))
    for column in ("step", "prompt_id", "sample_idx", "response_ids", "reward", "values", "returns"):
        assert table[column].to_pylist() == expected[column].to_pylist(), column
    base_weights, resumed = critic_weights(base_layout), critic_weights(layout)
    assert all(torch.equal(base_weights[name], resumed[name]) for name in base_weights)


def test_rollouts_from_trains_without_generating(base, tmp_path):
    base_layout, _, _ = base
    source = str(base_layout.rollouts(STAGE))
    root = tmp_path / "runs"
    overrides = [
        *WARMUP,
        "sft.enabled=false",
        f"model.policy={base_layout.final('sft', 'policy')}",
        f"critic_warmup.rollouts_from={source}",
        "critic_warmup.steps=3",
    ]
    stage(STAGE, "replay", root, overrides)
    layout = RunLayout(Location(str(root)), "replay")
    manifest = read_manifest(layout.manifest(STAGE))
    assert manifest is not None and manifest.inputs["rollouts"].uri == source
    assert metric(layout, "critic_warmup/generated") == [0.0, 0.0, 0.0]
    # the rows are the source's responses, with this run's values and returns recomputed from `reward`
    mine, theirs = (
        read_rollouts(layout.rollouts(STAGE)),
        read_rollouts(base_layout.rollouts(STAGE), range(1, 4)),
    )
    for column in ("step", "prompt_id", "response_ids", "logprobs", "reward", "is_correct"):
        assert mine[column].to_pylist() == theirs[column].to_pylist(), column
    assert set(mine["run_id"].to_pylist()) == {"replay"}
    # same critic init, same data, same updates as the source run's first 3 steps: same values
    assert mine["values"].to_pylist() == theirs["values"].to_pylist()


def test_shared_critic_trains_only_the_value_head(base, tmp_path):
    """critic_mode=shared: the backbone is the policy's, frozen; the export's policy is bit-identical."""
    base_layout, policy_file, _ = base
    root = tmp_path / "runs"
    overrides = [
        *WARMUP,
        "sft.enabled=false",
        f"model.policy={base_layout.final('sft', 'policy')}",
        "model.critic_mode=shared",
        "critic_warmup.steps=2",
        "critic_warmup.save_every=2",
        "critic_warmup.optim.lr=0.01",
    ]
    stage(STAGE, "shared", root, overrides)
    layout = RunLayout(Location(str(root)), "shared")
    exported = layout.final(STAGE, "value").path
    initial, policy_part = load_file(policy_file), load_file(os.path.join(exported, "model.safetensors"))
    assert initial.keys() == policy_part.keys()
    assert all(torch.equal(initial[name], policy_part[name]) for name in initial)
    head = load_file(os.path.join(exported, "value_head.safetensors"))["weight"]
    assert torch.count_nonzero(head) > 0  # started at zero, trained
    from stages.models.value_head import PolicyWithValueHead

    loaded = PolicyWithValueHead.from_pretrained(exported, dtype="float32")
    assert torch.equal(loaded.value_head.weight, head)


def test_missing_reward_model_fails_with_one_line(tmp_path):
    overrides = [
        "wandb.mode=disabled",
        "sft.enabled=false",
        "reward_model.enabled=false",
        "model.critic_init=policy",
        "reward.rm_coef=1.0",
    ]
    proc = rlpipe("stage", STAGE, "--run-id", "x", "--storage", str(tmp_path), *sets(overrides))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "critic_warmup: reward.rm_coef > 0 but reward_model.enabled is false" in last
    assert "Traceback" not in proc.stderr
