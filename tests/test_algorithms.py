"""The RL math, checked against values derived by hand (in the comments) and against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from stages.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    compute_decoupled_gae,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    grpo_advantages,
    kl_penalty,
    length_adaptive_lambda,
    masked_mean,
    masked_moments_sums,
    masked_whiten,
    moments_from_sums,
    outcome_rewards_to_tokens,
    policy_loss,
    positive_example_lm_loss,
    truncated_importance_weights,
    value_loss,
)

TOL = dict(atol=1e-6, rtol=0)
F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def reference_gae(rewards, values, mask, gamma, lam):
    """Independent plain loop: walk each row's valid tokens backwards (skipping masked ones)."""
    B, T = rewards.shape
    lam_B = torch.as_tensor(lam, dtype=F64).expand(B)
    adv = torch.zeros(B, T, dtype=F64)
    ret = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        valid = [i for i in range(T) if mask[b, i]]
        running = 0.0
        for k in reversed(range(len(valid))):
            i = valid[k]
            next_value = values[b, valid[k + 1]].item() if k + 1 < len(valid) else 0.0
            delta = rewards[b, i].item() + gamma * next_value - values[b, i].item()
            running = delta + gamma * lam_B[b].item() * running
            adv[b, i] = running
            ret[b, i] = running + values[b, i].item()
    return adv, ret


# ---------------------------------------------------------------------------------------------
# GAE on a 2 x 4 example worked out by hand.
# Row 0: 4 valid tokens, r = [0, 0, 0, 1], V = [0.5, 0.6, 0.7, 0.8].
# Row 1: 2 valid tokens, r = [0, 2], V = [1.0, 0.5]; padding holds garbage (9, 7) that must not matter.
# ---------------------------------------------------------------------------------------------
REWARDS = t([[0, 0, 0, 1], [0, 2, 9, 9]])
VALUES = t([[0.5, 0.6, 0.7, 0.8], [1.0, 0.5, 7, 7]])
MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])

GAE_CASES = {
    # gamma=1, lam=0.95. Row 0: deltas 0.6-0.5=0.1, 0.1, 0.1, 1-0.8=0.2;
    #   A3=0.2, A2=0.1+0.95*0.2=0.29, A1=0.1+0.95*0.29=0.3755, A0=0.1+0.95*0.3755=0.456725.
    # Row 1: deltas 0.5-1.0=-0.5, 2-0.5=1.5; A1=1.5, A0=-0.5+0.95*1.5=0.925. Returns = A + V.
    (1.0, 0.95): (
        [[0.456725, 0.3755, 0.29, 0.2], [0.925, 1.5, 0, 0]],
        [[0.956725, 0.9755, 0.99, 1.0], [1.925, 2.0, 0, 0]],
    ),
    # gamma=0.99, lam=1: returns are discounted Monte-Carlo returns 0.99^(3-t) (row 0), 0.99*2 (row 1).
    # Row 0 deltas: 0.99*0.6-0.5=0.094, 0.99*0.7-0.6=0.093, 0.99*0.8-0.7=0.092, 0.2;
    #   A2=0.092+0.99*0.2=0.29, A1=0.093+0.99*0.29=0.3801, A0=0.094+0.99*0.3801=0.470299.
    # Row 1: A1=1.5, A0=0.99*0.5-1.0+0.99*1.5=0.98.
    (0.99, 1.0): (
        [[0.470299, 0.3801, 0.29, 0.2], [0.98, 1.5, 0, 0]],
        [[0.970299, 0.9801, 0.99, 1.0], [1.98, 2.0, 0, 0]],
    ),
    # gamma=1, lam=0: A = delta (one-step TD), returns = r + V_{t+1}.
    (1.0, 0.0): (
        [[0.1, 0.1, 0.1, 0.2], [-0.5, 1.5, 0, 0]],
        [[0.6, 0.7, 0.8, 1.0], [0.5, 2.0, 0, 0]],
    ),
}


@pytest.mark.parametrize("gamma,lam", list(GAE_CASES))
def test_gae_hand_computed(gamma, lam):
    expected_adv, expected_ret = GAE_CASES[(gamma, lam)]
    adv, ret = compute_gae(REWARDS, VALUES, MASK, gamma, lam)
    torch.testing.assert_close(adv, t(expected_adv), **TOL)
    torch.testing.assert_close(ret, t(expected_ret), **TOL)


