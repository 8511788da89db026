"""Rollout rows: generated samples -> scored samples -> schema-v1 columns, and back.

Shared by the stages that sample from a policy (critic warmup, PPO):

    scored = score_samples(samples, problems, tokenizer, config.reward, rm=rm)     # one per sample
    columns = rollout_columns(scored, run_id=..., stage=..., step=..., values_BT=..., returns_BT=...)
    write_rollouts(layout.rollout_part(stage, step, rank), columns)
    ...
    scored = batch_from_rollouts(read_rollouts(layout.rollouts(stage), steps=[step]))   # the reverse

Shape suffixes: B samples (rows), T response tokens (right-padded), L prompt + response.

Scoring (`score_samples`), for each response:
- `is_correct`: the verifier's verdict (`stages.data.grading.grade` on the decoded response); a response
  cut at `max_new_tokens` (finish_reason "length") is never correct, whatever its text says.
- `score`: the verifier score, 1.0 / 0.0 (0.0 when `reward.verifier` is off), before any penalty.
- `rm_score`: the reward model's score of prompt + response (the response as generated, EOS
  included when it stopped), or None without a reward model.
- `reward`: the total scalar, `combined_score(apply_missing_eos_penalty(score), rm_score, rm_coef)`.
  It is the outcome reward placed on the last response token (`outcome_rewards_to_tokens`).

Per-token columns (`logprobs`, `ref_logprobs`, `values`, `advantages`, `returns`) hold exactly
`response_len` floats, token t of the list belonging to response token t (the value/logprob of
token t read at position prompt_len + t - 1, see `stages.models.forward`), or are empty where the
quantity does not exist in the producing stage (no reference model in critic warmup, no critic in GRPO).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch

from stages.config.sampling import RewardConfig
from stages.data.grading import grade
from stages.data.tasks import EncodedProblem
from stages.models.forward import build_token_batch
from stages.models.tokenizer import pad_token_id
from stages.models.value_head import reward_model_scores
from stages.sampling.generation import GeneratedSample
from stages.sampling.rewards import apply_missing_eos_penalty, combined_score
from storage.rollouts import ROLLOUT_SCHEMA

Tensor = torch.Tensor


@dataclass(frozen=True)
class ScoredSample:
    """One sampled response with its prompt and its scores: one rollout row without the per-token
    training quantities (values, advantages, returns, reference logprobs)."""

    prompt_id: str
    sample_idx: int  # k-th response to this prompt in its batch
    dataset: str
    prompt: str
    ground_truth: str
    response: str  # decoded, special tokens skipped
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # the sampler's, one per response token
    finish_reason: str
    policy_version: int
    score: float
    rm_score: float | None
    reward: float
    is_correct: bool


def score_samples(
    samples: Sequence[GeneratedSample],
    problems: Sequence[EncodedProblem],
    tokenizer,
    reward: RewardConfig,
    *,
    rm: torch.nn.Module | None = None,
    sample_idx: Sequence[int] | None = None,
    rm_micro_batch_size: int | None = None,
) -> list[ScoredSample]:
    """Grade, penalise and (optionally) RM-score each sample; `problems[b]` is the prompt of `samples[b]`.

    `rm` is required when `reward.rm_coef > 0` and ignored otherwise. `sample_idx` defaults to the
    occurrence index of each prompt id within the batch (0, 1, ... for the samples of one prompt).
    See the module docstring for what each score means.
    """
    if len(samples) != len(problems):
        raise ValueError(f"{len(samples)} samples but {len(problems)} problems")
    if reward.rm_coef > 0 and rm is None:
        raise ValueError("reward.rm_coef > 0 needs a reward model (rm=...)")
    if sample_idx is None:
        seen: Counter[str] = Counter()
        sample_idx = []
        for problem in problems:
            sample_idx.append(seen[problem.problem.id])
            seen[problem.problem.id] += 1
    rm_scores: list[float | None] = [None] * len(samples)
    if reward.rm_coef > 0 and samples:
        pad_id = pad_token_id(tokenizer)
        rm_scores = score_with_reward_model(
            rm,
            [s.prompt_ids for s in samples],
            [s.response_ids for s in samples],
            pad_id,
            rm_micro_batch_size,
        )

    scored = []
    for sample, encoded, idx, rm_score in zip(samples, problems, sample_idx, rm_scores, strict=True):
        problem = encoded.problem
        response = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        is_correct = sample.finish_reason != "length" and grade(problem.dataset, response, problem.answer)
        score = float(is_correct) if reward.verifier else 0.0
        total = combined_score(
            apply_missing_eos_penalty(score, sample.finish_reason, reward.missing_eos_penalty),
            rm_score,
            reward.rm_coef,
        )
        scored.append(
            ScoredSample(
                prompt_id=problem.id,
                sample_idx=int(idx),
                dataset=problem.dataset,
                prompt=encoded.prompt,
                ground_truth=problem.answer,
                response=response,
                prompt_ids=list(sample.prompt_ids),
                response_ids=list(sample.response_ids),
                logprobs=list(sample.logprobs),
                finish_reason=sample.finish_reason,
                policy_version=sample.policy_version,
                score=score,
                rm_score=rm_score,
                reward=float(total),
                is_correct=bool(is_correct),
            )
        )
    return scored


@torch.no_grad()
def score_with_reward_model(
    rm: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    pad_id: int,
    micro_batch_size: int | None = None,
) -> list[float]:
    """The RM's score of each prompt + response (its value at the last token; `reward_model_scores`)."""
    size = micro_batch_size or max(len(prompt_ids), 1)
    device = next(getattr(rm, "module", rm).parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompt_ids), size):
        batch = build_token_batch(
            list(prompt_ids[start : start + size]), list(response_ids[start : start + size]), pad_id
        ).to(device)
        scores.extend(reward_model_scores(rm, batch.input_ids_BL, batch.attention_mask_BL).tolist())
    return scores


