"""Benchmarks behind `rlpipe bench ...`: speed is measured here, never asserted in tests."""

from __future__ import annotations

import time

import torch

from stages.algorithms import compute_gae, length_adaptive_lambda


def per_timestep_gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    gamma: float,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward baseline: a Python loop over t, vectorised over the batch (right-padded masks)."""
    B, T = rewards_BT.shape
    weights_BT = mask_BT.to(values_BT.dtype)
    values_BT, rewards_BT = values_BT * weights_BT, rewards_BT * weights_BT
    advantages_BT = torch.zeros_like(values_BT)
    running_B = torch.zeros(B, dtype=values_BT.dtype)
    next_value_B = torch.zeros(B, dtype=values_BT.dtype)
    for t in reversed(range(T)):
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        running_B = delta_B + gamma * lam * running_B
        advantages_BT[:, t] = running_B
        next_value_B = values_BT[:, t]
    advantages_BT *= weights_BT
    return advantages_BT, (advantages_BT + values_BT) * weights_BT


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_gae(
    batch: int = 512,
    length: int = 16384,
    gamma: float = 1.0,
    lam: float = 0.95,
    adaptive_alpha: float | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Time `compute_gae` against `per_timestep_gae` on float32 inputs with random response lengths.

    Both are warmed up, then the best of `repeats` runs is taken. `max_rel_error` is
    max |vectorised - loop| / max |loop| (the loop itself carries float32 round-off).
    """
    gen = torch.Generator().manual_seed(seed)
    rewards_BT = torch.randn(batch, length, generator=gen)
    values_BT = torch.randn(batch, length, generator=gen)
    lengths_B = torch.randint(1, length + 1, (batch,), generator=gen)
    mask_BT = torch.arange(length) < lengths_B[:, None]
    lam_arg = length_adaptive_lambda(lengths_B, adaptive_alpha) if adaptive_alpha else lam

    compute_gae(rewards_BT[:, :128], values_BT[:, :128], mask_BT[:, :128], gamma, lam_arg)  # warm-up
    loop_s, (loop_adv, loop_ret) = _best_time(
        lambda: per_timestep_gae(rewards_BT, values_BT, mask_BT, gamma, lam_arg), repeats
    )
    fast_s, (fast_adv, fast_ret) = _best_time(
        lambda: compute_gae(rewards_BT, values_BT, mask_BT, gamma, lam_arg), repeats
    )
    rel_error = max(
        ((fast_adv - loop_adv).abs().max() / loop_adv.abs().max()).item(),
        ((fast_ret - loop_ret).abs().max() / loop_ret.abs().max()).item(),
    )
    return {
        "batch": batch,
        "length": length,
        "lambda": "length-adaptive" if adaptive_alpha else lam,
        "threads": torch.get_num_threads(),
        "loop_s": loop_s,
        "vectorised_s": fast_s,
        "speedup": loop_s / fast_s,
        "max_rel_error": rel_error,
    }