def test_gae_per_sequence_lambda():
    # Row 0 with lam 0.95 and row 1 with lam 0 (gamma 1): rows of the first and third cases.
    adv, ret = compute_gae(REWARDS, VALUES, MASK, 1.0, t([0.95, 0.0]))
    torch.testing.assert_close(adv, t([[0.456725, 0.3755, 0.29, 0.2], [-0.5, 1.5, 0, 0]]), **TOL)
    torch.testing.assert_close(ret, t([[0.956725, 0.9755, 0.99, 1.0], [0.5, 2.0, 0, 0]]), **TOL)


def test_gae_masked_positions_change_nothing_and_outputs_are_zero_there():
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 37
    rewards, values = torch.randn(B, T, generator=gen, dtype=F64), torch.randn(B, T, generator=gen, dtype=F64)
    mask = torch.rand(B, T, generator=gen) < 0.7  # with holes
    mask[:, -5:] = False  # and padding
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.9)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    noisy_rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    noisy_values = torch.where(mask, values, torch.full_like(values, -3e5))
    adv2, ret2 = compute_gae(noisy_rewards, noisy_values, mask, 0.99, 0.9)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


@pytest.mark.parametrize("T", [1, 3, 64, 65, 200, 4500])  # one block, block edges, 2 and 3 levels of the scan
@pytest.mark.parametrize("holes", [False, True])
def test_gae_equals_plain_loop_on_random_inputs(T, holes):
    gen = torch.Generator().manual_seed(T)
    B = 4 if T < 1000 else 2
    rewards, values = torch.randn(B, T, generator=gen, dtype=F64), torch.randn(B, T, generator=gen, dtype=F64)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=gen) < 0.8
    for lam in [0.95, torch.rand(B, generator=gen, dtype=F64)]:
        adv, ret = compute_gae(rewards, values, mask, 0.99, lam)
        ref_adv, ref_ret = reference_gae(rewards, values, mask, 0.99, lam)
        torch.testing.assert_close(adv, ref_adv, atol=1e-9, rtol=0)
        torch.testing.assert_close(ret, ref_ret, atol=1e-9, rtol=0)


def test_gae_float32_long_sequences_match_float64():
    gen = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(8, 3000, generator=gen), torch.randn(8, 3000, generator=gen)
    mask = torch.ones(8, 3000, dtype=torch.bool)
    adv32, _ = compute_gae(rewards, values, mask, 1.0, 0.999)
    adv64, _ = compute_gae(rewards.double(), values.double(), mask, 1.0, 0.999)
    assert adv32.dtype == torch.float32
    assert (adv32.double() - adv64).abs().max() <= 1e-4 * adv64.abs().max()


def test_decoupled_gae_uses_policy_lambda_for_advantages_and_critic_lambda_for_returns():
    adv, ret = compute_decoupled_gae(REWARDS, VALUES, MASK, 1.0, lam_policy=0.0, lam_critic=0.95)
    torch.testing.assert_close(adv, t(GAE_CASES[(1.0, 0.0)][0]), **TOL)
    torch.testing.assert_close(ret, t(GAE_CASES[(1.0, 0.95)][1]), **TOL)


def test_length_adaptive_lambda():
    # alpha = 0.05: L=200 -> 1 - 1/10 = 0.9; L=20 -> 1 - 1/1 = 0; L=10 -> -1, clamped to 0; L=0 -> 0.
    lam = length_adaptive_lambda(torch.tensor([200, 20, 10, 0, 1000]), 0.05)
    torch.testing.assert_close(lam, torch.tensor([0.9, 0.0, 0.0, 0.0, 0.98]), **TOL)
    huge = length_adaptive_lambda(
        torch.tensor([1e12, 1e30]), 0.05
    )  # 1 - 1/(alpha L) rounds to 1.0 in float32
    assert (huge < 1).all()


def test_outcome_reward_lands_on_last_valid_token():
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    rewards = outcome_rewards_to_tokens(t([1.0, 2.0, 3.0]), mask)
    torch.testing.assert_close(rewards, t([[0, 0, 1], [2, 0, 0], [0, 0, 0]]), **TOL)


