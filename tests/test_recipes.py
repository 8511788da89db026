"""Every recipe in configs/ validates as `rlpipe config` reads it, and its batches lay out on the
ranks it is written for: a recipe a user copies never fails on its first key or its first step."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import rlpipe

from stages.config.batches import check_batch_layouts
from stages.config.pipeline import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Ranks each recipe is meant for (its header says so); tiny also runs on 2 (tests/test_two_ranks.py).
RANKS = {
    "tiny.yaml": (1, 2),
    "qwen2.5-0.5b-instruct-gsm8k.yaml": (1, 2, 8),
    "qwen3-4b-base-math.yaml": (8, 16),
}


def test_every_recipe_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(RANKS)


@pytest.mark.parametrize("name", sorted(RANKS))
def test_recipe_validates_and_lays_out_its_batches(name):
    config = load_config(CONFIGS / name)
    for ranks in RANKS[name]:
        check_batch_layouts(config, ranks)


def test_qwen_gsm8k_recipe_reads_as_written():
    proc = rlpipe("config", "--recipe", str(CONFIGS / "qwen2.5-0.5b-instruct-gsm8k.yaml"))
    assert proc.returncode == 0, proc.stderr
    config = load_config(CONFIGS / "qwen2.5-0.5b-instruct-gsm8k.yaml")
    assert config.model.policy == "Qwen/Qwen2.5-0.5B-Instruct" and config.task.prompt_format == "chat"
    assert config.generation.backend == "vllm" and config.task.dataset == "gsm8k"
    assert not (config.sft.enabled or config.reward_model.enabled or config.critic_warmup.enabled)


def test_qwen3_math_recipe_is_the_value_model_setting():
    config = load_config(CONFIGS / "qwen3-4b-base-math.yaml")
    assert config.model.critic_mode == "separate" and config.critic_warmup.enabled
    assert config.ppo.lam_critic == 1.0 and config.ppo.length_adaptive_alpha == 0.05
    assert config.ppo.positive_lm_coef > 0 and config.ppo.policy_optim.zero_stage == 3
    assert config.task.answer_format == "boxed" and config.task.grader == "boxed"
    assert set(config.evaluate.benchmarks) == {"aime24", "aime25", "math500"}
