"""One PPO step, steps 1-7 of `stages.ppo.recipe` after the prompts are picked (`run_step`, the same
code the stage and `rlpipe bench ppo-update` run): sample, score, old quantities, advantages
(`stages.ppo.batch`), the updates (`stages.ppo.update`), and the new weights pushed to the generator.

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from stages.config.models import OptimConfig
from stages.config.ppo import PPOConfig
from stages.config.sampling import RewardConfig, SamplingConfig
from stages.data.tasks import EncodedProblem
from stages.models.tokenizer import pad_token_id
from stages.ppo.batch import (
    Advantages,
    OldQuantities,
    RolloutBatch,
    compute_advantages,
    nonfinite_inputs,
    old_quantities,
    rollout_batch,
)
from stages.ppo.engines import Models
from stages.ppo.update import update
from stages.runtime import distributed
from stages.runtime.devices import model_device
from stages.runtime.numerics import NonFiniteError, at_step, describe
from stages.sampling.generation import sampling_seed
from stages.sampling.hf_sampler import HFGenerator
from stages.sampling.rollout_rows import ScoredSample, score_samples

STAGE = "ppo"
Tensor = torch.Tensor


class StepTimer:
    """Seconds spent per phase of PPO steps (the benchmark's breakdown). On a GPU each phase ends
    with a synchronize, so kernels are charged to the phase that launched them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


@dataclass(frozen=True)
class StepOutcome:
    """What a step produced: its rows, their old quantities and advantages, the update's stats."""

    rollout: RolloutBatch
    old: OldQuantities
    adv: Advantages
    scored: list[ScoredSample]
    stats: dict[str, float]


def run_step(
    models: Models,
    generator,
    prompts: list[EncodedProblem],
    group_ids_B: Tensor,
    tokenizer,
    *,
    ppo: PPOConfig,
    sampling: SamplingConfig,
    reward: RewardConfig,
    seed: int,
    step: int,
    rank: int,
    train_policy: bool,
    timer: StepTimer | None = None,
) -> StepOutcome:
    """Steps 1-7 for the given prompts (one entry per sample): sample, score, old quantities,
    advantages, the updates, and the new weights pushed to the generator."""
    timer = timer or StepTimer()
    temperature = sampling.temperature or 1.0  # greedy rollouts: logprobs at temperature 1
    with timer("generate"):
        samples = generator.generate(
            [p.prompt_ids for p in prompts], sampling, sampling_seed(seed, step, rank)
        )
        generator.sleep()  # colocated vLLM frees its GPU memory for the updates
    with timer("score"):
        scored = score_samples(samples, prompts, tokenizer, reward, rm=models.rm)
    with timer("old_forward"):  # old logprobs and values; reference logprobs only with KL
        rollout = rollout_batch(scored, pad_token_id(tokenizer), model_device(models.policy_engine))
        old = old_quantities(models, rollout, scored, temperature, ppo.policy_optim.micro_batch_size)
    with timer("advantages"):
        adv = compute_advantages(rollout, old, group_ids_B, ppo)
    with timer("train"), at_step(STAGE, step):
        bad = nonfinite_inputs(rollout, old, adv)
        if bad and ppo.on_nonfinite == "error":
            raise NonFiniteError(f"non-finite {describe(bad)}; the last committed checkpoint is kept")
        if bad:  # skip: this step leaves the weights as they were
            distributed.print0(f"{STAGE} step {step}: non-finite {describe(bad)}; step skipped (no update)")
            stats = {}
        else:
            stats = update(models, rollout, old, adv, ppo, temperature, train_policy, (seed, step))
        stats["skipped_nonfinite"] = float(bool(bad))
    with timer("push_weights"):
        started = time.perf_counter()
        generator.wake()
        push_weights(generator, models, ppo.policy_optim, version=step)
        stats["weight_sync_s"] = time.perf_counter() - started  # ppo/weight_sync_s: gather + push
    return StepOutcome(rollout, old, adv, scored, stats)


def push_weights(generator, models: Models, policy_optim: OptimConfig, version: int) -> None:
    """The policy's current weights to the generator (ZeRO-3: gathered from every rank's shards)."""
    if isinstance(generator, HFGenerator) or policy_optim.zero_stage != 3:
        generator.update_weights(models.policy, version=version)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(models.policy.parameters())):
        generator.update_weights(models.policy, version=version)
