"""Masked statistics over response tokens: sums, means, (global) moments, whitening, explained variance.

Masks are bool, True = the position counts. Values at masked positions never leak into a result.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask is True. Values at masked positions (even NaN/inf) never leak in."""
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    kept = torch.where(mask, x, zeros)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is True (over `dim`, or over everything).

    An empty selection gives 0 (not NaN), so an all-padding micro-batch cannot poison a loss.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the masked positions; Bessel-corrected by default (as trl and verl)."""
    mean = masked_mean(x, mask)
    count = mask.sum().to(x.dtype)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    *,
    moments: tuple[Tensor, Tensor] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (unbiased) variance over the masked positions.

    Whitening is over the whole global batch. In a multi-rank run the caller all-reduces
    (count, sum, sum of squares) from `masked_moments_sums` and passes the global
    `moments=(mean, var)`; this function never talks to other ranks.
    With `shift_mean=False` the mean is added back (only the scale changes), as in trl/verl.
    Positions outside the mask are transformed too (callers mask them out later).
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def masked_moments_sums(x: Tensor, mask: Tensor) -> Tensor:
    """[count, sum, sum of squares] of the masked values: all-reduce this, then `moments_from_sums`."""
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.stack([mask.sum().to(x.dtype), kept.sum(), (kept * kept).sum()])


def moments_from_sums(sums: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) from all-reduced `masked_moments_sums`."""
    count, total, total_sq = sums.unbind()
    mean = total / count.clamp(min=1)
    var = (total_sq - count * mean * mean) / (count - 1).clamp(min=1)
    return mean, var.clamp(min=0)


def explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over valid tokens: 1 is a perfect critic, 0 predicts the mean.

    NaN when the returns do not vary (every response got the same reward): there is nothing to
    explain, and a huge negative number from dividing by ~0 would only mislead.
    """
    var_returns = masked_var(returns_BT, mask_BT)
    var_residual = masked_var(returns_BT - values_BT, mask_BT)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1 - var_residual / var_returns.clamp(min=1e-30), nan)
