"""DeepSpeed engines for trainable models, and their training state through the checkpoint commit protocol.

One engine per trainable model: the policy, a separate critic, a reward model each get their own
optimizer, learning-rate schedule and ZeRO partitioning (`build_engine`). The ZeRO stage picks a
base config in `infra/deepspeed/zero{0,2,3}.json`; `deepspeed_config` completes it with what is
only known at run time (batch sizes, world size, clipping, precision).

Optimizer: `torch.optim.AdamW` on every device. DeepSpeed's `DeepSpeedCPUAdam` needs a C++ op
compiled on first use and only pays off with ZeRO-Offload; `FusedAdam` needs CUDA. Torch AdamW is
on ZeRO's list of supported optimizers (its state is partitioned like any other), runs unchanged
on CPU ranks and GPUs, and keeps CPU tests and GPU runs on the same code path. It runs fused
(`fused=True`, torch's single-kernel AdamW on both).

Training state (`save_training_state` / `load_training_state`), staged per step and committed
with `storage.checkpoints.commit_checkpoint`:

    step_000040/<engine name>/deepspeed/...   DeepSpeed's own files: module, optimizer shards of
                                              every rank, lr scheduler, engine step counters
    step_000040/rng/rank_00000.json           torch (CPU + CUDA), python `random`, numpy RNG per rank
    step_000040/trainer_state.json            step, data cursor, anything the trainer passes
    step_000040/COMMITTED                     written last by the commit protocol

Pickle. DeepSpeed writes its checkpoint files with `torch.save` (pickle) and reads them through
its checkpoint engine, `TorchCheckpointEngine.load`, which calls `torch.load(weights_only=False)`:
that is the one load path of `engine.load_checkpoint` for model states, ZeRO optimizer shards and
the lr scheduler (DeepSpeed's universal-checkpoint and NVMe-offload loaders call torch.load on
their own; we use neither). Every engine we build gets `WeightsOnlyCheckpointEngine` in its place,
which loads with `torch.load(weights_only=True)`: torch's restricted unpickler builds tensors,
containers and primitives and refuses every other global, except three plain DeepSpeed value
types that ZeRO optimizer state holds (`_deepspeed_safe_globals`: the static loss scaler, the ZeRO
stage enum, the (numel, start) fragment record; they are rebuilt from plain values by `__new__`
and attribute assignment, the enum by value lookup). Any other global fails the load instead of running code
(tested). On top of that, files are only opened after the commit protocol has checked each one's
sha256 against COMMITTED (`restore_latest` downloads and verifies first); the hash proves the files
are the ones committed, not that whoever committed them was benign, hence weights_only as well.

Multi-rank staging. All ranks of a node write into one local staging folder, rank 0 uploads and
commits it once every rank has passed a barrier. This assumes every rank sees that folder: true
on one node. Multi-node runs need `staging_dir` on a filesystem shared by all nodes (NFS, Lustre,
a FUSE-mounted bucket), or a per-node upload step (each node's local rank 0 uploads its own files
and returns their hashes, global rank 0 writes one COMMITTED listing all of them), which the
commit protocol does not offer yet. Loading has the mirror-image requirement: every node needs
the downloaded checkpoint, so each node's local rank 0 must download it (with a shared
filesystem, one download serves all).
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.config.batches import BatchLayout
from stages.config.models import OptimConfig
from stages.runtime import distributed
from storage.checkpoints import CheckpointError, commit_checkpoint, read_commit_record, restore_latest
from storage.layout import step_dir_name
from storage.location import Location

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's own sub-folder inside each engine's checkpoint folder
TRAINER_STATE = "trainer_state.json"
_NOTHING, _FAILED = -1, -2  # what rank 0 broadcasts instead of a step


# ---- learning-rate schedule (pure) ---------------------------------------------------------------
def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    schedule: str = "constant",
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak lr for the optimizer update with 0-based index `step` (LambdaLR's epoch).

    Warmup: (step + 1) / (warmup_steps + 1) for step < warmup_steps, so the first update already
    moves (no wasted lr = 0 step) and the ramp meets the plateau at step == warmup_steps.
    Cosine: min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2 with
    p = (step - warmup_steps) / (total_steps - warmup_steps), held at min_lr_ratio once p >= 1
    (the form of Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    if total_steps is None:
        raise ValueError("cosine schedule needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(optim: OptimConfig) -> Callable[[int], float]:
    """The LambdaLR function of `optim`'s schedule."""
    return partial(
        lr_factor,
        warmup_steps=optim.warmup_steps,
        schedule=optim.schedule,
        total_steps=optim.total_steps,
        min_lr_ratio=optim.min_lr_ratio,
    )


