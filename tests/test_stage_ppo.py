"""The PPO stage on the tiny recipe, through `rlpipe stage`: critic + policy updates, GRPO, resume.

The runs start from a short SFT of the tiny model (run once per module, in the run "base"): its
responses sometimes end within max_new_tokens and sometimes not, so with a missing-EOS penalty the
rewards vary (0 or -1, +1 when right) and the advantages are not all zero. No RM stage and no critic
warmup: the critic starts from the policy with a zero head.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch
from cli_runs import RLPIPE, rlpipe, sets, stage
from conftest import QUICK_SFT, verify_committed
from kill_points import kill_in_turn, with_fault
from safetensors.torch import load_file

from storage.checkpoints import committed_steps, latest_committed_step, read_commit_record
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import read_metrics
from storage.rollouts import ROLLOUT_SCHEMA, read_rollouts

STAGE = "ppo"
SFT = QUICK_SFT
STEPS, ROWS = 4, 32  # 8 prompts x 4 samples per step
PPO = [
    *SFT,
    "reward_model.enabled=false",
    "critic_warmup.enabled=false",
    "model.critic_init=policy",
    "generation.max_new_tokens=20",
    "reward.missing_eos_penalty=1.0",
    f"ppo.steps={STEPS}",
    "ppo.save_every=2",
    "ppo.eval_every=2",
    "ppo.prompts_per_step=8",
    "ppo.samples_per_prompt=4",
    "ppo.minibatches=2",
    "ppo.epochs=2",
    "ppo.kl_coef=0.05",  # exercises the reference model and ref_logprobs
    # every optim field the test relies on is set: a nested override replaces the stage's defaults
    "ppo.policy_optim.lr=0.001",
    "ppo.policy_optim.micro_batch_size=8",  # 16 rows per optimizer step: 2 micro-batches accumulated
    "ppo.critic_optim.lr=0.001",
    "ppo.critic_optim.micro_batch_size=16",
]


def weights(layout: RunLayout, name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(layout.final(STAGE, name).path, "model.safetensors"))


def metric(layout: RunLayout, name: str) -> list[float]:
    return [float(r[name]) for r in read_metrics(layout.metrics(STAGE)) if name in r]


def from_sft(base_layout: RunLayout, extra: list[str]) -> list[str]:
    """The base run's SFT policy by URI: other runs need no SFT of their own."""
    return [*PPO, "sft.enabled=false", f"model.policy={base_layout.final('sft', 'policy')}", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    layout = RunLayout(Location(str(root)), "base")
    stage("sft", "base", root, SFT)
    stage(STAGE, "base", root, PPO)
    return layout


def test_completes_with_manifest_and_loadable_changed_policy_and_critic(base):
    manifest = read_manifest(base.manifest(STAGE))
    assert manifest is not None
    assert manifest.outputs["policy"] == str(base.final(STAGE, "policy"))
    assert manifest.outputs["value"] == str(base.final(STAGE, "value"))
    assert manifest.inputs["policy"].uri == str(base.final("sft", "policy"))
    for key in ("heldout_greedy", "heldout_sampled", "initial_heldout_greedy", "initial_heldout_sampled"):
        assert 0.0 <= manifest.metrics[key] <= 1.0
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert AutoModelForCausalLM.from_pretrained(base.final(STAGE, "policy").path)
    assert (
        AutoModelForSequenceClassification.from_pretrained(base.final(STAGE, "value").path).config.num_labels
        == 1
    )
    # every policy tensor moved; the critic (policy backbone, zero head at the start) moved everywhere
    initial = load_file(os.path.join(base.final("sft", "policy").path, "model.safetensors"))
    policy, critic = weights(base, "policy"), weights(base, "value")
    assert initial.keys() == policy.keys() and all(not torch.equal(initial[k], policy[k]) for k in initial)
    assert torch.count_nonzero(critic["score.weight"]) > 0
    backbone = [k for k in critic if k != "score.weight"]
    assert backbone and all(not torch.equal(initial[k], critic[k]) for k in backbone)
    assert committed_steps(base.checkpoints(STAGE)) == [2, 4]
    # each checkpoint carries HF exports (for evaluation while training runs); the last equals final/
    for step in (2, 4):
        assert AutoModelForCausalLM.from_pretrained(base.checkpoint_model(STAGE, step, "policy").path)
    last = load_file(os.path.join(base.checkpoint_model(STAGE, 4, "policy").path, "model.safetensors"))
    assert all(torch.equal(last[k], policy[k]) for k in policy)


def test_metrics_are_finite_and_logprobs_match_the_sampler(base):
    for name in ("policy_loss", "value_loss", "entropy", "kl", "approx_kl", "clipfrac", "reward",
                 "grad_norm_policy", "grad_norm_critic"):  # fmt: skip
        values = metric(base, f"ppo/{name}")
        assert len(values) == STEPS and all(math.isfinite(v) for v in values), name
    assert all(v > 0 for v in metric(base, "ppo/grad_norm_policy") + metric(base, "ppo/grad_norm_critic"))
    assert all(v > 0 for v in metric(base, "ppo/value_loss"))
    assert all(v < 1e-4 for v in metric(base, "ppo/logprob_gen_diff"))  # old logprobs == the sampler's
    kl = metric(base, "ppo/kl")  # k3 of the updating policy vs. the reference, during the updates
    assert all(v >= 0 for v in kl) and kl[-1] > kl[0] > 0
    assert len(metric(base, "ppo/heldout_sampled")) == 3  # before step 1, at step 2 and at step 4


def test_rollouts_hold_every_step_once_with_every_column(base):
    table = read_rollouts(base.rollouts(STAGE))
    assert table.schema.names == ROLLOUT_SCHEMA.names and table.num_rows == STEPS * ROWS
    rows = table.to_pylist()
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    for r in rows:
        n = r["response_len"]
        per_token = ("response_ids", "logprobs", "ref_logprobs", "values", "returns", "advantages")
        assert all(len(r[c]) == n for c in per_token)
        # returns with lam_critic = gamma = 1 and no KL would be the reward; the KL reward shifts them
        assert r["policy_version"] == r["step"] - 1  # sampled by the policy after step - 1 updates
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}


