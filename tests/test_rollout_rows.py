"""Rollout rows (stages/sampling/rollout_rows.py): scoring of generated samples, schema-v1 columns, and back."""

from __future__ import annotations

import pytest
import torch

from stages.config.sampling import RewardConfig
from stages.data.records import Problem
from stages.data.tasks import EncodedProblem
from stages.models.value_head import reward_model_scores
from stages.sampling.generation import GeneratedSample
from stages.sampling.rollout_rows import (
    ScoredSample,
    batch_from_rollouts,
    rollout_columns,
    score_samples,
    score_with_reward_model,
    training_batch,
)
from storage.layout import RunLayout
from storage.location import Location
from storage.rollouts import ROLLOUT_SCHEMA, read_rollouts, write_rollouts

PAD, EOS = 0, 1


class CharTokenizer:
    """Token id = code point (ASCII, < 128); 0 = pad, 1 = EOS (special: skipped when decoding)."""

    pad_token_id, eos_token_id = PAD, EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


TOK = CharTokenizer()


def problem(pid: str, answer: str) -> EncodedProblem:
    p = Problem(id=pid, dataset="arith", question=f"q{pid}", answer=answer)
    prompt = f"Q{pid}:"
    return EncodedProblem(p, prompt, TOK.encode(prompt), [])


def sample(prompt: EncodedProblem, text: str, stop: bool) -> GeneratedSample:
    ids = TOK.encode(text) + ([EOS] if stop else [])
    logprobs = [-(i + 1) / 8 for i in range(len(ids))]  # exact in float32
    return GeneratedSample(prompt.prompt_ids, ids, logprobs, "stop" if stop else "length", policy_version=3)


P1, P2 = problem("1", "12"), problem("2", "7")
# prompt 1: right and stopped / right but cut at the token limit / wrong; prompt 2: right
SAMPLES = [
    sample(P1, "#### 12", True),
    sample(P1, "#### 12", False),
    sample(P1, "#### 13", True),
    sample(P2, "so 7", True),
]
PROBLEMS = [P1, P1, P1, P2]


def test_score_samples_grades_penalises_truncation_and_numbers_samples_per_prompt():
    reward = RewardConfig(verifier=True, rm_coef=0.0, missing_eos_penalty=0.5)
    scored = score_samples(SAMPLES, PROBLEMS, TOK, reward)
    assert [s.is_correct for s in scored] == [True, False, False, True]  # cut at the limit: never correct
    assert [s.score for s in scored] == [1.0, 0.0, 0.0, 1.0]
    assert [s.reward for s in scored] == [1.0, -0.5, 0.0, 1.0]  # penalty only on the truncated one
    assert [s.rm_score for s in scored] == [None] * 4
    assert [s.sample_idx for s in scored] == [0, 1, 2, 0]  # occurrence index within each prompt
    assert scored[0].response == "#### 12" and scored[0].response_ids[-1] == EOS  # EOS kept in ids only
    assert scored[0].prompt == "Q1:" and scored[0].ground_truth == "12" and scored[0].dataset == "arith"
    assert scored[1].finish_reason == "length" and scored[0].policy_version == 3
    # verifier off: the score is 0 and the reward is the penalty alone
    off = score_samples(SAMPLES, PROBLEMS, TOK, RewardConfig(verifier=False, missing_eos_penalty=0.5))
    assert [s.score for s in off] == [0.0] * 4 and [s.reward for s in off] == [0.0, -0.5, 0.0, 0.0]
    assert [s.is_correct for s in off] == [True, False, False, True]  # still graded, for metrics
    explicit = score_samples(SAMPLES, PROBLEMS, TOK, reward, sample_idx=[5, 6, 7, 8])
    assert [s.sample_idx for s in explicit] == [5, 6, 7, 8]


def test_score_samples_needs_matching_problems_and_an_rm_when_rm_coef_is_set():
    with pytest.raises(ValueError, match="4 samples but 3 problems"):
        score_samples(SAMPLES, PROBLEMS[:3], TOK, RewardConfig())
    with pytest.raises(ValueError, match="needs a reward model"):
        score_samples(SAMPLES, PROBLEMS, TOK, RewardConfig(rm_coef=1.0))


def tiny_reward_model():
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=1,
    )
    torch.manual_seed(0)
    return Qwen2ForSequenceClassification(config).float().eval()


