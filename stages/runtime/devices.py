"""Which device this process computes on, decided in one place.

Under a launcher every rank owns one GPU: `cuda:LOCAL_RANK` when CUDA is present, else the CPU.
Every model a stage loads is placed on `device()` (DeepSpeed engines place theirs on the same
device), and every batch is moved to the device of the model it meets (`model_device`).
"""

from __future__ import annotations

import torch

from stages.runtime import distributed


def device() -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` with CUDA, else `cpu`."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model keeps its parameters (a DeepSpeed engine and an HF model say so themselves)."""
    reported = getattr(model, "device", None)
    if isinstance(reported, torch.device):
        return reported
    return next(model.parameters()).device
