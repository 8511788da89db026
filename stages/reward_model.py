"""Reward-model pretraining: Bradley-Terry on chosen/rejected pairs -> `final/reward_model`.

The RM starts from the run's starting policy (SFT's export, or `model.policy`): its backbone plus
a fresh score head, read at the last token of prompt + response + EOS (`reward_model_scores`).
Pairs come from the task (correct worked solution vs. a corrupted one) or any HF dataset with
chosen/rejected columns. The stage reports held-out pairwise accuracy.

    python -m stages.reward_model --config FILE [--force]   (or: rlpipe stage reward_model --run-id ID)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from stages.algorithms import bradley_terry_loss
from stages.config.batches import stage_layouts
from stages.config.pipeline import PipelineConfig
from stages.config.task import PromptFormat
from stages.config.training import RewardModelConfig
from stages.data.preferences import preference_pairs_from_hf, preference_pairs_from_problems
from stages.data.prompt_rendering import prompt_token_ids, response_end_id, uses_chat
from stages.data.records import DataError, PreferencePair
from stages.data.tasks import batch_indices, shard, task_problems
from stages.lifecycle.contract import StageError, StagePlan, make_plan
from stages.lifecycle.entry import stage_main
from stages.lifecycle.inputs import policy_uri
from stages.lifecycle.training_run import claim_stage, resume_training
from stages.models.engine import build_engine
from stages.models.forward import build_token_batch
from stages.models.loading import init_reward_model, load_options
from stages.models.sources import resolve_model_dir
from stages.models.tokenizer import load_tokenizer, pad_token_id
from stages.models.value_head import reward_model_scores
from stages.runtime import distributed
from stages.runtime.numerics import at_step, require_finite

STAGE = "reward_model"


@dataclass(frozen=True)
class EncodedPair:
    chosen_ids: list[int]  # prompt + chosen response + response end
    rejected_ids: list[int]  # prompt + rejected response + response end
    margin: float | None


def plan(config: PipelineConfig) -> StagePlan:
    """What the result depends on: the RM section, task, model, seed; inputs: the init model (+ pairs)."""
    rm = config.reward_model
    inputs = {"init": policy_uri(config, rm.init_from)}
    inputs |= {} if rm.pairs_from == "task" else {"pairs": rm.pairs_from}
    semantic = {"reward_model": rm, "task": config.task, "model": config.model, "seed": config.seed}
    return make_plan(config, semantic, inputs)


def run(config: PipelineConfig, force: bool = False) -> None:
    """The reward-model recipe, top to bottom."""
    rm = config.reward_model

    # 1. Skip if complete for this config and inputs; otherwise claim the stage.
    stage_plan = plan(config)
    ctx = claim_stage(STAGE, config, stage_plan, force)
    if ctx is None:
        return
    world = ctx.world_size
    layout = stage_layouts(config, STAGE, world)["optim"]  # reward_model.batch_size over the ranks

    # 2. Preference pairs as text, first: a bad dataset fails before any model is loaded.
    train_text, heldout_text = _load_pairs(config)

    # 3. Model (starting policy's backbone + fresh score head), tokenizer, engine; tokenised pairs.
    init_dir = resolve_model_dir(stage_plan.inputs["init"], config.tiny_model, ctx.endpoint_url)
    tokenizer = load_tokenizer(init_dir, config.model.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    torch.manual_seed(config.seed)  # the score head's random init
    model = init_reward_model(init_dir, **load_options(config.model)).train()
    if model.config.pad_token_id is None:  # transformers' own scoring of the export needs it
        model.config.pad_token_id = pad_id
    engine = build_engine(model, rm.optim, layout)
    prompt_format = config.task.prompt_format
    train = _encode_pairs(train_text, tokenizer, prompt_format)
    heldout = _encode_pairs(heldout_text, tokenizer, prompt_format)
    global_batch = rm.batch_size
    distributed.print0(f"{STAGE}: {len(train)} training pairs, {len(heldout)} held-out pairs")

    # 4. Resume from the newest committed checkpoint (same config only).
    training = resume_training(ctx, {"reward_model": engine}, rm.steps)
    last = training.state["train_metrics"] if training.state else {}

    # 5. Train: Bradley-Terry (+ reward centering) on each global batch of pairs.
    for step in training.steps(rm.steps):
        indices = shard(batch_indices(len(train), global_batch, step, config.seed), ctx.rank, world)
        done = step + 1
        with at_step(STAGE, done):
            sums = _train_step(engine, [train[i] for i in indices], rm, layout.micro_batch_size, pad_id)
        if done % rm.log_every == 0 or done == rm.steps:
            loss, correct, gap, n = distributed.all_reduce(sums).tolist()
            last = {"loss": loss / n, "accuracy": correct / n, "margin": gap / n}
            lr = {"lr": engine.get_lr()[0]}
            training.tracker.log(done, {f"{STAGE}/{k}": v for k, v in (last | lr).items()})
        if done % rm.save_every == 0 or done == rm.steps:
            training.save(done, {"data_cursor": done * global_batch, "train_metrics": last}, rm.keep_last)

    # 6. Held-out pairwise accuracy and mean scores (reduced over ranks).
    evaluation = _evaluate(engine, heldout, rm.optim.micro_batch_size, pad_id)
    training.tracker.log(rm.steps, {f"{STAGE}/{k}": v for k, v in evaluation.items()})

    # 7. Export the reward model in HF format, then the manifest (last).
    final = training.export_model("reward_model", engine.module.save_pretrained, tokenizer)
    metrics = {**last, **evaluation, "train_pairs": len(train), "heldout_pairs": len(heldout)}
    training.finish(outputs={"reward_model": str(final)}, metrics=metrics)
    distributed.print0(
        f"{STAGE}: done; held-out pairwise accuracy {evaluation['heldout_accuracy']:.3f}; reward model at {final}"
    )


def _load_pairs(config: PipelineConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs: from the task's train/test problems, or from an HF dataset.

    A dataset without a `test` split of its own (a .jsonl/.json/.parquet file, a saved `Dataset`, a hub
    dataset with only `train`) is read once, `train_pairs + heldout_pairs` rows at most, and its LAST
    `heldout_pairs` rows are held out.
    """
    rm = config.reward_model
    if rm.pairs_from == "task":
        train = preference_pairs_from_problems(task_problems(config.task, "train"), config.seed)
        heldout = preference_pairs_from_problems(task_problems(config.task, "test"), config.seed)
        return train[: rm.train_pairs], heldout[: rm.heldout_pairs]
    read = partial(
        preference_pairs_from_hf,
        rm.pairs_from,
        prompt_field=rm.prompt_field,
        chosen_field=rm.chosen_field,
        rejected_field=rm.rejected_field,
        margin_field=rm.margin_field,
    )
    try:  # a user's data problem (missing column, unreadable file) ends in one line, not a traceback
        if _has_test_split(rm.pairs_from):
            train, heldout = read("train", limit=rm.train_pairs), read("test", limit=rm.heldout_pairs)
        else:
            pairs = read("train", limit=rm.train_pairs + rm.heldout_pairs)
            train, heldout = pairs[: -rm.heldout_pairs], pairs[-rm.heldout_pairs :]
    except DataError as err:
        raise StageError(str(err)) from None
    if not train or not heldout:
        raise StageError(
            f"{rm.pairs_from}: {len(train)} training and {len(heldout)} held-out pairs; both must be non-empty "
            "(without a test split, the last reward_model.heldout_pairs rows are held out)"
        )
    return train, heldout


