"""NaN and inf stop a stage at the step where they appear, before they reach the weights.

Shape suffixes: B rows, T response tokens.

- `require_finite(loss, what)`: every training loss is checked before its backward. The check is
  agreed over all ranks (a max all-reduce), so no rank enters a collective that the others skip.
  A non-finite loss from finite inputs means the weights have diverged: the stage stops. Nothing of
  that step is committed, so the last good checkpoint stays `latest` and a rerun resumes from it.
- `nonfinite_counts(named, mask_BT)`: a step's data (rewards, logprobs, values, advantages) before
  any update, summed over all ranks. PPO stops on them, or with `ppo.on_nonfinite: skip` leaves
  the weights as they were for that step (bad data, e.g. a reward model scoring NaN on an odd
  input, need not end a long run).
- `at_step(stage, step)` puts the stage and step in front of the error's one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from stages.runtime import distributed


class NonFiniteError(RuntimeError):
    """A NaN or inf in a loss or a step's data (message is one line naming what and, via `at_step`, the step)."""


def require_finite(loss: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError unless `loss` is finite on every rank (call before its backward)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0, dtype=torch.float64)
    if float(distributed.all_reduce(bad, "max")) > 0:
        mine = loss.detach().flatten()[:1].tolist()
        raise NonFiniteError(
            f"non-finite {what} ({mine[0] if mine else 'on another rank'}) before its backward; "
            "the last committed checkpoint is kept"
        )


def nonfinite_counts(
    named: dict[str, torch.Tensor | None], mask_BT: torch.Tensor
) -> dict[str, tuple[int, int]]:
    """{name: (non-finite, total)} over all ranks, for the names with any non-finite entry.

    Per-token tensors [B, T] count the valid tokens only (`mask_BT`); per-row tensors [B] count rows.
    """
    names, counts = [], []
    for name, tensor in named.items():
        if tensor is None:
            continue
        valid = tensor[mask_BT[:, : tensor.shape[1]]] if tensor.dim() == 2 else tensor
        names.append(name)
        counts.append(torch.tensor([float((~torch.isfinite(valid)).sum()), float(valid.numel())]))
    if not names:
        return {}
    summed = distributed.all_reduce(torch.stack(counts).double()).tolist()
    return {name: (int(bad), int(total)) for name, (bad, total) in zip(names, summed, strict=True) if bad}


def describe(counts: dict[str, tuple[int, int]]) -> str:
    """`reward (1 of 32), advantages (640 of 640)`."""
    return ", ".join(f"{name} ({bad} of {total})" for name, (bad, total) in counts.items())


@contextmanager
def at_step(stage: str, step: int) -> Iterator[None]:
    """Re-raise a NonFiniteError from inside as `{stage} step {step}: ...`."""
    try:
        yield
    except NonFiniteError as err:
        raise NonFiniteError(f"{stage} step {step}: {err}") from None