# ---------------------------------------------------------------------------------------------
# Policy loss. clip_low=0.2, clip_high=0.28 (clip-higher); old logprobs 0 so r = exp(logp).
#   token  r    A   -A*r   -A*clip(r,0.8,1.28)  loss   branch    d loss/d logp (= -A*r if unclipped)
#   0     1.0  +1   -1.0   -1.0                 -1.0   none       -1.0
#   1     1.5  +1   -1.5   -1.28                -1.28  clipped     0
#   2     0.5  -1   +0.5   +0.8                 +0.8   clipped     0
#   3     1.1  -1   +1.1   +1.1                 +1.1   none       +1.1
#   4     0.5  +1   -0.5   -0.8                 -0.5   unclipped  -0.5   (pessimistic bound keeps it)
#   5     1.5  -1   +1.5   +1.28                +1.5   unclipped  +1.5
#   6     (masked, garbage)
# sum = 0.62 over 6 tokens -> token_mean 0.1033333; clipfrac 2/6.
# ---------------------------------------------------------------------------------------------
RATIOS = [1.0, 1.5, 0.5, 1.1, 0.5, 1.5, 3.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 5.0]
PG_MASK = torch.tensor([[True] * 6 + [False]])


def test_policy_loss_hand_computed_with_gradients():
    logprobs = torch.log(t([RATIOS])).requires_grad_(True)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 7, dtype=F64), t([ADVANTAGES]), PG_MASK, 0.2, 0.28)
    torch.testing.assert_close(loss, t(0.62 / 6), **TOL)
    torch.testing.assert_close(stats["clipfrac"], t(2 / 6), **TOL)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    expected_grad = t([[-1.0, 0.0, 0.0, 1.1, -0.5, 1.5, 0.0]]) / 6  # zero at clipped and masked tokens
    torch.testing.assert_close(logprobs.grad, expected_grad, **TOL)


def test_policy_loss_clip_higher_differs_from_symmetric_clip():
    # r = 1.25, A = +1: inside [0.8, 1.28] -> loss -1.25; symmetric 0.2 clips it to -1.2.
    logprobs, old, adv, mask = torch.log(t([[1.25]])), t([[0.0]]), t([[1.0]]), torch.tensor([[True]])
    torch.testing.assert_close(policy_loss(logprobs, old, adv, mask, 0.2, 0.28)[0], t(-1.25), **TOL)
    torch.testing.assert_close(policy_loss(logprobs, old, adv, mask, 0.2, 0.2)[0], t(-1.2), **TOL)


def test_aggregations_on_unequal_lengths():
    # Per-token losses [[1, 2, 3], [4, -, -]] (ratio 1, advantage = -loss):
    # token_mean = 10/4 = 2.5; seq_mean_token_mean = mean(6/3, 4/1) = 3; seq_mean_token_sum = mean(6, 4) = 5.
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = t([[-1, -2, -3], [-4, 100, 100]])
    zeros = torch.zeros(2, 3, dtype=F64)
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum": 5.0}
    for agg, value in expected.items():
        torch.testing.assert_close(policy_loss(zeros, zeros, adv, mask, 0.2, 0.2, agg)[0], t(value), **TOL)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(zeros, mask, "mean")


