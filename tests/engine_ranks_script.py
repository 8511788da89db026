"""Train tiny Qwen2 engines for a few steps, checkpoint through the commit protocol, resume: the process side
of tests/test_engine.py. Runs as one process or under `deepspeed --num_gpus N` (CPU ranks).

    --phase first    fresh engines (init seed 0): train steps 1..save_step, save_training_state at
                     save_step, draw torch.rand(4), train on to total_steps (the uninterrupted run)
    --phase resume   fresh engines with a DIFFERENT init (seed 1), load_training_state, draw
                     torch.rand(4), train save_step+1..total_steps

Each rank writes `{out}/rank{r}.json` (losses, lrs and scheduler positions per step, the random
draw, the restored trainer state) and `{out}/params_rank{r}.safetensors` (initial and final
parameters, flattened, per engine). Every rank trains on its own fixed batch.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import TINY_VOCAB, make_tiny_qwen2  # noqa: E402  (tests/ is this script's folder)
from safetensors.torch import save_file  # noqa: E402

from stages.config.models import OptimConfig  # noqa: E402
from stages.models.engine import build_engine, load_training_state, save_training_state  # noqa: E402
from stages.runtime import distributed  # noqa: E402
from storage.location import Location  # noqa: E402


def fixed_batch(rank: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234 + rank)
    return torch.randint(2, TINY_VOCAB, (batch, length), generator=gen)


def flat_params(engine) -> torch.Tensor:
    """Every parameter, flattened, on every rank (gathered first under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        return torch.cat([p.detach().float().reshape(-1).clone() for p in params])


def train_step(engines: dict, batch: torch.Tensor) -> dict[str, float]:
    losses = {}
    for name, engine in engines.items():
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses[name] = distributed.all_reduce(loss.detach().clone(), op="mean").item()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["first", "resume"], required=True)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--root", required=True, help="checkpoints location (URI)")
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--staging", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-step", type=int, default=2)
    parser.add_argument("--total-steps", type=int, default=4)
    parser.add_argument("--critic", action="store_true", help="also train a separate 'value' engine")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args()

    distributed.init_distributed()
    rank = distributed.rank()
    checkpoints = Location(args.root, endpoint_url=args.endpoint)
    seed = 0 if args.phase == "first" else 1
    # Cosine with warmup: the lr differs at every step, so a wrong schedule position shows.
    policy_optim = OptimConfig(
        lr=3e-3, warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1, zero_stage=args.zero
    )
    engines = {"policy": build_engine(make_tiny_qwen2(seed=seed), policy_optim)}
    if args.critic:
        critic_optim = OptimConfig(lr=1e-3, weight_decay=0.1, zero_stage=args.zero)
        engines["value"] = build_engine(make_tiny_qwen2(seed=seed + 10), critic_optim)
    init = {f"{name}/init": flat_params(e) for name, e in engines.items()}
    batch = fixed_batch(rank)
    # Seeds per rank and per phase: only a restore of this rank's own RNG state makes the resumed
    # draws equal the uninterrupted ones.
    torch.manual_seed(100 + rank + 10 * seed)
    random.seed(200 + rank + 10 * seed)
    np.random.seed(300 + rank + 10 * seed)
    record: dict = {"losses": {}, "lrs": {}, "sched": {}}

    def run_steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            record["lrs"][step] = {n: e.get_lr()[0] for n, e in engines.items()}
            record["sched"][step] = {n: e.lr_scheduler.last_epoch for n, e in engines.items()}
            record["losses"][step] = train_step(engines, batch)

    if args.phase == "first":
        run_steps(1, args.save_step)
        state = {"data_cursor": args.save_step * 2, "note": "tiny"}
        save_training_state(
            engines, state, checkpoints, args.save_step, keep_last=2, staging_dir=args.staging
        )
    else:
        state = load_training_state(engines, checkpoints, staging_dir=args.staging)
        record["trainer_state"] = state
        record["global_steps"] = {n: e.global_steps for n, e in engines.items()}
    record["rand"] = {"torch": torch.rand(4).tolist(), "python": random.random(), "numpy": np.random.rand()}
    run_steps(args.save_step + 1, args.total_steps)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    final = {f"{name}/final": flat_params(e) for name, e in engines.items()}
    save_file({**init, **final}, str(out / f"params_rank{rank}.safetensors"))
    distributed.barrier()


if __name__ == "__main__":
    main()
