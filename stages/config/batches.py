"""Batch sizes as users state them, laid out on any number of ranks.

Every training stage states its batch globally, independent of the number of ranks: rows (SFT
sequences, reward-model pairs, sampled responses) per optimizer step over all ranks; its engines'
`micro_batch_size` is only a memory knob, the most rows one device runs through the model at once.
The layout on N ranks is derived in one place (`batch_layout`):

    rows per rank        = global rows per optimizer step / N
    micro-batch          = min(micro_batch_size, rows per rank)
    gradient accumulation = rows per rank / micro-batch

so the same recipe runs unchanged on 1, 2 or 8 ranks, and the update it makes is the same (the
losses are normalised by global counts: `stages.models.minibatches`). Only when a division does
not come out whole is it an error: one line naming the keys, their values, the number of ranks
and the nearest settings that would work. `check_batch_layouts` checks every enabled stage of a
config before any stage starts (`rlpipe config --nproc N`, `rlpipe run`, the flows).
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.config.pipeline import PipelineConfig
from stages.config.section import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    """One engine's optimizer step on each rank: `grad_accum_steps` micro-batches of `micro_batch_size` rows."""

    rows_per_rank: int
    micro_batch_size: int
    grad_accum_steps: int


def batch_layout(
    stage: str,
    rows: int,
    ranks: int,
    micro_key: str,
    micro_batch_size: int,
    rows_are: str,
    rows_key: str = "",
) -> BatchLayout:
    """The layout of `rows` rows per optimizer step (over all ranks) on `ranks` ranks.

    `rows_are`: how the rows are set, for the error line (e.g. "sft.batch_size 32"); `rows_key`: the
    key that sets them directly, when one does (its nearest working values are suggested).
    """
    if rows % ranks:
        raise ConfigError(
            f"{stage}: {rows_are} does not split over {_ranks(ranks)}; nearest that work: "
            f"{rows_key} {_near_multiples(rows, ranks)}"
        )
    per_rank = rows // ranks
    micro = min(micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"{stage}: {rows_are} gives {per_rank} rows per rank per optimizer step on {_ranks(ranks)}, "
            f"which {micro_key} {micro_batch_size} does not divide; values that work: "
            f"{_near_divisors(per_rank, micro)}"
        )
    return BatchLayout(per_rank, micro, per_rank // micro)


def prompts_layout(stage: str, prompts: int, ranks: int, key: str) -> int:
    """Prompts per rank: the prompts of a step are sampled on every rank in equal shares."""
    if prompts % ranks:
        raise ConfigError(
            f"{stage}: {key} {prompts} does not split over {_ranks(ranks)}; nearest that work: "
            f"{_near_multiples(prompts, ranks)}"
        )
    return prompts // ranks


def minibatch_rows(stage: str, rows_per_rank: int, minibatches: int, key: str, rows_are: str) -> int:
    """Rows per rank of each of `minibatches` optimizer steps per epoch."""
    if rows_per_rank % minibatches:
        raise ConfigError(
            f"{stage}: {rows_are} are {rows_per_rank} rows per rank, which {key} {minibatches} does not divide; "
            f"values that work: {_near_divisors(rows_per_rank, minibatches)}"
        )
    return rows_per_rank // minibatches


def sampling_layouts(stage: str, section, optims: dict[str, object], ranks: int) -> dict[str, BatchLayout]:
    """The layouts of a stage that samples `prompts_per_step x samples_per_prompt` rows per step and
    trains on them in `minibatches` optimizer steps per epoch (critic warmup, PPO), per engine."""
    prompts = prompts_layout(stage, section.prompts_per_step, ranks, f"{stage}.prompts_per_step")
    rows_are = f"{stage}.prompts_per_step {section.prompts_per_step} x samples_per_prompt {section.samples_per_prompt}"
    per_rank = minibatch_rows(
        stage, prompts * section.samples_per_prompt, section.minibatches, f"{stage}.minibatches", rows_are
    )
    rows_are += f" / minibatches {section.minibatches}"
    return {
        name: batch_layout(
            stage,
            per_rank * ranks,
            ranks,
            f"{stage}.{name}.micro_batch_size",
            optim.micro_batch_size,
            rows_are,
        )
        for name, optim in optims.items()
    }


def stage_layouts(config: PipelineConfig, stage: str, ranks: int) -> dict[str, BatchLayout]:
    """The batch layout of every engine stage `stage` trains, on `ranks` ranks (ConfigError if none fits)."""
    if stage in ("sft", "reward_model"):
        section = getattr(config, stage)
        rows_are = f"{stage}.batch_size {section.batch_size}"
        micro_key = f"{stage}.optim.micro_batch_size"
        micro = section.optim.micro_batch_size
        return {
            "optim": batch_layout(
                stage, section.batch_size, ranks, micro_key, micro, rows_are, f"{stage}.batch_size"
            )
        }
    if stage == "critic_warmup":
        if config.critic_warmup.rollouts_from:
            return {}  # the rows come from another run: checked per step against what is read
        return sampling_layouts(stage, config.critic_warmup, {"optim": config.critic_warmup.optim}, ranks)
    if stage == "ppo":
        ppo = config.ppo
        optims = {"policy_optim": ppo.policy_optim}
        if ppo.advantage_estimator == "gae" and config.model.critic_mode == "separate":
            optims["critic_optim"] = ppo.critic_optim
        return sampling_layouts(stage, ppo, optims, ranks)
    return {}  # evaluate trains nothing


def check_batch_layouts(config: PipelineConfig, ranks: int, stages: list[str] | None = None) -> None:
    """ConfigError (one line) unless every enabled stage (or each of `stages`) lays out on `ranks` ranks."""
    names = stages if stages is not None else ["sft", "reward_model", "critic_warmup", "ppo"]
    for name in names:
        section = getattr(config, name, None)
        if section is not None and getattr(section, "enabled", True):
            stage_layouts(config, name, ranks)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _near_divisors(n: int, target: int) -> str:
    """The divisors of n nearest to `target` (below and above), e.g. `16 or 32`."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max((d for d in divisors if d <= target), default=None)
    above = min((d for d in divisors if d >= target), default=None)
    return " or ".join(str(d) for d in dict.fromkeys(x for x in (below, above) if x is not None))


def _near_multiples(n: int, step: int) -> str:
    """The multiples of `step` nearest to n (below and above), e.g. `28 or 32`."""
    below, above = n // step * step, -(-n // step) * step
    return " or ".join(str(x) for x in dict.fromkeys(x for x in (below, above) if x > 0))