def test_token_mean_with_global_count_makes_accumulation_equal_one_big_batch():
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 9
    logits = torch.randn(B, T, generator=gen, dtype=F64)
    old, adv = (
        torch.randn(B, T, generator=gen, dtype=F64) * 0.1 + logits,
        torch.randn(B, T, generator=gen, dtype=F64),
    )
    mask = torch.arange(T) < torch.tensor([9, 1, 4, 7, 2, 9])[:, None]  # very unequal micro-batches

    full = logits.clone().requires_grad_(True)
    policy_loss(full, old, adv, mask, 0.2, 0.28)[0].backward()

    accumulated = logits.clone().requires_grad_(True)
    naive = logits.clone().requires_grad_(True)
    total_tokens = mask.sum()  # summed over micro-batches (and all-reduced over ranks in a real run)
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        policy_loss(
            accumulated[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28, global_count=total_tokens
        )[0].backward()
        (policy_loss(naive[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28)[0] / 3).backward()
    torch.testing.assert_close(accumulated.grad, full.grad, atol=1e-12, rtol=0)
    assert not torch.allclose(naive.grad, full.grad, atol=1e-6)  # averaging micro-batch means is wrong


# ---------------------------------------------------------------------------------------------
# Value loss, clip 0.5:
#   V    V_old  R    (V-R)^2  clip(V, V_old±0.5)  (Vc-R)^2  0.5*max   branch
#   1.0  1.2    2.0  1.0      1.0                 1.0       0.5      equal (not counted as clipped)
#   2.0  1.0    2.0  0.0      1.5                 0.25      0.125    clipped: gradient 0
#   0.0  0.0    1.0  1.0      0.0                 1.0       0.5      equal
#   3.0  2.8    0.0  9.0      3.0 (inside)        9.0       4.5      equal
#  mean = 5.625/4 = 1.40625; clipfrac 1/4. Unclipped: 0.5*(1+0+1+9)/4 = 1.375.
# ---------------------------------------------------------------------------------------------
def test_value_loss_clipped_and_unclipped():
    values = t([[1.0, 2.0, 0.0, 3.0]]).requires_grad_(True)
    old, returns, mask = (
        t([[1.2, 1.0, 0.0, 2.8]]),
        t([[2.0, 2.0, 1.0, 0.0]]),
        torch.ones(1, 4, dtype=torch.bool),
    )
    loss, stats = value_loss(values, old, returns, mask, 0.5)
    torch.testing.assert_close(loss, t(1.40625), **TOL)
    torch.testing.assert_close(stats["clipfrac"], t(0.25), **TOL)
    loss.backward()
    # d/dV of 0.5*(V-R)^2 / 4 = (V-R)/4 where unclipped; 0 where the clipped branch wins.
    torch.testing.assert_close(values.grad, t([[-0.25, 0.0, -0.25, 0.75]]), **TOL)
    unclipped, _ = value_loss(values, old, returns, mask, None)
    torch.testing.assert_close(unclipped, t(1.375), **TOL)


def test_value_loss_clipped_branch_can_be_the_larger_one():
    # V=0.0, V_old=1.0, R=0.2, clip 0.3: unclipped 0.04; clip(V) = 0.7 -> 0.25, so 0.5*0.25 = 0.125.
    loss, stats = value_loss(t([[0.0]]), t([[1.0]]), t([[0.2]]), torch.tensor([[True]]), 0.3)
    torch.testing.assert_close(loss, t(0.125), **TOL)
    torch.testing.assert_close(stats["clipfrac"], t(1.0), **TOL)


# ---------------------------------------------------------------------------------------------
# KL estimators. logp = -1, ref = -2: k1 = 1, k2 = 0.5, k3 = exp(-1) - (-1) - 1 = e^-1.
# ---------------------------------------------------------------------------------------------
def test_kl_estimators_hand_computed():
    logp, ref = t([[-1.0]]), t([[-2.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([[1.0]]), **TOL)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([[0.5]]), **TOL)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([[math.exp(-1)]]), **TOL)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_kl_zero_when_equal_k3_nonnegative_and_k2_gradient_is_k1():
    gen = torch.Generator().manual_seed(4)
    logp, ref = torch.randn(3, 5, generator=gen, dtype=F64), torch.randn(3, 5, generator=gen, dtype=F64)
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp, estimator), torch.zeros_like(logp))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    logp_leaf = logp.clone().requires_grad_(True)
    kl_penalty(logp_leaf, ref, "k2").sum().backward()
    torch.testing.assert_close(logp_leaf.grad, kl_penalty(logp, ref, "k1"), **TOL)


# ---------------------------------------------------------------------------------------------
# GRPO. Group 7: scores [1, 0, 1, 0], mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = sqrt(1/3):
# advantages +-0.5 / (sqrt(1/3) + 1e-6). Group 3: constant -> 0. Group 5: size 1 -> 0.
# ---------------------------------------------------------------------------------------------
def test_grpo_advantages():
    scores = t([1, 5, 0, 1, 5, 0, 3])
    groups = torch.tensor([7, 3, 7, 7, 3, 7, 5])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    adv = grpo_advantages(scores, groups)
    torch.testing.assert_close(adv, t([a, 0, -a, a, 0, -a, 0]), **TOL)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(
        grpo_advantages(scores, groups, scale="none"), t([0.5, 0, -0.5, 0.5, 0, -0.5, 0]), **TOL
    )
    singletons = grpo_advantages(t([3.0, 4.0]), torch.tensor([0, 1]))
    assert torch.equal(singletons, torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Bradley-Terry: equal scores -> -log sigmoid(0) = log 2; gap 1 -> log(1 + e^-1) = 0.3132617;
# a margin of 1 on gap 1 -> back to log 2.
# ---------------------------------------------------------------------------------------------
def test_bradley_terry():
    torch.testing.assert_close(bradley_terry_loss(t([0.3, -2.0]), t([0.3, -2.0]))[0], t(math.log(2)), **TOL)
    loss, stats = bradley_terry_loss(t([1.0]), t([0.0]))
    torch.testing.assert_close(loss, t(math.log1p(math.exp(-1))), **TOL)
    torch.testing.assert_close(stats["accuracy"], t(1.0), **TOL)
    torch.testing.assert_close(bradley_terry_loss(t([1.0]), t([0.0]), t([1.0]))[0], t(math.log(2)), **TOL)


# ---------------------------------------------------------------------------------------------
# The rest: entropy, whitening, masked mean, positive-example LM loss, explained variance.
# ---------------------------------------------------------------------------------------------
def test_entropy_from_logits():
    # Uniform over 4: log 4. Probabilities [1/4, 3/4] (logits 0, ln 3): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351.
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(logits[:, :1]), t([[math.log(4)]]), **TOL)
    probs = t([0.25, 0.75])
    expected = -(probs * probs.log()).sum()
    torch.testing.assert_close(entropy_from_logits(logits[:, 1:, :2]), expected.reshape(1, 1), **TOL)


