"""Model loading, critic initialisation, reward scores and save/load round trips on tiny random Qwen2 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_PAD_ID, make_tiny_qwen2
from pydantic import ValidationError

from stages.config.models import ModelConfig
from stages.critic.value_model import build_critic
from stages.models.loading import (
    init_reward_model,
    load_policy,
    load_reference,
    load_reward_model,
    load_value_model,
    resolve_dtype,
)
from stages.models.value_head import PolicyWithValueHead, per_position_values, reward_model_scores


def _perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter a little, so 'came from this model' is distinguishable from 'from the policy'."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def rm_dir(tiny_qwen2_dir, tmp_path_factory) -> str:
    """A 'trained' reward model: the policy's backbone moved away from the policy, a non-zero score head."""
    torch.manual_seed(1)
    rm = init_reward_model(tiny_qwen2_dir, "float32")
    _perturb_(rm, seed=2)
    path = tmp_path_factory.mktemp("rm")
    rm.save_pretrained(path)
    return str(path)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_safetensors_only(directory: str | Path) -> None:
    names = {p.name for p in Path(directory).iterdir()}
    assert any(n.endswith(".safetensors") for n in names), names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for n in names), names


# ---------------------------------------------------------------------------------------------
# config and plain loading
# ---------------------------------------------------------------------------------------------
def test_model_config_defaults_validation_and_descriptions():
    config = ModelConfig(policy="some/model")
    assert (config.critic_mode, config.critic_init, config.dtype) == ("separate", "reward_model", "auto")
    assert (config.attn_implementation, config.trust_remote_code, config.critic_path) == ("sdpa", False, None)
    for name, field in ModelConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError):
        ModelConfig(policy="m", critic_mode="both")
    with pytest.raises(ValidationError):
        ModelConfig(policy="m", value_head="shared")  # unknown key
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_policy_trains_and_reference_is_frozen(tiny_qwen2_dir):
    policy = load_policy(tiny_qwen2_dir, "float32")
    reference = load_reference(tiny_qwen2_dir, "float32")
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    _assert_same_state(_state(policy), _state(make_tiny_qwen2()))
    assert load_policy(tiny_qwen2_dir, "bfloat16").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# reward scores: last non-pad token, padding side agnostic
# ---------------------------------------------------------------------------------------------
def _manual_last_token_score(rm, ids: list[int]) -> torch.Tensor:
    """Unpadded, one sequence: score head on the final hidden state of its last token."""
    hidden = rm.model(torch.tensor([ids])).last_hidden_state
    return rm.score(hidden[0, -1])[0]