# ---- engines -------------------------------------------------------------------------------------
def use_bf16(optim: OptimConfig) -> bool:
    return optim.precision == "bf16" or (optim.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(
    optim: OptimConfig, world_size: int, layout: BatchLayout | None = None
) -> dict[str, Any]:
    """The infra base config of `optim.zero_stage`, completed with the run-time values: the batch
    layout (`stages.config.batches`; None: one micro-batch of `optim.micro_batch_size` per step),
    clipping, precision."""
    layout = layout or BatchLayout(optim.micro_batch_size, optim.micro_batch_size, 1)
    config = json.loads((DEEPSPEED_CONFIG_DIR / f"zero{optim.zero_stage}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = layout.micro_batch_size
    config["gradient_accumulation_steps"] = layout.grad_accum_steps
    config["train_batch_size"] = layout.micro_batch_size * layout.grad_accum_steps * world_size
    config["gradient_clipping"] = optim.grad_clip or 0.0
    config["bf16"] = {**config.get("bf16", {}), "enabled": use_bf16(optim)}
    return config


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); leave biases and norm gains undecayed (vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, optim: OptimConfig, layout: BatchLayout | None = None):
    """Wrap `model` in a DeepSpeed engine with its own AdamW and warmup + constant/cosine LambdaLR.

    `layout`: the micro-batches of one optimizer step on this rank (`deepspeed_config`). The engine
    steps the scheduler once per optimizer step (at the accumulation boundary).
    """
    import deepspeed

    distributed.init_distributed()
    # fused: one kernel over every parameter (CPU and CUDA). The default loop cost 7.5-9.8 ms per
    # step on the bench model's 3.4M parameters against 2.2-2.6 ms fused (BENCHMARKS.md).
    optimizer = torch.optim.AdamW(
        _param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(optim, distributed.world_size(), layout),
        dist_init_required=False,
    )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    return engine


# ---- pickle-free loading of DeepSpeed checkpoints ------------------------------------------------
def step_engine(engine) -> float | None:
    """`engine.step()`; returns the global gradient 2-norm (before clipping) when this step applied
    an update (the end of an accumulation cycle), else None.

    DeepSpeed's own `get_global_grad_norm()` is only filled by its ZeRO/bf16/fp16 optimizers; for
    plain fp32 ZeRO-0 (the CPU default) the norm is taken from the parameters' gradients, which at
    the accumulation boundary are already all-reduced over the ranks.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and not hasattr(engine.optimizer, "_global_grad_norm"):
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    engine.step()
    if boundary and norm is None:
        reported = engine.get_global_grad_norm()
        norm = None if reported is None else float(reported)
    return norm


def _deepspeed_safe_globals() -> list:
    """Plain DeepSpeed value types that appear in its checkpoints (no behaviour runs on unpickling)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: saves as it does, loads with `torch.load(weights_only=True)`."""

    def __init__(self, inner):
        self._inner = inner

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


# ---- RNG state (JSON, no pickle) -----------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-serialisable data."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch_cpu"]))
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["torch_cuda"]])


HF_EXPORTS = "hf"  # folder of a checkpoint holding Hugging Face exports of its models (optional)


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.json"


def checkpoint_world_size(checkpoints: Location, step: int) -> int | None:
    """The number of ranks that wrote committed step `step` (one RNG file each); None if unreadable."""
    try:
        files = read_commit_record(checkpoints, step)["files"]
    except CheckpointError:  # corrupt: resume falls back to an older checkpoint and says so
        return None
    return sum(1 for name in files if name.startswith("rng/rank_")) or None


# ---- training state through the commit protocol --------------------------------------------------
def save_training_state(
    engines: dict[str, Any],
    trainer_state: dict[str, Any],
    checkpoints: Location,
    step: int,
    keep_last: int | None,
    staging_dir: str | Path,
    hf_export: Callable[[Path], Any] | None = None,
) -> None:
    """Checkpoint every engine, each rank's RNG and the trainer state as committed step `step`.

    Collective: every rank calls it. `trainer_state` must be JSON-serialisable (data cursor, ...);
    `step` is stored in it. `staging_dir` is a local folder seen by every rank of the node.
    `hf_export(folder)`, called on rank 0, adds Hugging Face exports under `{step}/hf/`: committed
    with the shards, so they can be evaluated (`rlpipe eval`) while the stage still trains.
    """
    # Serialised first, on every rank: a value JSON cannot hold fails everywhere, before any file is written.
    state_json = json.dumps({**trainer_state, "step": step}, indent=1)
    rank = distributed.rank()
    staged = Path(staging_dir) / step_dir_name(step)
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)  # leftovers of a crashed save of the same step
    distributed.barrier()

    # 1. Every rank writes its shards: DeepSpeed coordinates which rank writes which file.
    for name, engine in engines.items():
        engine.save_checkpoint(str(staged / name), tag=DEEPSPEED_TAG, save_latest=False)
    rng_path = staged / _rng_file(rank)
    rng_path.parent.mkdir(parents=True, exist_ok=True)
    rng_path.write_text(json.dumps(rng_state()))
    if rank == 0:
        (staged / TRAINER_STATE).write_text(state_json)
        if hf_export is not None:
            hf_export(staged / HF_EXPORTS)

    # 2. Rank 0 commits once every rank's files are on disk; the others wait for the commit.
    distributed.barrier()
    if rank == 0:
        # DeepSpeed drops copies of its zero_to_fp32.py scripts beside the shards: a checkpoint holds
        # data, not code (the same scripts ship in the deepspeed package as deepspeed.utils.zero_to_fp32).
        for script in staged.glob("*/*.py"):
            script.unlink()
        commit_checkpoint(staged, checkpoints, step, keep_last=keep_last)
        shutil.rmtree(staged, ignore_errors=True)
    distributed.barrier()


def load_training_state(
    engines: dict[str, Any], checkpoints: Location, staging_dir: str | Path
) -> dict[str, Any] | None:
    """Restore every engine, this rank's RNG and the trainer state from the newest intact checkpoint.

    Collective. Returns the saved trainer state (with its `step`), or None when nothing is
    committed (a fresh start). Rank 0 downloads and sha256-verifies the checkpoint before any
    rank opens a file of it.
    """
    rank = distributed.rank()
    restored, error = None, None
    if rank == 0:
        try:
            restored = restore_latest(checkpoints, staging_dir)
        except Exception as err:  # every rank must leave the broadcast, then all of them fail
            error = err
    step = distributed.broadcast_int(_FAILED if error else _NOTHING if restored is None else restored[0])
    if error is not None:
        raise error
    if step == _FAILED:
        raise CheckpointError(f"rank 0 could not restore a checkpoint from {checkpoints} (see its log)")
    if step == _NOTHING:
        return None
    distributed.print0(f"resuming from the committed checkpoint of step {step} ({checkpoints})")
    local = Path(staging_dir) / step_dir_name(step)

    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(
            str(local / name), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"checkpoint {checkpoints}/{step_dir_name(step)} has no engine '{name}'")
    rng_path = local / _rng_file(rank)
    if not rng_path.is_file():
        raise RuntimeError(
            f"checkpoint {checkpoints}/{step_dir_name(step)} has no RNG state for rank {rank}: "
            "was it written with a different world size?"
        )
    set_rng_state(json.loads(rng_path.read_text()))
    trainer_state = json.loads((local / TRAINER_STATE).read_text())

    distributed.barrier()
    if rank == 0:
        shutil.rmtree(local, ignore_errors=True)
    return trainer_state
