"""Process-group plumbing: rank and world size, init on CPU or GPU, barrier, all-reduce, rank-0 print.

One process works as a world of size 1 (the missing launcher variables are filled in); under
`deepspeed --num_gpus N` (or torchrun) the launcher's variables are used as they are. On a
machine without CUDA, DeepSpeed's CPU accelerator is selected (`DS_ACCELERATOR=cpu`) and the
ranks talk over gloo.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that was free a moment ago (good enough for a single-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_op_build_dir() -> Path:
    """Where torch JIT-builds DeepSpeed's CPU shared-memory comm op (honours TORCH_EXTENSIONS_DIR)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    except (ImportError, TypeError):  # private torch API moved: fall back to its documented default
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
        return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm"


def load_shm_op_exclusively(build_dir: Path | None = None) -> None:
    """Load DeepSpeed's CPU shm comm op while holding a kernel lock, clearing a dead process's baton.

    Why: torch's JIT loader takes a bare lock FILE (`FileBaton`) around every load, even when
    nothing needs rebuilding, and waits forever for it to vanish. A process killed inside that
    window (a kill -9 or a cancelled stage starting up) leaves the file behind and every later
    stage hangs in `deepspeed.init_distributed`. Here each loader first takes an `flock` on a file
    beside it, which the kernel drops when its holder dies: whoever holds the flock is the only
    live loader, so a baton file it finds is a dead process's and is removed. DeepSpeed caches
    the loaded op, so its own load in `init_distributed` takes no baton. The flock covers only
    the load (not the rendezvous, which needs every rank), so ranks cannot deadlock on it.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):
        return
    build_dir = build_dir or shm_op_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "rlpipe.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
        (build_dir / "lock").unlink(missing_ok=True)
        if not (build_dir / f"{builder.NAME}.so").exists():  # say why the first stage sits still
            print0("building DeepSpeed's CPU communication op (once per machine and torch build, ~40 s)")
        builder.load(verbose=False)


def init_distributed() -> None:
    """Initialise the default process group once (idempotent): world size 1 when no launcher set one."""
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # not started by a launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        # Must be set before DeepSpeed first picks its accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(local_rank())  # before NCCL init, so each rank binds its own GPU
    if not torch.cuda.is_available():
        load_shm_op_exclusively()
    import deepspeed

    # DeepSpeed creates the torch.distributed default group (nccl on GPU, gloo on CPU) and its comm layer.
    deepspeed.init_distributed(dist_init_required=True, verbose=False)


def rank() -> int:
    return (
        dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    )


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a world of one or before init."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (`sum`, `mean`, `max`, `min`) across ranks; returns the tensor for chaining."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    ops = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }
    # NCCL reduces CUDA tensors only, gloo CPU ones: a tensor elsewhere travels there and back.
    comm_device = _communication_device()
    moved = tensor if tensor.device == comm_device else tensor.to(comm_device)
    dist.all_reduce(moved, op=ops[op])
    if op == "mean":
        moved /= dist.get_world_size()
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def _communication_device() -> torch.device:
    """The device the default process group reduces on: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int, src: int = 0) -> int:
    """`value` as held by rank `src`, on every rank (a plain tensor broadcast: nothing is pickled)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_communication_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_rank0():
        print(*args, **kwargs, flush=True)
