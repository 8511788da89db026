"""Critic warmup: the frozen policy samples, the critic regresses onto returns -> `final/value`.

Value pretraining before PPO (VAPO, arXiv 2504.05118, section 3.1: without it the first PPO
updates follow a critic that knows nothing). Each step:

    1. sample `samples_per_prompt` responses to `prompts_per_step` training prompts with the
       FROZEN policy (or read that step's rows from `rollouts_from`);
    2. score them (verifier and/or reward model, `config.reward`);
    3. outcome reward on the last response token; old values from the critic (no grad);
       returns = GAE(gamma, lam_critic)[1] (lam_critic = 1: Monte-Carlo returns);
    4. `epochs` passes of value-loss updates over the step's rows, in mini-batches of
       `minibatches` optimizer steps per epoch (the layout on the ranks: `stages.config.batches`; the
       update is PPO's own, `stages.critic.update`, without value clipping);
    5. metrics; 6. the step's rollouts (schema v1) and, every save_every, a checkpoint.

The policy never trains here: it is loaded frozen (eval mode, no gradients) and is not wrapped in
a DeepSpeed engine. Only what trains gets an engine:
- critic_mode=separate: the whole value model (own backbone + score head);
- critic_mode=shared: ONLY the value head. The backbone IS the policy's, and PPO starts from the
  policy this stage was given, so training the backbone here would silently change the policy;
  the warmup therefore fits the head on the frozen policy features (a linear probe), and the
  backbone starts adapting in PPO, together with the policy loss.

Step numbering (metrics, checkpoints, rollouts): step k is the k-th step done (1-based), so after
resuming from checkpoint k the rollouts of steps > k are deleted and sampled again: every step
is stored exactly once. Sampling is seeded by (seed, step, rank), so a resumed run draws the
same responses as an uninterrupted one.

    python -m stages.critic_warmup --config FILE [--force]      (or: rlpipe stage critic_warmup --run-id ID)
"""

from __future__ import annotations

import sys

import torch

from stages.algorithms import compute_gae, outcome_rewards_to_tokens
from stages.config.batches import BatchLayout, batch_layout, minibatch_rows, stage_layouts
from stages.config.pipeline import PipelineConfig
from stages.config.sampling import sampling_plan
from stages.config.training import CriticWarmupConfig
from stages.critic.diagnostics import global_explained_variance
from stages.critic.update import ValueTargets, critic_update_step
from stages.critic.value_model import build_critic
from stages.data.prompt_rendering import stop_token_ids
from stages.data.tasks import batch_indices, check_fits, encode_problems, shard, task_problems
from stages.lifecycle.contract import StageError, StagePlan, make_plan
from stages.lifecycle.entry import stage_main
from stages.lifecycle.inputs import critic_init_uri, policy_uri, scoring_reward_model_uri
from stages.lifecycle.training_run import claim_stage, resume_training
from stages.models.engine import build_engine
from stages.models.forward import TokenBatch, TokenRows, response_values
from stages.models.loading import load_options, load_reference, load_reward_model
from stages.models.minibatches import global_counts, shuffled_minibatches
from stages.models.sources import resolve_model_dir
from stages.models.tokenizer import load_tokenizer, pad_token_id
from stages.runtime import distributed
from stages.runtime.devices import model_device
from stages.runtime.numerics import at_step
from stages.sampling.backends import make_generator
from stages.sampling.generation import sampling_seed
from stages.sampling.rollout_rows import (
    ScoredSample,
    batch_from_rollouts,
    rollout_columns,
    score_samples,
    training_batch,
)
from storage.location import Location
from storage.rollouts import delete_rollouts_after, read_rollouts, write_rollouts

STAGE = "critic_warmup"
Tensor = torch.Tensor


def plan(config: PipelineConfig) -> StagePlan:
    """What the result depends on: this section, task, model, sampling, reward, seed; and its inputs."""
    semantic = {"critic_warmup": config.critic_warmup, "task": config.task, "model": config.model}
    semantic |= {"generation": sampling_plan(config.generation), "reward": config.reward, "seed": config.seed}
    return make_plan(config, semantic, _input_uris(config))