def test_reward_model_scores_last_non_pad_token_right_and_left_padding(rm_dir):
    rm = load_reward_model(rm_dir, "float32")
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    seqs = [[5, 9, 3, 1], [7, 2], [4, 4, 8, 6, 11, 1], [13]]
    L = max(map(len, seqs))
    expected = torch.stack([_manual_last_token_score(rm, s) for s in seqs])
    assert expected.std() > 1e-3  # the scores differ, so picking the wrong row/position shows

    right = torch.full((len(seqs), L), TINY_PAD_ID)
    left = torch.full((len(seqs), L), TINY_PAD_ID)
    right_mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    left_mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for b, s in enumerate(seqs):
        right[b, : len(s)], right_mask[b, : len(s)] = torch.tensor(s), True
        left[b, L - len(s) :], left_mask[b, L - len(s) :] = torch.tensor(s), True
    with torch.no_grad():
        right_scores = reward_model_scores(rm, right, right_mask)
        left_scores = reward_model_scores(rm, left, left_mask)
        # whatever sits in the padding (here: real token ids, not the pad id) changes nothing
        garbage = torch.where(
            right_mask, right, torch.randint(2, 64, right.shape, generator=torch.Generator().manual_seed(0))
        )
        garbage_scores = reward_model_scores(rm, garbage, right_mask)
        # transformers' own pooling agrees on right padding when no real token is the pad id
        hf_scores = rm(input_ids=right, attention_mask=right_mask.long()).logits[:, 0]
    torch.testing.assert_close(right_scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(left_scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(garbage_scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_scores, expected, atol=1e-5, rtol=0)
    # and the score is not the value one position earlier
    second_last = torch.stack(
        [
            per_position_values(rm, right[b : b + 1, : len(s)], right_mask[b : b + 1, : len(s)])[0, -2]
            for b, s in enumerate(seqs[:3])
        ]
    )
    assert (second_last - expected[:3]).abs().min() > 1e-4


# ---------------------------------------------------------------------------------------------
# critic initialisation
# ---------------------------------------------------------------------------------------------
def _critic(policy_dir: str, critic_dir: str, mode: str = "separate"):
    """The critic a stage builds from `critic_dir` (the trained RM, the policy, a path), as critic warmup does."""
    model = ModelConfig(policy=policy_dir, critic_mode=mode, dtype="float32")
    return build_critic(model, critic_dir, load_reference(policy_dir, "float32"), policy_dir)


def test_separate_critic_from_reward_model_holds_backbone_and_head(rm_dir, tiny_qwen2_dir):
    critic = _critic(tiny_qwen2_dir, rm_dir)
    assert critic.training
    _assert_same_state(_state(critic), _state(load_reward_model(rm_dir, "float32")))
    assert critic.score.weight.abs().sum() > 0


def test_separate_critic_from_policy_has_zero_head_and_policy_backbone(tiny_qwen2_dir):
    critic = _critic(tiny_qwen2_dir, tiny_qwen2_dir)
    policy_state = _state(make_tiny_qwen2())
    backbone = {k: v for k, v in _state(critic).items() if k.startswith("model.")}
    assert backbone and len(backbone) == len([k for k in policy_state if k.startswith("model.")])
    for key, value in backbone.items():
        assert torch.equal(value, policy_state[key]), key
    assert torch.count_nonzero(critic.score.weight) == 0
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(
        per_position_values(critic, ids, torch.ones_like(ids, dtype=torch.bool)), torch.zeros(1, 4)
    )


def test_separate_critic_from_path_can_be_a_larger_model(tiny_qwen2_dir, rm_dir, tmp_path):
    make_tiny_qwen2(seed=5, hidden_size=48, num_hidden_layers=3).save_pretrained(tmp_path)
    big = _critic(tiny_qwen2_dir, str(tmp_path))
    assert big.config.hidden_size == 48 and torch.count_nonzero(big.score.weight) == 0


def test_shared_critic_init_from_reward_model_from_policy_and_from_an_export(
    tiny_qwen2_dir, rm_dir, tmp_path
):
    shared = _critic(tiny_qwen2_dir, rm_dir, mode="shared")
    assert isinstance(shared, PolicyWithValueHead)
    assert torch.equal(shared.value_head.weight, load_reward_model(rm_dir, "float32").score.weight)
    _assert_same_state(
        _state(shared.policy), _state(make_tiny_qwen2())
    )  # the policy is the policy, not the RM

    zero = _critic(tiny_qwen2_dir, tiny_qwen2_dir, mode="shared")
    assert torch.count_nonzero(zero.value_head.weight) == 0

    # a shared critic's export (policy files + value_head.safetensors) gives back its head
    shared.save_pretrained(tmp_path / "export")
    again = _critic(tiny_qwen2_dir, str(tmp_path / "export"), mode="shared")
    assert torch.equal(again.value_head.weight, shared.value_head.weight)

    init_reward_model(str(_save_tiny(tmp_path, hidden_size=48)), "float32").save_pretrained(tmp_path / "rm48")
    with pytest.raises(ValueError, match="hidden size"):
        _critic(tiny_qwen2_dir, str(tmp_path / "rm48"), mode="shared")


def _save_tiny(tmp_path: Path, hidden_size: int) -> Path:
    path = tmp_path / f"lm{hidden_size}"
    make_tiny_qwen2(seed=3, hidden_size=hidden_size).save_pretrained(path)
    return path


def test_shared_forward_values_read_the_final_hidden_state(tiny_qwen2_dir):
    model = PolicyWithValueHead(load_policy(tiny_qwen2_dir, "float32")).eval()
    _perturb_(model.value_head, seed=4, scale=1.0)
    ids = torch.tensor([[3, 9, 27, 4, 1], [6, 2, 1, 0, 0]])
    mask = ids != TINY_PAD_ID
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, values = model(ids, mask, positions)
        hidden = model.policy.model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        expected_logits = model.policy(ids, attention_mask=mask, position_ids=positions).logits
        values_only = per_position_values(model, ids, mask)
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    torch.testing.assert_close(values, hidden @ model.value_head.weight[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(values_only, values, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# save / load round trips (safetensors only)
# ---------------------------------------------------------------------------------------------
def test_separate_critic_save_load_round_trip(tiny_qwen2_dir, tmp_path):
    critic = _critic(tiny_qwen2_dir, tiny_qwen2_dir)
    _perturb_(critic, seed=7)  # a 'trained' critic: non-zero head, moved backbone
    critic.save_pretrained(tmp_path)
    _assert_safetensors_only(tmp_path)
    loaded = load_value_model(str(tmp_path), "float32")
    _assert_same_state(_state(loaded), _state(critic))
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
    mask = ids != TINY_PAD_ID
    with torch.no_grad():
        assert torch.equal(
            per_position_values(loaded, ids, mask), per_position_values(critic.eval(), ids, mask)
        )


def test_shared_critic_save_load_round_trip(tiny_qwen2_dir, tmp_path):
    model = PolicyWithValueHead(load_policy(tiny_qwen2_dir, "float32"))
    _perturb_(model, seed=8)
    model.save_pretrained(tmp_path)
    _assert_safetensors_only(tmp_path)
    assert (tmp_path / "value_head.safetensors").is_file() and (tmp_path / "value_head.json").is_file()
    loaded = PolicyWithValueHead.from_pretrained(str(tmp_path), "float32")
    _assert_same_state(_state(loaded), _state(model))
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    with torch.no_grad():
        out, expected = loaded.eval()(ids), model.eval()(ids)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    # the policy files alone are a plain HF causal LM; without the head file the head starts at zero
    _assert_same_state(_state(load_policy(str(tmp_path), "float32")), _state(model.policy))
    assert (
        torch.count_nonzero(PolicyWithValueHead.from_pretrained(tiny_qwen2_dir, "float32").value_head.weight)
        == 0
    )
