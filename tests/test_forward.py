"""Training forwards: token layout, the logprob/value position shift, temperature, micro-batching.

The references are computed one sequence at a time, unpadded, with a Python loop: an
off-by-one in the alignment or a padding leak changes the numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_PAD_ID, make_tiny_qwen2
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from stages.models.forward import (
    build_token_batch,
    response_logprobs,
    response_values,
)
from stages.models.value_head import PolicyWithValueHead, per_position_values

# Prompt lengths vary (1..9) so a one-position shift reads a different token in every row;
# lengths differ a lot (2..33 tokens) so most of the batch is padding. One empty response.
PROMPTS = [[3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21], [30, 31, 32, 33]]
RESPONSES = [
    [40, 41, 1],
    [
        42,
        43,
        44,
        45,
        46,
        47,
        48,
        49,
        50,
        51,
        52,
        53,
        54,
        55,
        56,
        57,
        58,
        59,
        60,
        61,
        62,
        63,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        1,
    ],
    [12, 1],
    [],
    [22, 23, 24, 25, 26, 1],
]


@pytest.fixture(scope="module")
def batch():
    return build_token_batch(PROMPTS, RESPONSES, pad_id=TINY_PAD_ID)


@pytest.fixture(scope="module")
def policy():
    return make_tiny_qwen2(seed=0)


@pytest.fixture(scope="module")
def critic():
    """A separate critic: own (different) backbone, non-zero score head."""
    lm = make_tiny_qwen2(seed=11)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    model = Qwen2ForSequenceClassification(config)
    model.model.load_state_dict(lm.model.state_dict())
    torch.manual_seed(12)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_build_token_batch_layout():
    b = build_token_batch([[5, 6], [7]], [[8, 9, 1], [10]], pad_id=0)
    assert torch.equal(b.input_ids_BL, torch.tensor([[5, 6, 8, 9, 1], [7, 10, 0, 0, 0]]))
    assert torch.equal(
        b.attention_mask_BL, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    )
    assert torch.equal(b.position_ids_BL, torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]))
    assert torch.equal(b.prompt_lens_B, torch.tensor([2, 1])) and torch.equal(
        b.response_lens_B, torch.tensor([3, 1])
    )
    assert torch.equal(b.response_ids_BT, torch.tensor([[8, 9, 1], [10, 0, 0]]))
    assert torch.equal(b.response_mask_BT, torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool))
    # token t at prompt_len + t is predicted from prompt_len + t - 1: row 0 -> 1, 2, 3; row 1 -> 0, then clamped to its last token (1)
    assert torch.equal(b.logit_positions_BT[0], torch.tensor([1, 2, 3])) and torch.equal(
        b.logit_positions_BT[1], torch.tensor([0, 1, 1])
    )
    with pytest.raises(ValueError, match="at least one token"):
        build_token_batch([[]], [[1]], pad_id=0)


# ---------------------------------------------------------------------------------------------
# alignment against a per-sequence loop
# ---------------------------------------------------------------------------------------------
def _reference_logprobs(policy, temperature: float = 1.0):
    """log_softmax(model(full).logits / temperature)[prompt_len + t - 1, response_t], one sequence at a time."""
    logprobs, entropies = [], []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
            logits = policy(torch.tensor([prompt + response])).logits[0] / temperature
            logp = torch.log_softmax(logits, dim=-1)
            row_lp, row_ent = [], []
            for t, token in enumerate(response):
                row_lp.append(logp[len(prompt) + t - 1, token])
                row_ent.append(-(logp[len(prompt) + t - 1].exp() * logp[len(prompt) + t - 1]).sum())
            logprobs.append(row_lp)
            entropies.append(row_ent)
    return logprobs, entropies


def _assert_rows_match(out_BT: torch.Tensor, reference: list[list[torch.Tensor]], atol: float = 1e-5):
    T = out_BT.shape[1]
    for b, row in enumerate(reference):
        expected = torch.stack(row) if row else torch.zeros(0)
        torch.testing.assert_close(out_BT[b, : len(row)], expected, atol=atol, rtol=0)
        assert torch.count_nonzero(out_BT[b, len(row) : T]) == 0  # padding positions are 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_and_entropy_match_hand_computation(policy, batch, temperature):
    with torch.no_grad():
        logprobs_BT, entropy_BT = response_logprobs(policy, batch, temperature=temperature, with_entropy=True)
    ref_logprobs, ref_entropy = _reference_logprobs(policy, temperature)
    _assert_rows_match(logprobs_BT, ref_logprobs)
    _assert_rows_match(entropy_BT, ref_entropy)
    assert logprobs_BT.dtype == torch.float32 and logprobs_BT.shape == batch.response_ids_BT.shape


def test_temperature_changes_logprobs(policy, batch):
    """Guards the temperature test above against a no-op: 0.7 and 1.0 really differ."""
    with torch.no_grad():
        cold, _ = response_logprobs(policy, batch, temperature=0.7)
        warm, _ = response_logprobs(policy, batch, temperature=1.0)
    assert (cold - warm)[batch.response_mask_BT].abs().max() > 1e-3


def test_response_values_match_hand_computation(critic, batch):
    with torch.no_grad():
        values_BT = response_values(critic, batch)
        reference = []
        for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
            ids = torch.tensor([prompt + response])
            values_L = per_position_values(critic, ids, torch.ones_like(ids, dtype=torch.bool))[0]
            reference.append([values_L[len(prompt) + t - 1] for t in range(len(response))])
    _assert_rows_match(values_BT, reference)


def test_value_of_token_t_is_read_before_token_t(batch):
    """A zero-layer critic: the value at a position is a known function f of the token AT that position.

    So values_BT[b, t] must be f(token at prompt_len + t - 1): the last prompt token for t = 0,
    response token t - 1 after. Reading at prompt_len + t (one too late) would give f(response_t).
    """
    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=0, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=TINY_PAD_ID,
    )  # fmt: skip
    torch.manual_seed(3)
    critic = Qwen2ForSequenceClassification(config).eval()
    torch.nn.init.normal_(critic.score.weight)
    with torch.no_grad():
        f_V = critic.score(critic.model.norm(critic.model.embed_tokens.weight))[
            :, 0
        ]  # value of each token id
        values_BT = response_values(critic, batch)
    assert f_V.unique().numel() == 64  # distinct per token, so a shift cannot go unnoticed
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        preceding = [prompt[-1]] + response[:-1]
        expected = f_V[torch.tensor(preceding, dtype=torch.long)] if response else torch.zeros(0)
        torch.testing.assert_close(values_BT[b, : len(response)], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# micro-batching, padding invariance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_one_shared_forward_gives_the_logprobs_and_values_of_two(batch, micro_batch_size):
    from stages.models.forward import response_logprobs_and_values

    shared = PolicyWithValueHead(make_tiny_qwen2(seed=0)).eval()
    torch.manual_seed(5)
    torch.nn.init.normal_(shared.value_head.weight)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(shared.policy, batch, 0.7, micro_batch_size, with_entropy=True)
        values = response_values(shared, batch, micro_batch_size)
        joint = response_logprobs_and_values(shared, batch, 0.7, micro_batch_size, with_entropy=True)
    torch.testing.assert_close(joint[0], logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(joint[1], entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(joint[2], values, atol=1e-6, rtol=0)
    assert torch.count_nonzero(joint[2][batch.response_mask_BT]) == int(batch.response_mask_BT.sum())
    # and the gradient reaches the trunk through both heads
    logprobs_BT, _, values_BT = response_logprobs_and_values(shared, batch)
    (logprobs_BT.sum() + values_BT.sum()).backward()
    assert (
        shared.value_head.weight.grad is not None
        and shared.policy.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    )


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_micro_batches_equal_one_batch(policy, critic, batch, micro_batch_size):
    with torch.no_grad():
        full_lp, full_ent = response_logprobs(policy, batch, with_entropy=True)
        full_v = response_values(critic, batch)
        mb_lp, mb_ent = response_logprobs(policy, batch, micro_batch_size=micro_batch_size, with_entropy=True)
        mb_v = response_values(critic, batch, micro_batch_size=micro_batch_size)
    torch.testing.assert_close(mb_lp, full_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(mb_ent, full_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(mb_v, full_v, atol=1e-5, rtol=0)


def test_padding_content_is_ignored_and_gradients_flow(policy, critic, batch):
    noisy = batch.input_ids_BL.clone()
    pads = ~batch.attention_mask_BL
    noisy[pads] = torch.randint(2, 64, (int(pads.sum()),), generator=torch.Generator().manual_seed(0))
    noisy_batch = type(batch)(**{**batch.__dict__, "input_ids_BL": noisy})
    with torch.no_grad():
        torch.testing.assert_close(
            response_logprobs(policy, noisy_batch)[0], response_logprobs(policy, batch)[0], atol=0, rtol=0
        )
        torch.testing.assert_close(
            response_values(critic, noisy_batch), response_values(critic, batch), atol=0, rtol=0
        )

    trainable = make_tiny_qwen2(seed=0).train()
    logprobs_BT, _ = response_logprobs(trainable, batch)
    logprobs_BT[batch.response_mask_BT].sum().backward()
    grad = trainable.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom models): full logits path."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.lm(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )


def test_models_without_logits_to_keep_give_the_same_logprobs(policy, batch):
    with torch.no_grad():
        kept, _ = response_logprobs(policy, batch)
        full, _ = response_logprobs(_NoLogitsToKeep(policy), batch)
    torch.testing.assert_close(full, kept, atol=1e-6, rtol=0)