def test_rm_score_is_the_rm_on_prompt_plus_response_and_adds_to_the_reward_with_its_coefficient():
    rm = tiny_reward_model()
    reward = RewardConfig(verifier=True, rm_coef=0.25, missing_eos_penalty=0.5)
    scored = score_samples(SAMPLES, PROBLEMS, TOK, reward, rm=rm, rm_micro_batch_size=3)
    for s, gen in zip(scored, SAMPLES, strict=True):
        ids = torch.tensor([gen.prompt_ids + gen.response_ids])  # each sequence alone, no padding
        with torch.no_grad():
            alone = reward_model_scores(rm, ids, torch.ones_like(ids)).item()
        assert s.rm_score == pytest.approx(alone, abs=1e-5)
    expected = [1.0, -0.5, 0.0, 1.0]
    for s, base in zip(scored, expected, strict=True):
        assert s.reward == pytest.approx(base + 0.25 * s.rm_score, abs=1e-6)
    # micro-batching does not change the scores beyond float rounding
    one_batch = score_with_reward_model(
        rm, [g.prompt_ids for g in SAMPLES], [g.response_ids for g in SAMPLES], PAD
    )
    assert one_batch == pytest.approx([s.rm_score for s in scored], abs=1e-5)


def test_rollout_columns_fill_every_schema_column_trimmed_to_each_response():
    scored = score_samples(SAMPLES, PROBLEMS, TOK, RewardConfig(missing_eos_penalty=0.5))
    lengths = [len(s.response_ids) for s in scored]  # 8, 7, 8, 5
    T = max(lengths) + 2  # padded wider than needed: the extra columns must not leak into rows
    values_BT = torch.arange(4 * T, dtype=torch.float32).reshape(4, T) / 8
    returns_BT = values_BT + 1
    columns = rollout_columns(
        scored,
        run_id="r",
        stage="critic_warmup",
        step=7,
        values_BT=values_BT,
        advantages_BT=returns_BT - values_BT,
        returns_BT=returns_BT,
    )
    assert list(columns) == ROLLOUT_SCHEMA.names
    assert columns["response_len"] == lengths == [8, 7, 8, 5]
    for b, n in enumerate(lengths):
        assert columns["values"][b] == values_BT[b, :n].tolist()
        assert columns["returns"][b] == returns_BT[b, :n].tolist()
        assert columns["advantages"][b] == [1.0] * n
        assert columns["logprobs"][b] == SAMPLES[b].logprobs
    assert columns["ref_logprobs"] == [[], [], [], []]  # no reference model here: empty, not null
    assert columns["step"] == [7] * 4 and columns["stage"] == ["critic_warmup"] * 4
    assert columns["rm_score"] == [None] * 4 and columns["reward"] == [1.0, -0.5, 0.0, 1.0]
    # logprobs recomputed by a trainer replace the sampler's
    relogged = rollout_columns(scored, run_id="r", stage="ppo", step=1, logprobs_BT=values_BT)
    assert relogged["logprobs"][3] == values_BT[3, :5].tolist() and relogged["values"][0] == []


def test_rollout_columns_reject_tensors_that_do_not_cover_the_responses():
    scored = score_samples(SAMPLES, PROBLEMS, TOK, RewardConfig())
    with pytest.raises(ValueError, match="values_BT"):
        rollout_columns(scored, run_id="r", stage="s", step=1, values_BT=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="returns_BT"):
        rollout_columns(scored, run_id="r", stage="s", step=1, returns_BT=torch.zeros(3, 8))


def test_rows_round_trip_through_parquet_and_back_to_a_training_batch(tmp_path):
    rm = tiny_reward_model()
    scored = score_samples(SAMPLES, PROBLEMS, TOK, RewardConfig(rm_coef=0.5), rm=rm)
    layout = RunLayout(Location(str(tmp_path)), "run")
    for step in (1, 2):
        columns = rollout_columns(scored, run_id="run", stage="critic_warmup", step=step)
        write_rollouts(layout.rollout_part("critic_warmup", step, 0), columns)
    table = read_rollouts(layout.rollouts("critic_warmup"), steps=[2])
    back = batch_from_rollouts(table)
    assert len(back) == 4 and all(isinstance(s, ScoredSample) for s in back)
    for original, restored in zip(scored, back, strict=True):
        # float32 storage: compare floats at float32 precision, everything else exactly
        assert restored.rm_score == pytest.approx(original.rm_score, rel=1e-6)
        assert restored.reward == pytest.approx(original.reward, rel=1e-6)
        exact = {k: v for k, v in vars(original).items() if k not in ("rm_score", "reward")}
        assert {k: getattr(restored, k) for k in exact} == exact
    prompt_ids, response_ids, rewards_B = training_batch(back)
    assert prompt_ids == [s.prompt_ids for s in SAMPLES] and response_ids == [s.response_ids for s in SAMPLES]
    assert rewards_B.dtype == torch.float32 and rewards_B.tolist() == pytest.approx(
        [s.reward for s in scored]
    )