def test_update_moves_logprobs_in_the_direction_of_the_advantages(base):
    """The last step's rows under the final policy (updated on exactly these rows): the first-order
    surrogate sum(A * (logp_new - logp_old)) is positive. Zero or wrong-signed updates fail it."""
    from transformers import AutoModelForCausalLM

    from stages.models.forward import build_token_batch, response_logprobs

    rows = read_rollouts(base.rollouts(STAGE), steps=[STEPS]).to_pylist()
    batch = build_token_batch([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], 0)
    policy = AutoModelForCausalLM.from_pretrained(base.final(STAGE, "policy").path).eval()
    with torch.no_grad():
        new_BT, _ = response_logprobs(policy, batch)
    gain = sum(
        a * (new - old)
        for r, new_T in zip(rows, new_BT.tolist(), strict=True)
        for a, new, old in zip(r["advantages"], new_T, r["logprobs"], strict=False)
    )
    assert gain > 0.5, gain


def test_killed_at_every_point_in_turn_resumes_to_the_same_policy_and_rollouts(base, tmp_path):
    """kill -9 after the first commit, then (each try resuming the last) in a generation, in an
    optimizer step, in the middle of step 4's checkpoint upload and on the manifest rename: the
    committed state is intact after every kill, and the final rerun matches the uninterrupted run
    bit for bit with every rollout step and metric step stored once."""
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "killed")
    command = [RLPIPE, "stage", STAGE, "--run-id", "killed", "--storage", str(root)]
    files = len(read_commit_record(base.checkpoints(STAGE), 2)["files"])
    # counted from each resume at step 2: 12 engine steps per PPO step, then step 4's checkpoint files
    points = ["after_commit", "generate:1", "train:5", f"upload:{files // 2}", "manifest:1"]
    committed = kill_in_turn([*command, *sets(from_sft(base, []))], command, layout, STAGE, points)
    assert committed == [[2], [2], [2], [2], [2, 4]]  # each kill landed where it was aimed
    rerun = rlpipe("stage", STAGE, "--run-id", "killed", "--storage", str(root))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    steps = [int(r["step"]) for r in read_metrics(layout.metrics(STAGE)) if "ppo/policy_loss" in r]
    assert steps == [1, 2, 3, 4]
    heldout = [int(r["step"]) for r in read_metrics(layout.metrics(STAGE)) if "ppo/heldout_sampled" in r]
    assert heldout == [0, 2, 4]
    table, expected = read_rollouts(layout.rollouts(STAGE)), read_rollouts(base.rollouts(STAGE))
    for column in ("step", "prompt_id", "sample_idx", "response_ids", "reward", "values", "advantages"):
        assert table[column].to_pylist() == expected[column].to_pylist(), column
    for name in ("policy", "value"):
        mine, theirs = weights(layout, name), weights(base, name)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    initial = read_manifest(base.manifest(STAGE)).metrics["initial_heldout_sampled"]
    assert read_manifest(layout.manifest(STAGE)).metrics["initial_heldout_sampled"] == initial