def test_masked_whiten_and_global_moments():
    # x = [1, 2, 3, 4] (+ a masked 100): mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3.
    x, mask = t([1, 2, 3, 4, 100]), torch.tensor([True, True, True, True, False])
    expected = (t([1, 2, 3, 4]) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask)[:4], expected, **TOL)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[:4], expected + 2.5, **TOL)
    # Two "ranks" all-reduce their sums: the same result as whitening the union.
    sums = masked_moments_sums(x[:2], mask[:2]) + masked_moments_sums(x[2:], mask[2:])
    torch.testing.assert_close(masked_whiten(x, mask, moments=moments_from_sums(sums))[:4], expected, **TOL)


def test_masked_mean_ignores_nan_at_masked_positions():
    x, mask = t([[1.0, float("nan")], [3.0, float("inf")]]), torch.tensor([[True, False], [True, False]])
    torch.testing.assert_close(masked_mean(x, mask), t(2.0), **TOL)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t([1.0, 3.0]), **TOL)
    assert masked_mean(x, torch.zeros_like(mask)) == 0


def test_positive_example_lm_loss():
    # Only row 0 is correct: NLL token mean (1 + 2) / 2 = 1.5, times coef 0.5 = 0.75.
    logprobs = t([[-1.0, -2.0], [-3.0, -4.0]]).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = positive_example_lm_loss(logprobs, mask, torch.tensor([True, False]), 0.5)
    torch.testing.assert_close(loss, t(0.75), **TOL)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[-0.25, -0.25], [0.0, 0.0]]), **TOL)
    none_correct, _ = positive_example_lm_loss(logprobs, mask, torch.tensor([False, False]), 0.5)
    assert none_correct == 0


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(explained_variance(returns, returns, mask), t(1.0), **TOL)
    torch.testing.assert_close(
        explained_variance(torch.full_like(returns, 2.0), returns, mask), t(0.0), **TOL
    )


def test_explained_variance_of_constant_returns_is_nan():
    returns, mask = t([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)
    assert torch.isnan(explained_variance(t([[0.0, 2.0, 5.0]]), returns, mask))


def test_truncated_importance_weights_by_hand():
    # trainer 0.5 vs sampler 0.25 -> 2.0, capped at 1.5; trainer 0.2 vs sampler 0.4 -> 0.5, kept
    old = torch.log(t([[0.5, 0.2]]))
    sampler = torch.log(t([[0.25, 0.4]]))
    torch.testing.assert_close(truncated_importance_weights(old, sampler, cap=1.5), t([[1.5, 0.5]]), **TOL)
    assert not truncated_importance_weights(old.requires_grad_(), sampler, cap=1.5).requires_grad


def test_policy_loss_weighs_each_token_by_its_importance_weight():
    # ratio 1 (logp == old): per-token loss -A = [-1, 1]; weights [1.5, 0.5] -> [-1.5, 0.5]; token mean -0.5
    logprobs = torch.log(t([[0.5, 0.2]])).requires_grad_()
    advantages, mask = t([[1.0, -1.0]]), torch.tensor([[True, True]])
    weights = t([[1.5, 0.5]])
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, 0.2, weights_BT=weights)
    torch.testing.assert_close(loss, t(-0.5), **TOL)
    loss.backward()  # d/dlogp of -A * exp(logp - old) * w / 2 at ratio 1: -A * w / 2
    torch.testing.assert_close(logprobs.grad, t([[-0.75, 0.25]]), **TOL)
    unweighted, _ = policy_loss(logprobs.detach(), logprobs.detach(), advantages, mask, 0.2, 0.2)
    torch.testing.assert_close(unweighted, t(0.0), **TOL)
