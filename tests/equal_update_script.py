"""One SFT step and one PPO update on fixed data, on however many ranks this runs on (`python` or
`deepspeed --num_gpus N`); rank 0 writes how far each parameter moved (tests/test_equal_updates.py).

The data is the same global batch whatever the world size: each rank takes its interleaved share,
as the stages do. Sequence lengths vary, so ranks and micro-batches hold different token counts:
a loss normalised per rank or per micro-batch instead of over the global batch moves the
parameters differently. AdamW runs with eps = 1e3, which makes its first step (lr x g / (|g| + eps))
linear in the gradient, so the parameters show the gradient's scale as well as its direction.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ (conftest's tiny model)

import torch  # noqa: E402
from conftest import make_tiny_qwen2, scored_rows  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from stages.config.batches import batch_layout, sampling_layouts  # noqa: E402
from stages.config.models import ModelConfig, OptimConfig  # noqa: E402
from stages.config.ppo import PPOConfig  # noqa: E402
from stages.data.records import Problem  # noqa: E402
from stages.data.tasks import EncodedProblem, shard  # noqa: E402
from stages.models.engine import build_engine  # noqa: E402
from stages.ppo.batch import compute_advantages, old_quantities, rollout_batch  # noqa: E402
from stages.ppo.engines import build_models  # noqa: E402
from stages.ppo.update import update  # noqa: E402
from stages.runtime import distributed  # noqa: E402
from stages.runtime.devices import model_device  # noqa: E402
from stages.sft import _train_step  # noqa: E402

ROWS = 16  # global rows of the SFT step and of the PPO update (one mini-batch)
PAD = 0


def lengths(seed: int, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(2, 60, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (gathered from the ranks' shards under ZeRO-3)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone().float() for k, v in module.state_dict().items()}
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def optim(args) -> OptimConfig:
    return OptimConfig(
        lr=1.0, eps=1e3, weight_decay=0.0, grad_clip=None, micro_batch_size=args.micro, zero_stage=args.zero
    )


def sft_step(args, world: int, rank: int) -> dict[str, torch.Tensor]:
    layout = batch_layout("sft", ROWS, world, "micro", args.micro, "rows")
    engine = build_engine(make_tiny_qwen2(seed=0).train(), optim(args), layout)
    before = full_state(engine.module)
    problem = Problem("p", "arith", "q", "1")
    batch = [
        EncodedProblem(problem, "q", tokens(i, p), tokens(100 + i, s) + [1])
        for i, (p, s) in enumerate(zip(lengths(1, ROWS, 1, 6), lengths(2, ROWS, 1, 14), strict=True))
    ]
    _train_step(engine, shard(batch, rank, world), layout.micro_batch_size, PAD)
    return {f"sft.{k}": v - before[k] for k, v in full_state(engine.module).items()}


def ppo_update(args, world: int, rank: int) -> dict[str, torch.Tensor]:
    ppo = PPOConfig(
        prompts_per_step=4, samples_per_prompt=4, minibatches=1, epochs=1, kl_coef=0.05, positive_lm_coef=0.5,
        policy_optim=optim(args), critic_optim=optim(args),
    )  # fmt: skip
    model = ModelConfig(policy=args.model, critic_init="policy", dtype="float32")
    batches = sampling_layouts(
        "ppo", ppo, {"policy_optim": ppo.policy_optim, "critic_optim": ppo.critic_optim}, world
    )
    models = build_models(ppo, model, {"policy": args.model, "critic": args.model}, batches)
    before = {
        "policy": full_state(models.policy_engine.module),
        "critic": full_state(models.critic_engine.module),
    }
    prompt_lengths, response_lengths = lengths(4, ROWS, 1, 6), lengths(5, ROWS, 2, 16)
    prompts = [tokens(200 + i, n) for i, n in enumerate(prompt_lengths)]
    responses = [tokens(300 + i, n) for i, n in enumerate(response_lengths)]
    scored = scored_rows(prompts, responses, lengths(3, ROWS, 0, 2))
    mine = shard(scored, rank, world)
    rollout = rollout_batch(mine, PAD, model_device(models.policy_engine))
    old = old_quantities(models, rollout, mine, 1.0, args.micro)
    adv = compute_advantages(rollout, old, torch.zeros(len(mine), dtype=torch.long), ppo)
    update(models, rollout, old, adv, ppo, temperature=1.0, train_policy=True, seed=(0, 1))
    moved = {}
    for name, engine in (("policy", models.policy_engine), ("critic", models.critic_engine)):
        moved |= {f"ppo.{name}.{k}": v - before[name][k] for k, v in full_state(engine.module).items()}
    return moved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    distributed.init_distributed()
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(0)
    moved = sft_step(args, world, rank) | ppo_update(args, world, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in moved.items()}, args.out)
    distributed.barrier()


if __name__ == "__main__":
    main()
