"""Per-token rewards and advantages: the outcome on the last token, GAE (blocked scan, decoupled,
length-adaptive lambda) and GRPO's group-normalised outcome.

Shape suffixes: B batch, T response tokens, G groups. See the package docstring for the
alignment conventions (value t is V(state before token t); the outcome lands on the last token).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Block size of the chunked scan in `_reverse_discounted_cumsum`: each block is one small
# matrix product; the carries between blocks are the same problem, T / 64 times shorter.
_SCAN_BLOCK = 64


def last_token_index(mask_BT: Tensor) -> Tensor:
    """Index of the last True position in each row ([B], int64); -1 for an empty row."""
    positions = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT, positions, torch.full_like(positions, -1)).amax(dim=1)


def outcome_rewards_to_tokens(scores_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-token rewards [B, T]: each sequence's scalar score on its last valid token, 0 elsewhere.

    The last valid token is the EOS, or the last token of a truncated response: never padding.
    A row without any valid token gets no reward.
    """
    rewards_BT = torch.zeros(mask_BT.shape, dtype=scores_B.dtype, device=scores_B.device)
    last_B = last_token_index(mask_BT)
    has_tokens_B = last_B >= 0
    rows = torch.arange(mask_BT.shape[0], device=mask_BT.device)[has_tokens_B]
    rewards_BT[rows, last_B[has_tokens_B]] = scores_B[has_tokens_B]
    return rewards_BT