def _per_token(name: str, x_BT: Tensor | None, lengths: list[int]) -> list[list[float]]:
    """Row b of x_BT trimmed to lengths[b] (empty lists when x_BT is None)."""
    if x_BT is None:
        return [[] for _ in lengths]
    if x_BT.dim() != 2 or x_BT.shape[0] != len(lengths) or (lengths and x_BT.shape[1] < max(lengths)):
        raise ValueError(
            f"{name}: expected shape [{len(lengths)}, >= {max(lengths, default=0)}], got {tuple(x_BT.shape)}"
        )
    rows = x_BT.detach().float().cpu().tolist()
    return [row[:n] for row, n in zip(rows, lengths, strict=True)]


def rollout_columns(
    scored: Sequence[ScoredSample],
    *,
    run_id: str,
    stage: str,
    step: int,
    values_BT: Tensor | None = None,
    advantages_BT: Tensor | None = None,
    returns_BT: Tensor | None = None,
    ref_logprobs_BT: Tensor | None = None,
    logprobs_BT: Tensor | None = None,
) -> dict[str, list]:
    """Every schema-v1 column (`storage.rollouts.ROLLOUT_SCHEMA`) for `write_rollouts`, one row per sample.

    The [B, T] tensors are right-padded over the responses of `scored` in order and trimmed to
    each response's length; None gives empty lists (the quantity does not exist in this stage).
    `logprobs_BT` replaces the sampler's logprobs (e.g. recomputed by the training forward).
    """
    lengths = [len(s.response_ids) for s in scored]
    if logprobs_BT is None:
        logprobs = [list(s.logprobs) for s in scored]
    else:
        logprobs = _per_token("logprobs_BT", logprobs_BT, lengths)
    columns: dict[str, list] = {
        "run_id": [run_id] * len(scored),
        "stage": [stage] * len(scored),
        "step": [step] * len(scored),
        "policy_version": [s.policy_version for s in scored],
        "prompt_id": [s.prompt_id for s in scored],
        "sample_idx": [s.sample_idx for s in scored],
        "dataset": [s.dataset for s in scored],
        "prompt": [s.prompt for s in scored],
        "response": [s.response for s in scored],
        "ground_truth": [s.ground_truth for s in scored],
        "prompt_ids": [list(s.prompt_ids) for s in scored],
        "response_ids": [list(s.response_ids) for s in scored],
        "logprobs": logprobs,
        "ref_logprobs": _per_token("ref_logprobs_BT", ref_logprobs_BT, lengths),
        "values": _per_token("values_BT", values_BT, lengths),
        "advantages": _per_token("advantages_BT", advantages_BT, lengths),
        "returns": _per_token("returns_BT", returns_BT, lengths),
        "score": [s.score for s in scored],
        "rm_score": [s.rm_score for s in scored],
        "reward": [s.reward for s in scored],
        "is_correct": [s.is_correct for s in scored],
        "finish_reason": [s.finish_reason for s in scored],
        "response_len": lengths,
    }
    if any(len(lp) != n for lp, n in zip(columns["logprobs"], lengths, strict=True)):
        raise ValueError("logprobs: a sample has a different number of logprobs than response tokens")
    assert list(columns) == ROLLOUT_SCHEMA.names  # every column, in the schema's order
    return columns


def batch_from_rollouts(table: pa.Table) -> list[ScoredSample]:
    """The reverse of `rollout_columns`: rows of a rollout table (`read_rollouts`) as scored samples.

    Per-token training quantities (values, advantages, returns, reference logprobs) are not
    carried: a consumer recomputes them (e.g. critic warmup `rollouts_from`: returns from `reward`).
    """
    rows = table.select(
        [
            "prompt_id",
            "sample_idx",
            "dataset",
            "prompt",
            "ground_truth",
            "response",
            "prompt_ids",
            "response_ids",
            "logprobs",
            "finish_reason",
            "policy_version",
            "score",
            "rm_score",
            "reward",
            "is_correct",
        ]
    ).to_pylist()
    return [ScoredSample(**row) for row in rows]


def training_batch(scored: Sequence[ScoredSample]) -> tuple[list[list[int]], list[list[int]], Tensor]:
    """(prompt_ids, response_ids, rewards_B float32): what a trainer feeds `build_token_batch` and
    `outcome_rewards_to_tokens`."""
    rewards_B = torch.tensor([s.reward for s in scored], dtype=torch.float32)
    return [list(s.prompt_ids) for s in scored], [list(s.response_ids) for s in scored], rewards_B
