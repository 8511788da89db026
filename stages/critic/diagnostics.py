"""Value-model diagnostics: is the critic learning something that helps the policy?

Computed every PPO step (this rank's rows), and offline from any run's rollouts
(`value_diagnostics_from_rollouts`, which the evaluation report plots); the explained variance
over all ranks (`global_explained_variance`) is logged by critic warmup and PPO:

- value by absolute response-token position and by 20 percentile-of-length bins (token t of a
  response of length L falls in bin floor(20 t / L)), each split into correct and incorrect
  responses: a useful critic separates the two curves early in the response;
- advantage mean and std split by correctness;
- explained variance of the returns, and the value/return correlation.

NaN-safe: an empty group (no correct response this step, say) gives None, never NaN, and never
poisons the other figures. Pure tensor code apart from the final conversion to floats (and the
one all-reduce of `global_explained_variance`).
"""

from __future__ import annotations

import math

import torch

from stages.algorithms import explained_variance, masked_mean, masked_moments_sums, moments_from_sums
from stages.runtime import distributed

Tensor = torch.Tensor

LENGTH_BINS = 20
# Absolute positions reported as scalars (the full curve goes in the `*_by_position` lists).
POSITION_MARKS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _finite_or_none(value: Tensor | float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _group_mean_by(bins_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, n_bins: int) -> list[float | None]:
    """Mean of values per bin index over masked positions; None for empty bins."""
    index = bins_BT[mask_BT].long()
    sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, values_BT[mask_BT].double())
    counts = torch.zeros(n_bins, dtype=torch.float64).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64)
    )
    return [s / c if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)]


def _correlation(x_BT: Tensor, y_BT: Tensor, mask_BT: Tensor) -> float | None:
    x, y = x_BT[mask_BT].double(), y_BT[mask_BT].double()
    if x.numel() < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return _finite_or_none((x * y).sum() / denominator) if denominator > 0 else None


def value_diagnostics(
    values_BT: Tensor,
    returns_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    is_correct_B: Tensor,
) -> dict[str, float | None | list[float | None]]:
    """All diagnostics of one batch of rollouts (keys without a namespace; callers prefix them)."""
    mask_BT = mask_BT.bool()
    B, T = mask_BT.shape
    lengths_B = mask_BT.sum(dim=1)
    positions_BT = torch.arange(T).expand(B, T)
    length_bins_BT = (positions_BT * LENGTH_BINS // lengths_B.clamp(min=1)[:, None]).clamp(
        max=LENGTH_BINS - 1
    )
    groups = {"correct": is_correct_B.bool(), "incorrect": ~is_correct_B.bool()}

    out: dict[str, float | None | list[float | None]] = {
        "explained_var": _finite_or_none(explained_variance(values_BT, returns_BT, mask_BT))
        if mask_BT.sum() > 1
        else None,
        "value_return_corr": _correlation(values_BT, returns_BT, mask_BT),
        "value_mean": _finite_or_none(masked_mean(values_BT, mask_BT)) if mask_BT.any() else None,
    }
    for name, rows_B in groups.items():
        group_mask_BT = mask_BT & rows_B[:, None]
        has_tokens = bool(group_mask_BT.any())
        out[f"value_{name}"] = _finite_or_none(masked_mean(values_BT, group_mask_BT)) if has_tokens else None
        adv = advantages_BT[group_mask_BT].double()
        out[f"adv_mean_{name}"] = _finite_or_none(adv.mean()) if adv.numel() else None
        out[f"adv_std_{name}"] = _finite_or_none(adv.std(correction=0)) if adv.numel() else None
        by_position = _group_mean_by(positions_BT, values_BT, group_mask_BT, T)
        out[f"value_{name}_by_position"] = by_position
        out[f"value_{name}_by_length_bin"] = _group_mean_by(
            length_bins_BT, values_BT, group_mask_BT, LENGTH_BINS
        )
        for mark in POSITION_MARKS:
            if mark < T:
                out[f"value_{name}_pos{mark}"] = by_position[mark]
    return out


def scalar_metrics(diagnostics: dict, prefix: str) -> dict[str, float]:
    """The scalar, non-empty entries with a namespace, for metrics.jsonl and wandb (curves are left out)."""
    return {f"{prefix}/{k}": v for k, v in diagnostics.items() if isinstance(v, float)}


def padded(rows: list[list[float]], dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Ragged lists -> (right-padded tensor [B, T], mask [B, T])."""
    T = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), T, dtype=dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = True
    return values, mask


def value_diagnostics_from_rollouts(table) -> dict[str, float | None | list[float | None]]:
    """The same diagnostics from stored rollouts (a pyarrow table of schema v1, e.g. `read_rollouts`)."""
    columns = table.select(["values", "returns", "advantages", "is_correct"]).to_pydict()
    keep = [i for i, v in enumerate(columns["values"]) if v]  # GRPO rollouts have no values
    values, mask = padded([columns["values"][i] for i in keep])
    returns, _ = padded([columns["returns"][i] for i in keep])
    advantages, _ = padded([columns["advantages"][i] for i in keep])
    is_correct = torch.tensor([bool(columns["is_correct"][i]) for i in keep], dtype=torch.bool)
    return value_diagnostics(values, returns, advantages, mask, is_correct)


def global_explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the valid tokens of all ranks (collective).

    NaN when the returns do not vary (every response got the same reward): there is nothing to
    explain, and `1 - residual / eps` would read as a great or a terrible critic at random.
    """
    sums = torch.stack(
        [masked_moments_sums(returns_BT, mask_BT), masked_moments_sums(returns_BT - values_BT, mask_BT)]
    ).double()
    (_, var_returns), (_, var_residual) = map(moments_from_sums, distributed.all_reduce(sums).unbind())
    return float("nan") if var_returns <= 1e-12 else float(1 - var_residual / var_returns)