def _reverse_discounted_cumsum(x_BT: Tensor, discount_B: Tensor, uniform: bool) -> Tensor:
    """y_t = x_t + discount * y_{t+1}, with y_T = 0, for every row: fully vectorised.

    A blocked scan: within a block of C steps the recurrence is one matrix product with the
    upper-triangular matrix M[i, j] = discount^(j - i); the value at the start of each block,
    which carries into the block before it, obeys the same recurrence with discount^C over
    T / C block starts, solved recursively. Cost: O(B T C) flops in large matrix products and
    about log_C(T) levels instead of T sequential steps. Powers never exceed C, so nothing
    overflows (unlike the cumsum-of-discount^-t trick) even at T = 16k with discount 0.95.
    `uniform` (all rows share one discount) lets the whole batch use a single 2-D GEMM.
    """
    B, T = x_BT.shape
    C = min(_SCAN_BLOCK, T)
    n_blocks = -(-T // C)
    if n_blocks * C != T:
        x_BT = F.pad(x_BT, (0, n_blocks * C - T))
    blocks_BNC = x_BT.contiguous().view(B, n_blocks, C)

    offsets_C = torch.arange(C, device=x_BT.device)
    gaps_CC = (offsets_C[None, :] - offsets_C[:, None]).to(x_BT.dtype)  # j - i
    upper_CC = gaps_CC >= 0
    zero = torch.zeros((), dtype=x_BT.dtype, device=x_BT.device)
    if uniform:
        transfer_CC = torch.where(upper_CC, discount_B[0] ** gaps_CC.clamp(min=0), zero)
        # local[b, n, i] = sum_j transfer[i, j] * blocks[b, n, j]
        local_BNC = (blocks_BNC.view(B * n_blocks, C) @ transfer_CC.T).view(B, n_blocks, C)
    else:
        transfer_BCC = torch.where(upper_CC, discount_B[:, None, None] ** gaps_CC.clamp(min=0), zero)
        local_BNC = torch.matmul(blocks_BNC, transfer_BCC.transpose(1, 2))

    if n_blocks > 1:
        block_starts_BN = _reverse_discounted_cumsum(local_BNC[:, :, 0], discount_B**C, uniform)
        # Each block also receives the value at the start of the next block, discounted by its distance.
        incoming_BN1 = F.pad(block_starts_BN[:, 1:], (0, 1)).unsqueeze(2)
        tail_powers_B1C = (discount_B[:, None] ** (C - offsets_C).to(x_BT.dtype)).unsqueeze(1)
        local_BNC.baddbmm_(incoming_BN1, tail_powers_B1C)  # in place: no full-size temporary
    return local_BNC.view(B, n_blocks * C)[:, :T]


def _compact_valid_tokens(mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Order that moves each row's valid tokens to the front (stable), and the compacted mask."""
    order_BT = torch.argsort((~mask_BT).to(torch.int8), dim=1, stable=True)
    lengths_B = mask_BT.sum(dim=1)
    compact_mask_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device) < lengths_B[:, None]
    return order_BT, compact_mask_BT


def compute_gae(
    rewards_BT: Tensor,
    values_BT: Tensor,
    mask_BT: Tensor,
    gamma: float,
    lam: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16) over response tokens.

    Args:
        rewards_BT: per-token rewards (outcome on the last token, optional per-token KL).
        values_BT: V(s_t) for each response token t (read from position prompt_len + t - 1).
        mask_BT: True on valid response tokens.
        gamma: discount.
        lam: GAE lambda, a float or a per-sequence tensor [B] (length-adaptive GAE, VAPO).

    Recurrence over the valid tokens of each row only:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    with V and A taken as 0 beyond the last valid token (the episode ends there). Masked
    positions inside a row are skipped, as if absent. returns = A + V (the critic's targets).

    Returns (advantages_BT, returns_BT), both 0 where mask is False. Rewards and values at
    masked positions never influence the result. Vectorised (see `_reverse_discounted_cumsum`):
    B=512 x T=16k in well under a second on two CPU cores (`rlpipe bench gae`).
    """
    mask_BT = mask_BT.bool()
    B, T = mask_BT.shape
    dtype = values_BT.dtype if values_BT.is_floating_point() else torch.float32
    if T == 0:
        empty = torch.zeros((B, 0), dtype=dtype, device=values_BT.device)
        return empty, empty.clone()
    uniform = not isinstance(lam, Tensor) or lam.numel() == 1
    lam_B = torch.as_tensor(lam, dtype=dtype, device=values_BT.device).reshape(-1).expand(B)

    # A hole is a valid token after an invalid one; without holes the mask is a prefix per row.
    holes = bool((mask_BT[:, 1:] & ~mask_BT[:, :-1]).any())
    if holes:
        order_BT, mask_BT = _compact_valid_tokens(mask_BT)
        rewards_BT, values_BT = rewards_BT.gather(1, order_BT), values_BT.gather(1, order_BT)
    weights_BT = mask_BT.to(dtype)

    # Minimal number of passes over [B, T]: these tensors are large (512 x 16k), so every
    # elementwise op is memory-bound and done in place.
    masked_values_BT = values_BT.to(dtype) * weights_BT  # V, 0 after the last valid token
    deltas_BT = torch.sub(rewards_BT.to(dtype), masked_values_BT)
    deltas_BT[:, :-1].add_(masked_values_BT[:, 1:], alpha=gamma)  # + gamma * V_{t+1}
    deltas_BT.mul_(weights_BT)
    # Deltas are 0 beyond the last valid token, so advantages there come out exactly 0.
    advantages_BT = _reverse_discounted_cumsum(deltas_BT, gamma * lam_B, uniform)
    returns_BT = advantages_BT + masked_values_BT

    if holes:
        inverse_BT = torch.argsort(order_BT, dim=1)
        advantages_BT, returns_BT = advantages_BT.gather(1, inverse_BT), returns_BT.gather(1, inverse_BT)
    return advantages_BT, returns_BT


def compute_decoupled_gae(
    rewards_BT: Tensor,
    values_BT: Tensor,
    mask_BT: Tensor,
    gamma: float,
    lam_policy: float | Tensor,
    lam_critic: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Decoupled GAE (VAPO section 3.2): advantages with lam_policy, value targets with lam_critic.

    The policy benefits from a lower-variance lambda < 1 (or the length-adaptive one) while the
    critic regresses onto unbiased lam_critic = 1.0 returns (Monte-Carlo for outcome rewards).
    Returns (advantages_BT from lam_policy, returns_BT from lam_critic).
    """
    advantages_BT, returns_policy_BT = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lam_policy)
    same_lambda = isinstance(lam_policy, float) and isinstance(lam_critic, float) and lam_policy == lam_critic
    if same_lambda:
        return advantages_BT, returns_policy_BT
    _, returns_BT = compute_gae(rewards_BT, values_BT, mask_BT, gamma, lam_critic)
    return advantages_BT, returns_BT


def length_adaptive_lambda(lengths_B: Tensor, alpha: float) -> Tensor:
    """Length-adaptive GAE lambda (VAPO eq. 7): lam = 1 - 1 / (alpha * length), clamped to [0, 1).

    Longer responses get lambda closer to 1 so the outcome reward reaches early tokens
    (alpha = 0.05: length 200 -> 0.9; length <= 20 -> 0). The upper clamp keeps lambda < 1
    even where 1 - 1/(alpha*L) rounds to 1.0 in the tensor's precision.
    """
    dtype = lengths_B.dtype if lengths_B.is_floating_point() else torch.float32
    lengths_B = lengths_B.to(dtype)
    lam_B = 1.0 - 1.0 / (alpha * lengths_B)
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    return torch.clamp(lam_B.nan_to_num(nan=0.0, neginf=0.0), min=torch.zeros_like(below_one), max=below_one)


def grpo_advantages(
    scores_B: Tensor,
    group_ids_B: Tensor,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages (GRPO, DeepSeekMath arXiv 2402.03300): score minus its group's mean,
    divided by the group's standard deviation (Bessel-corrected, as trl and verl) + eps when scale="std".

    Group ids may be any integers in any order. A group of size 1, or whose scores are all
    equal, gets advantage 0 (never NaN). scale="none" is Dr. GRPO's unscaled variant.
    """
    _, group_index_B = torch.unique(group_ids_B, return_inverse=True)
    n_groups = int(group_index_B.max()) + 1 if group_index_B.numel() else 0
    dtype = scores_B.dtype if scores_B.is_floating_point() else torch.float32
    scores_B = scores_B.to(dtype)
    counts_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(
        0, group_index_B, torch.ones_like(scores_B)
    )
    sums_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(0, group_index_B, scores_B)
    means_B = (sums_G / counts_G)[group_index_B]
    centred_B = scores_B - means_B
    if scale == "none":
        return centred_B
    if scale != "std":
        raise ValueError(f"grpo_advantages: unknown scale {scale!r} (expected 'std' or 'none')")
    sq_G = torch.zeros(n_groups, dtype=dtype, device=scores_B.device).index_add_(
        0, group_index_B, centred_B**2
    )
    std_G = torch.sqrt(sq_G / (counts_G - 1).clamp(min=1))
    return centred_B / (std_G[group_index_B] + eps)