def _has_test_split(source: str) -> bool:
    """Whether `source` has a `test` split of its own (a single file or a saved `Dataset` has not:
    `preference_pairs_from_hf` reads their one split whatever split is asked)."""
    import datasets

    path = Path(source)
    if path.exists():
        return (path / "dataset_dict.json").is_file() and "test" in datasets.load_from_disk(str(path))
    try:
        return "test" in datasets.get_dataset_split_names(source)
    except Exception:  # unreachable hub: the read that follows reports it in one line
        return False


def _encode_pairs(pairs: list[PreferencePair], tokenizer, prompt_format: PromptFormat) -> list[EncodedPair]:
    """Prompt and responses tokenised separately (as generation sees them), then prompt + response + the
    response end (EOS, or the chat template's turn end): the sequences PPO's rollouts will be scored as.
    A pair without a prompt (its responses carry their own) is not wrapped in the chat template."""
    chat = uses_chat(tokenizer, prompt_format)
    end = [response_end_id(tokenizer, chat)]
    encoded = []
    for pair in pairs:
        prompt_ids = prompt_token_ids(pair.prompt, tokenizer, chat) if pair.prompt else []
        chosen, rejected = (
            tokenizer(r, add_special_tokens=False)["input_ids"] for r in (pair.chosen, pair.rejected)
        )
        encoded.append(EncodedPair(prompt_ids + chosen + end, prompt_ids + rejected + end, pair.margin))
    return encoded