@pytest.mark.parametrize(
    "fault, message",
    [
        (
            "reward:3",
            "error: stage ppo failed: ppo step 3: non-finite reward (1 of 32)",
        ),  # score_samples: once per step
        (
            "policy_loss:20",
            "error: stage ppo failed: ppo step 3: non-finite policy loss (nan) before its backward",
        ),  # 8 per step
    ],
)
def test_a_nan_stops_the_stage_naming_the_step_and_keeps_the_last_checkpoint(base, tmp_path, fault, message):
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "nan")
    command = [RLPIPE, "stage", STAGE, "--run-id", "nan", "--storage", str(root), *sets(from_sft(base, []))]
    proc = subprocess.run(command, env=with_fault("RLPIPE_TEST_NAN", fault), capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[-1].startswith(message), errors
    assert read_manifest(layout.manifest(STAGE)) is None
    assert latest_committed_step(layout.checkpoints(STAGE)) == 2  # step 2's checkpoint, untouched
    verify_committed(layout.checkpoints(STAGE), 2)
    assert [int(r["step"]) for r in read_metrics(layout.metrics(STAGE)) if "ppo/policy_loss" in r] == [1, 2]


def test_skip_mode_leaves_the_weights_of_a_nan_step_and_carries_on(base, tmp_path):
    root = tmp_path / "runs"
    layout = RunLayout(Location(str(root)), "skip")
    overrides = from_sft(base, ["ppo.on_nonfinite=skip", "ppo.steps=3"])
    command = [RLPIPE, "stage", STAGE, "--run-id", "skip", "--storage", str(root), *sets(overrides)]
    proc = subprocess.run(
        command, env=with_fault("RLPIPE_TEST_NAN", "reward:3"), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ppo step 3: non-finite reward (1 of 32)" in proc.stdout + proc.stderr
    assert metric(layout, "ppo/skipped_nonfinite") == [0.0, 0.0, 1.0]
    assert len(metric(layout, "ppo/policy_loss")) == 2  # step 3 made no update
    # step 3 left the weights as step 2 made them: its checkpoint's policy equals the final one
    from transformers import AutoModelForCausalLM

    after_2 = AutoModelForCausalLM.from_pretrained(layout.checkpoint_model(STAGE, 2, "policy").path)
    final = weights(layout, "policy")
    assert all(torch.equal(p, final[k]) for k, p in after_2.state_dict().items() if k in final)
    assert sorted(set(read_rollouts(layout.rollouts(STAGE))["step"].to_pylist())) == [1, 2, 3]


def test_grpo_runs_without_a_critic(base, tmp_path):
    root = tmp_path / "runs"
    extra = ["ppo.advantage_estimator=grpo", "ppo.steps=2", "ppo.kl_coef=0.0"]
    stage(STAGE, "grpo", root, from_sft(base, extra))
    layout = RunLayout(Location(str(root)), "grpo")
    manifest = read_manifest(layout.manifest(STAGE))
    assert "value" not in manifest.outputs and "critic" not in manifest.inputs
    assert not layout.final(STAGE, "value").exists()
    rows = read_rollouts(layout.rollouts(STAGE)).to_pylist()
    assert len(rows) == 2 * ROWS
    assert all(r["values"] == [] == r["returns"] == r["ref_logprobs"] for r in rows)
    assert all(len(r["advantages"]) == r["response_len"] for r in rows)
    assert any(r["advantages"][0] != 0 for r in rows)  # some groups have mixed outcomes
    assert metric(layout, "ppo/value_loss") == [] and len(metric(layout, "ppo/policy_loss")) == 2


def test_policy_warmup_steps_train_only_the_critic(base, tmp_path):
    root = tmp_path / "runs"
    stage(STAGE, "warm", root, from_sft(base, ["ppo.steps=2", "ppo.policy_warmup_steps=2"]))
    layout = RunLayout(Location(str(root)), "warm")
    initial = load_file(os.path.join(base.final("sft", "policy").path, "model.safetensors"))
    policy, critic = weights(layout, "policy"), weights(layout, "value")
    assert all(torch.equal(initial[k], policy[k]) for k in initial)
    assert torch.count_nonzero(critic["score.weight"]) > 0
    assert metric(layout, "ppo/policy_loss") == [] and len(metric(layout, "ppo/value_loss")) == 2
    assert metric(layout, "ppo/grad_norm_policy") == [] and len(metric(layout, "ppo/grad_norm_critic")) == 2


def test_batch_layout_mismatch_fails_with_one_line(tmp_path):
    overrides = [
        "wandb.mode=disabled",
        "sft.enabled=false",
        "reward_model.enabled=false",
        "critic_warmup.enabled=false",
    ]
    overrides += ["model.critic_init=policy", "ppo.minibatches=3"]
    proc = rlpipe("stage", STAGE, "--run-id", "x", "--storage", str(tmp_path), *sets(overrides))
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: ppo: ppo.prompts_per_step 32 x samples_per_prompt 4 are 128 rows per rank, which "
        "ppo.minibatches 3 does not divide; values that work: 2 or 4"
    )
    assert not (tmp_path / "x").exists()  # refused before the run was written


def test_two_ranks_whiten_over_the_global_batch_and_write_one_part_each(base, tmp_path):
    """`--nproc 2` (ZeRO-2): each rank samples half the prompts and writes its own part per step; the
    advantages are whitened with moments over BOTH ranks, so only their union has mean 0 and std 1."""
    root = tmp_path / "runs"
    extra = [
        "ppo.steps=2",
        "ppo.save_every=2",
        "ppo.kl_coef=0.0",
        "ppo.policy_optim.micro_batch_size=8",
        "ppo.critic_optim.micro_batch_size=8",
    ]
    args = ["stage", STAGE, "--run-id", "two", "--storage", str(root), "--nproc", "2"]
    proc = rlpipe(*args, *sets(from_sft(base, extra)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = RunLayout(Location(str(root)), "two")
    for step in (1, 2):
        assert all(layout.rollout_part(STAGE, step, rank).exists() for rank in (0, 1))
        assert not layout.rollout_part(STAGE, step, 2).exists()
    table = read_rollouts(layout.rollouts(STAGE), steps=[1]).to_pylist()
    assert len(table) == ROWS
    advantages = torch.tensor([a for r in table for a in r["advantages"]], dtype=torch.float64)
    assert abs(advantages.mean().item()) < 1e-4 and abs(advantages.std(correction=1).item() - 1) < 1e-4
    by_rank = [
        torch.tensor([a for r in table[:16] for a in r["advantages"]], dtype=torch.float64),
        torch.tensor([a for r in table[16:] for a in r["advantages"]], dtype=torch.float64),
    ]
    assert max(abs(part.mean().item()) for part in by_rank) > 1e-3  # not whitened per rank
    assert {r["prompt_id"] for r in table[:16]}.isdisjoint({r["prompt_id"] for r in table[16:]})
    initial = load_file(os.path.join(base.final("sft", "policy").path, "model.safetensors"))
    policy = weights(layout, "policy")
    assert all(not torch.equal(initial[k], policy[k]) for k in initial)
    assert committed_steps(layout.checkpoints(STAGE)) == [2]


def test_shared_critic_with_kl_as_a_loss_trains_one_engine(base, tmp_path):
    """critic_mode=shared: one engine carries the policy and value losses; the KL is a loss term, so
    the rewards hold no KL (returns = the outcome with lam_critic = gamma = 1)."""
    root = tmp_path / "runs"
    extra = ["ppo.steps=2", "ppo.save_every=2", "model.critic_mode=shared", "ppo.kl_placement=loss"]
    stage(STAGE, "shared", root, from_sft(base, extra))
    layout = RunLayout(Location(str(root)), "shared")
    export = layout.final(STAGE, "value")
    assert (export / "value_head.safetensors").exists()
    head = load_file(os.path.join(export.path, "value_head.safetensors"))["weight"]
    assert torch.count_nonzero(head) > 0  # a zero head at the start; the value loss moved it
    rows = read_rollouts(layout.rollouts(STAGE)).to_pylist()
    for r in rows:  # no KL in the rewards: every return is the sequence's reward
        assert all(abs(g - r["reward"]) < 1e-6 for g in r["returns"])
        assert len(r["ref_logprobs"]) == r["response_len"]
    kl = metric(layout, "ppo/kl")
    assert len(kl) == 2 and all(math.isfinite(v) and v >= 0 for v in kl)
    assert len(metric(layout, "ppo/value_loss")) == 2
    checkpoints = committed_steps(layout.checkpoints(STAGE))
    assert checkpoints == [2]
    names = layout.checkpoint(STAGE, 2).list_names()
    assert any(n.startswith("policy") for n in names) and not any(n.startswith("critic") for n in names)


def test_critic_can_be_a_larger_model_than_the_policy(base, tmp_path):
    """A separate critic of another size (hidden 96 vs the policy's 64) trains with its own engine."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    policy_dir = base.final("sft", "policy").path
    config = Qwen2Config.from_pretrained(policy_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 96, 192, 3
    config.layer_types = ["full_attention"] * 3
    torch.manual_seed(0)
    critic_dir = tmp_path / "critic"
    AutoModelForCausalLM.from_config(config).save_pretrained(critic_dir)
    root = tmp_path / "runs"
    stage(STAGE, "big", root, from_sft(base, ["ppo.steps=1", f"ppo.critic_from={critic_dir}"]))
    layout = RunLayout(Location(str(root)), "big")
    critic = weights(layout, "value")
    assert critic["score.weight"].shape == (1, 96)
    assert read_manifest(layout.manifest(STAGE)).inputs["critic"].uri == str(critic_dir)


def test_value_diagnostics_from_stored_rollouts_match_the_logged_ones(base):
    """The report's offline path (one function over a run's rollouts) reproduces what the stage logged."""
    from stages.critic.diagnostics import scalar_metrics, value_diagnostics_from_rollouts

    logged = [
        r for r in read_metrics(base.metrics(STAGE)) if r.get("step") == STEPS and "ppo/value_loss" in r
    ]
    assert len(logged) == 1
    offline = scalar_metrics(
        value_diagnostics_from_rollouts(read_rollouts(base.rollouts(STAGE), steps=[STEPS])), "ppo/value"
    )
    assert len(offline) >= 10 and "ppo/value/explained_var" in offline
    assert any(k.startswith("ppo/value/value_correct_pos") for k in offline)
    for name, value in offline.items():
        assert logged[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_evaluate_stage_reports_initial_vs_final_with_ppo_curves_and_value_diagnostics(base):
    # arith = the task's held-out split, 4 samples: the same sampling as PPO's in-loop evaluation
    evaluate = [
        "evaluate.benchmarks=[arith]",
        "evaluate.limit=null",
        "evaluate.limits={}",
        "evaluate.samples=4",
    ]
    stage("evaluate", "base", base.root.uri, [*PPO, *evaluate])
    manifest = read_manifest(base.manifest("evaluate"))
    assert manifest.inputs["initial"].uri == str(base.final("sft", "policy"))
    assert manifest.inputs["final"].uri == str(base.final(STAGE, "policy"))
    report = json.loads(base.report("final", "json").read_text())
    assert list(report["checkpoints"]) == ["initial", "final"]
    plots = set(base.plots("final").list_names())
    assert {"accuracy.png", "response_length.png", "ppo_reward_accuracy.png"} <= plots
    assert {"value_by_position.png", "value_by_length_bin.png"} <= plots
    assert "arith: final vs. initial" in base.report("final", "md").read_text()
    # an independent code path, the same numbers as PPO's own held-out evaluation
    ppo_metrics = read_manifest(base.manifest(STAGE)).metrics
    for label, prefix in (("initial", "initial_"), ("final", "")):
        arith = report["checkpoints"][label]["benchmarks"]["arith"]
        assert arith["greedy"] == pytest.approx(ppo_metrics[f"{prefix}heldout_greedy"], abs=1e-9)
        assert arith["pass@1"] == pytest.approx(ppo_metrics[f"{prefix}heldout_sampled"], abs=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="vLLM needs a CUDA device and the vllm package",
)
def test_ppo_with_the_vllm_backend_trains_and_its_logprobs_match(base, tmp_path):
    root = tmp_path / "runs"
    vllm = ["generation.backend=vllm", "generation.gpu_memory_utilization=0.2", "generation.dtype=float32",
            "generation.colocate=true", "ppo.steps=2", "ppo.save_every=2"]  # fmt: skip
    stage(STAGE, "vllm", root, from_sft(base, vllm))
    layout = RunLayout(Location(str(root)), "vllm")
    assert all(v < 1e-2 for v in metric(layout, "ppo/logprob_gen_diff"))  # vLLM's logprobs == the trainer's
    initial = load_file(os.path.join(base.final("sft", "policy").path, "model.safetensors"))
    policy = weights(layout, "policy")
    assert any(not torch.equal(initial[k], policy[k]) for k in initial)
