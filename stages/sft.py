"""SFT warm start: completion-only NLL on prompt -> worked solution (optional stage).

The offline `tiny` recipe needs it: its model starts random. SFT teaches it the `arith` format
and some arithmetic, leaving room for RL; the stage reports greedy and sampled held-out accuracy.

    python -m stages.sft --config FILE [--force]          (or: rlpipe stage sft --run-id ID)
"""

from __future__ import annotations

import sys

import torch

from stages.algorithms import aggregate_loss
from stages.config.batches import stage_layouts
from stages.config.pipeline import PipelineConfig
from stages.data.prompt_rendering import stop_token_ids
from stages.data.records import DataError
from stages.data.tasks import EncodedProblem, batch_indices, check_fits, encode_problems, shard, task_problems
from stages.evaluation.heldout import heldout_accuracy
from stages.lifecycle.contract import StagePlan, make_plan
from stages.lifecycle.entry import stage_main
from stages.lifecycle.training_run import claim_stage, resume_training
from stages.models.engine import build_engine
from stages.models.forward import build_token_batch, response_logprobs
from stages.models.loading import load_options, load_policy
from stages.models.sources import resolve_model_dir
from stages.models.tokenizer import load_tokenizer, pad_token_id
from stages.runtime import distributed
from stages.runtime.devices import model_device
from stages.runtime.numerics import at_step, require_finite
from stages.sampling.hf_sampler import HFGenerator

STAGE = "sft"


def plan(config: PipelineConfig) -> StagePlan:
    """What the result depends on: the SFT section, the task, the model, the seed; input: the policy."""
    semantic = {"sft": config.sft, "task": config.task, "model": config.model, "seed": config.seed}
    return make_plan(config, semantic, {"policy": config.model.policy})


def run(config: PipelineConfig, force: bool = False) -> None:
    """The SFT recipe, top to bottom."""
    sft = config.sft

    # 1. Skip if complete for this config and input; otherwise claim the stage.
    ctx = claim_stage(STAGE, config, plan(config), force)
    if ctx is None:
        return
    world = ctx.world_size
    layout = stage_layouts(config, STAGE, world)["optim"]  # sft.batch_size over the ranks, in micro-batches

    # 2. Tokenizer (the model after the data).
    policy_dir = resolve_model_dir(config.model.policy, config.tiny_model, ctx.endpoint_url)
    tokenizer = load_tokenizer(policy_dir, config.model.trust_remote_code)
    prompt_format = config.task.prompt_format

    # 3. Data (before the engine, so bad data fails in seconds): train problems with worked
    #    solutions; held-out problems for accuracy.
    train = [
        p
        for p in encode_problems(task_problems(config.task, "train"), tokenizer, prompt_format)
        if p.solution_ids
    ]
    heldout = encode_problems(task_problems(config.task, "test"), tokenizer, prompt_format)
    if not train:
        raise DataError(f"{STAGE}: no training problem of {config.task.dataset!r} has a worked solution")
    check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train", with_solution=True)
    check_fits(heldout, tokenizer, config.generation.max_new_tokens, f"{STAGE} held-out")

    # 4. Engine, then resume from the newest committed checkpoint (same config only).
    torch.manual_seed(config.seed)
    engine = build_engine(load_policy(policy_dir, **load_options(config.model)), sft.optim, layout)
    global_batch = sft.batch_size
    training = resume_training(ctx, {"policy": engine}, sft.steps)
    last_loss = training.state.get("loss", float("nan")) if training.state else float("nan")

    # 5. Train.
    for step in training.steps(sft.steps):
        indices = shard(batch_indices(len(train), global_batch, step, config.seed), ctx.rank, world)
        done = step + 1
        with at_step(STAGE, done):
            loss = _train_step(
                engine, [train[i] for i in indices], layout.micro_batch_size, pad_token_id(tokenizer)
            )
        last_loss = distributed.all_reduce(loss.detach().clone(), "mean").item()
        if done % sft.log_every == 0 or done == sft.steps:
            training.tracker.log(done, {"sft/loss": last_loss, "sft/lr": engine.get_lr()[0]})
        if done % sft.save_every == 0 or done == sft.steps:
            # The last loss travels with the checkpoint: a rerun resumed at the end still reports it.
            training.save(done, {"data_cursor": done * global_batch, "loss": last_loss}, sft.keep_last)

    # 6. Held-out accuracy, greedy and sampled.
    sampler = HFGenerator(
        engine.module,
        eos_token_id=stop_token_ids(tokenizer, prompt_format),
        pad_token_id=pad_token_id(tokenizer),
    )
    accuracy = heldout_accuracy(sampler, tokenizer, heldout, config.generation, config.seed)
    training.tracker.log(sft.steps, {f"sft/heldout_{k}": v for k, v in accuracy.items()})

    # 7. Export the policy in HF format, then the manifest (last).
    final = training.export_model("policy", engine.module.save_pretrained, tokenizer)
    metrics = {"loss": last_loss, **{f"heldout_{k}": v for k, v in accuracy.items()}}
    metrics |= {"train_problems": len(train), "heldout_problems": len(heldout)}
    training.finish(outputs={"policy": str(final)}, metrics=metrics)
    distributed.print0(
        f"{STAGE}: done; held-out greedy {accuracy['greedy']:.3f}, sampled {accuracy['sampled']:.3f}; policy at {final}"
    )


def _train_step(engine, batch: list[EncodedProblem], micro: int, pad_id: int) -> torch.Tensor:
    """One optimizer step of completion-only NLL, token-mean over the whole global batch.

    DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
    ranks; scaling by (accumulation steps x ranks) / global tokens makes the accumulated gradient
    exactly that of one big batch (see `aggregate_loss`).
    """
    on = model_device(engine)
    chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    local_tokens = torch.tensor(float(sum(len(p.solution_ids) for p in batch)), device=on)
    global_tokens = distributed.all_reduce(local_tokens)
    scale = len(chunks) * distributed.world_size()
    total = torch.zeros((), device=on)
    for chunk in chunks:
        prompts, solutions = [p.prompt_ids for p in chunk], [p.solution_ids for p in chunk]
        tokens = build_token_batch(prompts, solutions, pad_id).to(on)
        logprobs, _ = response_logprobs(engine, tokens)
        loss = (
            aggregate_loss(-logprobs, tokens.response_mask_BT, "token_mean", global_count=global_tokens)
            * scale
        )
        require_finite(loss, "loss")
        engine.backward(loss)
        engine.step()
        total += loss.detach() / scale
    return total


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