def _pair_scores(engine, pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_B, rejected_B): each sequence's score at its last token (the EOS), one forward for both sides."""
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    # A score reads only the last token, so where the "prompt" ends is irrelevant: the first token is
    # enough (build_token_batch needs a non-empty one; an HF pair may have no prompt field).
    tokens = build_token_batch([s[:1] for s in sequences], [s[1:] for s in sequences], pad_id)
    scores_B = reward_model_scores(engine, tokens.input_ids_BL, tokens.attention_mask_BL)
    return scores_B[: len(pairs)], scores_B[len(pairs) :]


def _train_step(
    engine, batch: list[EncodedPair], rm: RewardModelConfig, micro: int, pad_id: int
) -> torch.Tensor:
    """One optimizer step of the pairwise loss, mean over the pairs of the whole global batch.

    Loss per pair: -log sigmoid(r_c - r_r - margin) + center_rewards_coef * (r_c + r_r)^2.
    DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
    ranks; scaling each micro-batch's mean by (its pairs / global pairs) x (accumulation steps x ranks)
    makes the accumulated gradient exactly that of one big batch (the factor is 1 when every
    micro-batch is full, as `batch_indices` + `shard` make them).
    Returns this rank's sums [loss, correct pairs, score gap, pairs] for the metrics.
    """
    chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    global_pairs = distributed.all_reduce(torch.tensor(float(len(batch))))
    scale = len(chunks) * distributed.world_size()
    sums = torch.zeros(4, dtype=torch.float64)
    for chunk in chunks:
        chosen_B, rejected_B = _pair_scores(engine, chunk, pad_id)
        margins = [p.margin for p in chunk]
        margin_B = None
        if any(x is not None for x in margins):
            margin_B = torch.tensor([x or 0.0 for x in margins], device=chosen_B.device)
        bt_loss, stats = bradley_terry_loss(chosen_B, rejected_B, margin_B)
        loss = bt_loss + rm.center_rewards_coef * ((chosen_B + rejected_B) ** 2).mean()
        require_finite(loss, "loss")
        engine.backward(loss * (len(chunk) / global_pairs) * scale)
        engine.step()
        n = len(chunk)
        parts = (loss.detach(), stats["accuracy"], stats["gap_mean"])
        sums += torch.tensor([float(x) * n for x in parts] + [n], dtype=torch.float64)
    return sums


@torch.no_grad()
def _evaluate(engine, pairs: list[EncodedPair], micro_batch_size: int, pad_id: int) -> dict[str, float]:
    """Pairwise accuracy (ties count as wrong) and mean chosen/rejected scores; collective across ranks."""
    engine.eval()
    mine = shard(pairs, distributed.rank(), distributed.world_size())
    sums = torch.zeros(4, dtype=torch.float64)  # correct, pairs, chosen score sum, rejected score sum
    for i in range(0, len(mine), micro_batch_size):
        chosen_B, rejected_B = _pair_scores(engine, mine[i : i + micro_batch_size], pad_id)
        parts = ((chosen_B > rejected_B).sum(), len(chosen_B), chosen_B.sum(), rejected_B.sum())
        sums += torch.tensor([float(x) for x in parts], dtype=torch.float64)
    correct, n, chosen, rejected = distributed.all_reduce(sums).tolist()
    n = max(n, 1.0)
    return {
        "heldout_accuracy": correct / n,
        "heldout_chosen_score": chosen / n,
        "heldout_rejected_score": rejected / n,
    }


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
