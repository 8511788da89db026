"""`rlpipe bench ppo-update` runs the ppo stage's step and TRL's PPOTrainer on one small workload
and reports consistent figures (speed is printed, never asserted)."""

from __future__ import annotations

import json
import subprocess

from cli_runs import RLPIPE


def test_bench_ppo_update_reports_both_implementations_and_the_phases():
    args = ["--prompts", "4", "--samples-per-prompt", "2", "--response-length", "8", "--epochs", "2",
            "--minibatches", "2", "--updates", "2", "--json"]  # fmt: skip
    proc = subprocess.run([RLPIPE, "bench", "ppo-update", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["settings"]["prompts"] == 4 and result["settings"]["samples_per_prompt"] == 2
    assert 0 < result["resp_tokens_per_update"] <= 4 * 2 * 8  # responses end at EOS or 8 tokens
    phases = result["phases_s_per_update"]
    assert set(phases) == {"generate", "score", "old_forward", "advantages", "train", "push_weights"}
    assert sum(phases.values()) <= result["sec_per_update"] * 1.0001  # phases partition the update
    assert result["train_flop_per_update"] > 0 and 0 < result["train_flop_fraction_of_peak"]
    assert result["update_flop_floor"] > 0  # the floor's time: its FLOPs at the measured peak
    floor_s = result["update_flop_floor"] / result["matmul_peak_flop_per_s"]
    assert abs(result["update_floor_s"] - floor_s) < 1e-12
    trl = result["trl"]
    assert trl["resp_tokens_per_update"] == 4 * 2 * 8  # TRL always decodes the whole length
    ratio = result["resp_tokens_per_s"] / trl["resp_tokens_per_s"]
    assert abs(result["speedup_vs_trl"] - ratio) < 1e-9
    ceiling = (
        trl["sec_per_update"] / floor_s * result["resp_tokens_per_update"] / trl["resp_tokens_per_update"]
    )
    assert abs(result["speedup_ceiling_vs_trl"] - ceiling) < 1e-9 * ceiling
    assert "speedup" in proc.stdout and "rlpipe" in proc.stdout


def test_bench_ppo_update_rejects_a_batch_that_does_not_split():
    proc = subprocess.run(
        [RLPIPE, "bench", "ppo-update", "--prompts", "3", "--minibatches", "2", "--no-baseline"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: prompts x samples_per_prompt (3)")


def test_bench_storage_and_generate_report_both_sides(tmp_path):
    storage = subprocess.run(
        [RLPIPE, "bench", "storage", "--storage", str(tmp_path / "root"), "--rows", "64", "--response-len", "16",
         "--checkpoint-mb", "2", "--json"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert storage.returncode == 0, storage.stderr[-2000:]
    result = json.loads(storage.stdout.strip().splitlines()[-1])
    assert result["rows"] == 64 and result["rollouts"]["file_mb"] > 0
    assert all(v > 0 for v in result["rollouts"].values()) and all(
        v > 0 for v in result["checkpoint"].values()
    )
    assert not any((tmp_path / "root").iterdir())  # the benchmark cleans up after itself
    generate = subprocess.run(
        [RLPIPE, "bench", "generate", "--prompts", "4", "--max-new-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr[-2000:]
    result = json.loads(generate.stdout.strip().splitlines()[-1])
    assert 0 < result["rlpipe_tokens"] <= 32 and 0 < result["hf_generate_tokens"] <= 32


def test_training_flops_count_every_matrix_product_by_hand():
    from types import SimpleNamespace

    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from stages.benchmarks.ppo_update import PPOBench, training_flops, update_flops_floor

    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, num_labels=1)  # fmt: skip
    policy, critic = Qwen2ForCausalLM(config), Qwen2ForSequenceClassification(config)
    models = SimpleNamespace(
        policy=policy, critic=SimpleNamespace(module=critic), shared=False, reference=policy
    )
    # per layer: q 256x256, k and v 256x128 (2 KV heads of 64), o 256x256, gate/up/down 256x768
    layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 768
    assert layer == 786_432
    trunk, score, head = 4 * layer, 256, 256 * 1024  # the critic's score head; the policy's tied LM head
    expected = 6 * ((trunk + trunk + score) * 100 + head * 40) * 3
    assert training_flops(models, PPOBench(epochs=3), 100, 40) == expected
    # the floor adds generation (prefill + decode), the reference's and the critic's rollout forwards
    generate = 2 * (trunk * 100 + head * 40)
    assert (
        update_flops_floor(models, PPOBench(epochs=3), 100, 40)
        == expected + 2 * generate + 2 * (trunk + score) * 100
    )
    shared = SimpleNamespace(
        policy=policy, critic=SimpleNamespace(module=policy), shared=True, reference=None
    )
    assert training_flops(shared, PPOBench(epochs=3), 100, 40) == 6 * (trunk * 100 + head * 40) * 3
    assert (
        update_flops_floor(shared, PPOBench(epochs=3), 100, 40)
        == 6 * (trunk * 100 + head * 40) * 3 + generate
    )