def run(config: PipelineConfig, force: bool = False) -> None:
    """The critic-warmup recipe, top to bottom."""
    cw = config.critic_warmup
    shared = config.model.critic_mode == "shared"

    # 1. Skip if complete for this config and these inputs; otherwise claim the stage.
    inputs = _input_uris(config)
    ctx = claim_stage(STAGE, config, plan(config), force)
    if ctx is None:
        return
    layout, rank, world = ctx.layout, ctx.rank, ctx.world_size
    source = Location(cw.rollouts_from, ctx.endpoint_url) if cw.rollouts_from else None
    batches = _batch_layout(cw, world, source) if source else stage_layouts(config, STAGE, world)["optim"]

    # 2. Models: the frozen policy (sampler; backbone of a shared critic), the critic, the RM.
    def model_dir(name: str) -> str:
        return resolve_model_dir(inputs[name], config.tiny_model, ctx.endpoint_url)

    policy_dir = model_dir("policy")
    tokenizer = load_tokenizer(policy_dir, config.model.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    options = load_options(config.model)
    samples_hf = not cw.rollouts_from and config.generation.backend == "hf"
    policy = load_reference(policy_dir, **options) if shared or samples_hf else None
    torch.manual_seed(config.seed)
    critic = build_critic(config.model, model_dir("critic_init"), policy, policy_dir)
    # A shared critic trains its head only: the backbone is the policy PPO starts from.
    engine = build_engine(critic.value_head.requires_grad_(True) if shared else critic, cw.optim, batches)
    on = model_device(critic)
    rm = load_reward_model(model_dir("reward_model"), **options) if "reward_model" in inputs else None
    generator = None
    if not cw.rollouts_from:  # hf samples from the frozen policy module; vllm loads the policy's files
        generator = make_generator(
            config.generation, policy_dir if config.generation.backend == "vllm" else policy,
            eos_token_id=stop_token_ids(tokenizer, config.task.prompt_format), pad_token_id=pad_id, seed=config.seed, model=config.model,
        )  # fmt: skip

    # 3. Data: training prompts (the same split as every stage), or the source run's rollouts.
    train = encode_problems(task_problems(config.task, "train"), tokenizer, config.task.prompt_format)
    if not cw.rollouts_from:
        check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train")

    # 4. Resume from the newest committed checkpoint; later rollouts are replaced, never duplicated.
    training = resume_training(ctx, {"critic": engine}, cw.steps)
    if ctx.is_main:
        delete_rollouts_after(layout.rollouts(STAGE), training.start)
    distributed.barrier()

    # 5. Train.
    metrics: dict[str, float] = {}
    for step in training.steps(cw.steps):
        done = step + 1
        # step 5.1 rollouts: sample with the frozen policy, or read this step's rows
        if source is None:
            picked = batch_indices(len(train), cw.prompts_per_step, step, config.seed)
            prompts = [train[i] for i in shard(picked, rank, world) for _ in range(cw.samples_per_prompt)]
            samples = generator.generate(
                [p.prompt_ids for p in prompts], config.generation, sampling_seed(config.seed, done, rank)
            )
            # step 5.2 score: verifier and/or reward model
            scored = score_samples(
                samples,
                prompts,
                tokenizer,
                config.reward,
                rm=rm,
                rm_micro_batch_size=cw.optim.micro_batch_size,
            )
        else:
            scored = _source_rows(source, done, rank, world)
        if len(scored) != batches.rows_per_rank * cw.minibatches:
            raise StageError(
                f"{STAGE}: step {done} has {len(scored)} rows on rank {rank}, the stage's layout expects "
                f"{batches.rows_per_rank * cw.minibatches} (every step of rollouts_from must have as many rows)"
            )

        # step 5.3 outcome reward on the last token; old values; returns = GAE(lam_critic) targets
        prompt_ids, response_ids, rewards_B = training_batch(scored)
        rows = TokenRows(prompt_ids, response_ids, pad_id)
        batch = rows.batch().to(on)  # the step's tensors live on the critic's device
        rewards_B, mask_BT = rewards_B.to(on), batch.response_mask_BT
        with torch.no_grad():
            old_values_BT = response_values(critic, batch, cw.optim.micro_batch_size)
        rewards_BT = outcome_rewards_to_tokens(rewards_B, mask_BT)
        advantages_BT, returns_BT = compute_gae(rewards_BT, old_values_BT, mask_BT, cw.gamma, cw.lam_critic)

        # step 5.4 critic updates
        with at_step(STAGE, done):
            update = _update_critic(
                engine,
                critic,
                rows,
                ValueTargets(old_values_BT, returns_BT, mask_BT),
                cw,
                batches,
                (config.seed, done),
            )

        # step 5.5 metrics, reduced over ranks
        if done % cw.log_every == 0 or done == cw.steps:
            with torch.no_grad():
                new_values_BT = response_values(critic, batch, cw.optim.micro_batch_size)
            metrics = _step_metrics(scored, batch, old_values_BT, new_values_BT, returns_BT) | update
            metrics["critic_warmup/generated"] = float(
                distributed.all_reduce(torch.tensor(0.0 if source is not None else float(len(scored))))
            )
            metrics["critic_warmup/lr"] = engine.get_lr()[0]
            training.tracker.log(done, metrics)

        # step 5.6 this step's rollouts (one part per rank), then the checkpoint
        columns = rollout_columns(
            scored, run_id=config.run_id, stage=STAGE, step=done, values_BT=old_values_BT,
            advantages_BT=advantages_BT, returns_BT=returns_BT,
        )  # fmt: skip
        write_rollouts(layout.rollout_part(STAGE, done, rank), columns)
        if done % cw.save_every == 0 or done == cw.steps:
            training.save(done, {"data_cursor": done * cw.prompts_per_step}, cw.keep_last)
    if not metrics:  # resumed at the last step: the run was complete but for its export
        metrics = _last_logged(layout)

    # 6. Export the critic in HF format (shared: the policy's files + value_head.safetensors), then
    #    the manifest (last).
    final = training.export_model("value", critic.save_pretrained, tokenizer)
    summary = {
        "explained_var": metrics.get("critic_warmup/explained_var"),
        "explained_var_post_update": metrics.get("critic_warmup/explained_var_post_update"),
        "value_loss": metrics.get("critic_warmup/value_loss"),
        "accuracy": metrics.get("critic_warmup/accuracy"),
    }
    training.finish(outputs={"value": str(final), "rollouts": str(layout.rollouts(STAGE))}, metrics=summary)
    distributed.print0(
        f"{STAGE}: done; explained variance {summary['explained_var']}, value loss "
        f"{summary['value_loss']}; critic at {final}"
    )


def _input_uris(config: PipelineConfig) -> dict[str, str]:
    """The stage's inputs by name: policy (tokenizer, sampler), critic init, RM (rm_coef > 0), rollouts."""
    cw = config.critic_warmup
    try:
        inputs = {"policy": policy_uri(config, cw.policy_from), "critic_init": critic_init_uri(config)}
        rm = None if cw.rollouts_from else scoring_reward_model_uri(config)
    except ValueError as err:  # e.g. critic_init=reward_model with the reward_model stage disabled
        raise StageError(f"{STAGE}: {err}") from None
    if rm is not None:
        inputs["reward_model"] = rm
    if cw.rollouts_from:
        inputs["rollouts"] = cw.rollouts_from
    return inputs


def _batch_layout(cw: CriticWarmupConfig, world: int, source: Location) -> BatchLayout:
    """The layout of `rollouts_from`'s steps (the rows of its first step; every step must match)."""
    rows = read_rollouts(source, steps=[1]).num_rows
    if not rows:
        raise StageError(f"{STAGE}: rollouts_from {source.uri} has no rows for step 1")
    rows_are = f"critic_warmup.rollouts_from's {rows} rows per step"
    if rows % world:
        raise StageError(f"{STAGE}: {rows_are} do not split over {world} ranks")
    per_rank = minibatch_rows(STAGE, rows // world, cw.minibatches, "critic_warmup.minibatches", rows_are)
    micro_key = "critic_warmup.optim.micro_batch_size"
    return batch_layout(STAGE, per_rank * world, world, micro_key, cw.optim.micro_batch_size, rows_are)


def _source_rows(source: Location, step: int, rank: int, world: int) -> list[ScoredSample]:
    """This rank's share of step `step` of the source rollouts (rows read in part order)."""
    rows = batch_from_rollouts(read_rollouts(source, steps=[step]))
    if not rows:
        raise StageError(f"{STAGE}: rollouts_from {source.uri} has no rows for step {step}")
    if len(rows) % world:
        raise StageError(
            f"{STAGE}: step {step} of {source.uri} has {len(rows)} rows, not divisible by {world} ranks"
        )
    return shard(rows, rank, world)


def _update_critic(
    engine,
    critic,
    rows: TokenRows,
    targets: ValueTargets,
    cw: CriticWarmupConfig,
    batches: BatchLayout,
    seed: tuple[int, int],
) -> dict[str, float]:
    """`epochs` shuffled passes over the step's rows, `minibatches` optimizer steps each
    (`critic_update_step`, unclipped token-mean value loss).

    Returns the mean value loss over the updates and the mean gradient norm, over all ranks.
    """
    total, norms = torch.zeros((), device=targets.mask_BT.device), []
    for part in shuffled_minibatches(len(rows), cw.epochs, cw.minibatches, seed):
        stats, norm = critic_update_step(
            engine, critic, rows, part, targets, micro_batch_size=batches.micro_batch_size,
            grad_accum_steps=batches.grad_accum_steps, clip_range=None, agg="token_mean",
            count=global_counts("token_mean", targets.mask_BT[part])[0],
        )  # fmt: skip
        total += stats["value_loss"]
        norms += [norm] if norm is not None else []
    updates = cw.epochs * cw.minibatches
    metrics = {"critic_warmup/value_loss": float(distributed.all_reduce(total) / updates)}
    if norms:
        metrics["critic_warmup/grad_norm"] = sum(norms) / len(norms)
    return metrics


def _step_metrics(
    scored: list[ScoredSample],
    batch: TokenBatch,
    old_values_BT: Tensor,
    new_values_BT: Tensor,
    returns_BT: Tensor,
) -> dict[str, float]:
    """Metrics of one step over all ranks. `explained_var` uses the values from BEFORE this step's
    updates (the critic has not fitted these rollouts yet: a held-out measure); `_post_update` is in-sample."""
    mask_BT = batch.response_mask_BT
    correct_B = torch.tensor([s.is_correct for s in scored], device=mask_BT.device)
    value_sum_B = (old_values_BT * mask_BT).sum(1).double()
    tokens_B = mask_BT.sum(1).double()
    sums = distributed.all_reduce(
        torch.stack(
            [
                torch.tensor(float(len(scored)), dtype=torch.float64, device=mask_BT.device),
                torch.tensor(sum(s.reward for s in scored), dtype=torch.float64, device=mask_BT.device),
                correct_B.double().sum(),
                tokens_B.sum(),
                value_sum_B[correct_B].sum(),
                tokens_B[correct_B].sum(),
                value_sum_B[~correct_B].sum(),
                tokens_B[~correct_B].sum(),
            ]
        )
    ).tolist()
    n, reward, correct, tokens, v_correct, t_correct, v_incorrect, t_incorrect = sums
    return {
        "critic_warmup/explained_var": global_explained_variance(old_values_BT, returns_BT, mask_BT),
        "critic_warmup/explained_var_post_update": global_explained_variance(
            new_values_BT, returns_BT, mask_BT
        ),
        "critic_warmup/value_correct": v_correct / t_correct if t_correct else float("nan"),
        "critic_warmup/value_incorrect": v_incorrect / t_incorrect if t_incorrect else float("nan"),
        "critic_warmup/score": reward / n,  # mean total reward (what the returns are made of)
        "critic_warmup/accuracy": correct / n,
        "critic_warmup/response_len": tokens / n,
    }


def _last_logged(layout) -> dict[str, float]:
    from storage.metrics import read_metrics

    records = [r for r in read_metrics(layout.metrics(STAGE)) if "critic_warmup/explained_var" in r]
    return records[-1] if records else {}


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
