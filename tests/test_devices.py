"""Every tensor on its model's device: the stages' own forward, scoring, generation and update
functions run with every model on a second device (`tests/fake_device.py`: a real device on a
CPU-only machine), and any op that meets a tensor left on the CPU fails, as it would on a GPU.

DeepSpeed cannot run on the fake device, so the engines are stood in for by `Engine` (forward
through the module, backward, a step at each accumulation boundary); everything else is the
stages' code as it runs."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import TINY_PAD_ID, scored_rows
from fake_device import FAKE, MixedDevices, OnFakeDevice, is_on_fake

from stages.config.batches import BatchLayout
from stages.config.ppo import PPOConfig
from stages.config.sampling import RewardConfig, SamplingConfig
from stages.data.records import Problem
from stages.data.tasks import EncodedProblem
from stages.models.forward import (
    build_token_batch,
    response_logprobs,
    response_logprobs_and_values,
    response_values,
)
from stages.models.loading import load_policy, load_reference, load_reward_model, load_value_model
from stages.models.value_head import PolicyWithValueHead
from stages.sampling.rollout_rows import ScoredSample, score_samples

ROWS = 8


class Engine(torch.nn.Module):
    """Stands in for a DeepSpeed engine on the fake device."""

    device = FAKE

    def __init__(self, module: torch.nn.Module, accum: int = 1):
        super().__init__()
        self.module, self.accum, self.micro_steps = module, accum, 0
        self.optimizer = object()  # no `_global_grad_norm`: step_engine reads the gradients itself

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.module.zero_grad()
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [0.0]


@pytest.fixture
def on_fake_device(monkeypatch):
    """The fake device is this process's device; the sampler's random generators are CPU ones (the
    fake device has none of its own)."""
    from stages.sampling import hf_sampler

    class TorchWithCpuGenerators(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def Generator(device="cpu"):  # noqa: N802 (torch's name)
            return torch.Generator(device="cpu" if torch.device(device) == FAKE else device)

    monkeypatch.setattr(hf_sampler, "torch", TorchWithCpuGenerators("torch"))
    monkeypatch.setattr("stages.runtime.devices.device", lambda: FAKE)
    monkeypatch.setattr("stages.models.loading.device", lambda: FAKE)
    with OnFakeDevice():
        yield


@pytest.fixture
def tiny_dirs(tiny_qwen2_dir, tmp_path_factory):
    """The tiny policy and a classifier on its backbone (critic and reward model), saved."""
    rm = tmp_path_factory.mktemp("rm")
    load_value_model(tiny_qwen2_dir, "float32").save_pretrained(rm)
    return tiny_qwen2_dir, str(rm)


def test_the_fake_device_catches_a_tensor_left_on_the_cpu(on_fake_device):
    on_device = torch.ones(3, device=FAKE)
    with pytest.raises(MixedDevices):
        on_device + torch.ones(3)
    assert (
        is_on_fake(on_device + torch.ones(3).to(FAKE))
        and (on_device * torch.tensor(2.0)).tolist() == [2.0] * 3
    )


def test_loaders_place_every_model_on_the_process_device(tiny_dirs, on_fake_device):
    policy_dir, rm_dir = tiny_dirs
    for model in (load_policy(policy_dir, "float32"), load_reference(policy_dir, "float32"),
                  load_value_model(rm_dir, "float32"), load_reward_model(rm_dir, "float32")):  # fmt: skip
        assert all(is_on_fake(p) for p in model.parameters())


def on_device(model: torch.nn.Module) -> torch.nn.Module:
    """The model on the fake device whatever the loader did (the loaders are tested above)."""
    return model.to(FAKE)


def batch_rows(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(2, 60, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 6, (ROWS,), generator=gen)
    ]
    responses = [
        torch.randint(2, 60, (int(n),), generator=gen).tolist() + [1]
        for n in torch.randint(1, 9, (ROWS,), generator=gen)
    ]
    return prompts, responses


def test_forwards_and_reward_scores_run_on_the_models_device(tiny_dirs, on_fake_device):
    policy_dir, rm_dir = tiny_dirs
    policy = Engine(on_device(load_policy(policy_dir, "float32")))
    critic = Engine(on_device(load_value_model(rm_dir, "float32")))
    shared = Engine(PolicyWithValueHead(on_device(load_policy(policy_dir, "float32"))))
    batch = build_token_batch(*batch_rows(), TINY_PAD_ID)  # built on the CPU, as the stages build it
    logprobs_BT, entropy_BT = response_logprobs(policy, batch, micro_batch_size=3, with_entropy=True)
    values_BT = response_values(critic, batch, micro_batch_size=3)
    joint = response_logprobs_and_values(shared, batch, micro_batch_size=3)
    assert all(
        is_on_fake(x) for x in (logprobs_BT, entropy_BT, values_BT, *[x for x in joint if x is not None])
    )
    problem = Problem("p", "arith", "1 + 1", "2")
    samples = [_sample(p, r) for p, r in zip(*batch_rows(), strict=True)]
    tokenizer = _Tokenizer()
    scored = score_samples(samples, [EncodedProblem(problem, "q", s.prompt_ids, []) for s in samples], tokenizer,
                           RewardConfig(rm_coef=1.0), rm=on_device(load_reward_model(rm_dir, "float32")))  # fmt: skip
    assert all(isinstance(s.rm_score, float) for s in scored)


def test_a_ppo_step_runs_on_the_policys_device(tiny_dirs, on_fake_device):
    """Old quantities, advantages (GAE, whitened), the update of the policy and the separate critic
    (KL in the reward, truncated importance weights), the step's metrics and rollout rows."""
    from stages.ppo.batch import compute_advantages, old_quantities, rollout_batch
    from stages.ppo.engines import Models
    from stages.ppo.metrics import rollout_table, step_metrics
    from stages.ppo.update import update

    policy_dir, rm_dir = tiny_dirs
    ppo = PPOConfig(prompts_per_step=2, samples_per_prompt=4, minibatches=2, kl_coef=0.05, tis_cap=2.0)
    layout = BatchLayout(4, 2, 2)
    models = Models(
        Engine(on_device(load_policy(policy_dir, "float32")), accum=2), Engine(on_device(load_value_model(rm_dir, "float32")), accum=2),
        None, on_device(load_reference(policy_dir, "float32")), None, shared=False,
        batches={"policy_optim": layout, "critic_optim": layout},
    )  # fmt: skip
    models.critic = models.critic_engine
    scored = _scored()
    rollout = rollout_batch(scored, TINY_PAD_ID, FAKE)
    old = old_quantities(models, rollout, scored, 1.0, micro_batch_size=3)
    adv = compute_advantages(rollout, old, torch.arange(ROWS) // 4, ppo)
    stats = update(models, rollout, old, adv, ppo, 1.0, train_policy=True, seed=(0, 1))
    assert {"policy_loss", "value_loss", "kl", "tis_weight", "grad_norm_policy", "grad_norm_critic"} <= set(
        stats
    )
    metrics = step_metrics(rollout, old, adv, scored, stats, models)
    assert metrics["ppo/explained_var"] == metrics["ppo/explained_var"] or True  # a float, NaN allowed
    columns = rollout_table(old, adv, scored, "r", 1)
    assert len(columns["values"]) == ROWS


def test_grpo_and_the_shared_critic_run_on_the_policys_device(tiny_dirs, on_fake_device):
    from stages.ppo.batch import compute_advantages, old_quantities, rollout_batch
    from stages.ppo.engines import Models
    from stages.ppo.update import update

    policy_dir, _ = tiny_dirs
    layout = {"policy_optim": BatchLayout(4, 4, 1)}
    shared = Engine(PolicyWithValueHead(on_device(load_policy(policy_dir, "float32"))))
    scored = _scored()
    for estimator, models in (
        ("gae", Models(shared, None, shared, None, None, shared=True, batches=layout)),
        ("grpo", Models(Engine(on_device(load_policy(policy_dir, "float32"))), None, None, None, None, shared=False, batches=layout)),
    ):  # fmt: skip
        ppo = PPOConfig(
            prompts_per_step=2, samples_per_prompt=4, minibatches=2, advantage_estimator=estimator
        )
        rollout = rollout_batch(scored, TINY_PAD_ID, FAKE)
        old = old_quantities(models, rollout, scored, 1.0, micro_batch_size=4)
        adv = compute_advantages(rollout, old, torch.arange(ROWS) // 4, ppo)
        assert "policy_loss" in update(models, rollout, old, adv, ppo, 1.0, train_policy=True, seed=(0, 1))


def test_critic_warmup_sft_and_reward_model_steps_run_on_the_models_device(tiny_dirs, on_fake_device):
    from stages import critic_warmup, reward_model, sft
    from stages.config.training import CriticWarmupConfig, RewardModelConfig
    from stages.critic.update import ValueTargets
    from stages.models.forward import TokenRows

    policy_dir, rm_dir = tiny_dirs
    critic = Engine(on_device(load_value_model(rm_dir, "float32")))
    prompts, responses = batch_rows()
    rows = TokenRows(prompts, responses, TINY_PAD_ID)
    batch = rows.batch().to(FAKE)
    mask_BT = batch.response_mask_BT
    targets = ValueTargets(torch.zeros(mask_BT.shape, device=FAKE), mask_BT.float(), mask_BT)
    cw = CriticWarmupConfig(prompts_per_step=2, samples_per_prompt=4, minibatches=2)
    stats = critic_warmup._update_critic(critic, critic, rows, targets, cw, BatchLayout(4, 2, 2), (0, 1))
    assert "critic_warmup/value_loss" in stats
    critic_warmup._step_metrics(
        _scored(), batch, targets.old_values_BT, targets.old_values_BT, targets.returns_BT
    )

    problem = Problem("p", "arith", "q", "1")
    loss = sft._train_step(Engine(on_device(load_policy(policy_dir, "float32"))), [EncodedProblem(problem, "q", p, r) for p, r in zip(prompts, responses, strict=True)], 3, TINY_PAD_ID)  # fmt: skip
    assert torch.isfinite(loss)
    pairs = [
        reward_model.EncodedPair(p + r, p + r[:1] + [1], None)
        for p, r in zip(prompts, responses, strict=True)
    ]
    rm = Engine(on_device(load_value_model(rm_dir, "float32")))
    reward_model._train_step(rm, pairs, RewardModelConfig(), 4, TINY_PAD_ID)
    assert set(reward_model._evaluate(rm, pairs, 4, TINY_PAD_ID)) == {
        "heldout_accuracy",
        "heldout_chosen_score",
        "heldout_rejected_score",
    }


def test_generation_and_held_out_accuracy_run_on_the_models_device(tiny_dirs, on_fake_device):
    from stages.evaluation.heldout import heldout_accuracy
    from stages.sampling.backends import make_generator

    policy_dir, _ = tiny_dirs
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    generator = make_generator(
        sampling, policy_dir, eos_token_id=1, pad_token_id=TINY_PAD_ID
    )  # loads on the device
    assert all(is_on_fake(p) for p in generator.model.parameters())
    prompts, _ = batch_rows()
    samples = generator.generate(prompts, sampling, seed=3)
    assert len(samples) == ROWS and all(len(s.logprobs) == len(s.response_ids) for s in samples)
    problems = [
        EncodedProblem(Problem(f"p{i}", "arith", "q", "7"), "q", p, []) for i, p in enumerate(prompts)
    ]
    accuracy = heldout_accuracy(generator, _Tokenizer(), problems, sampling, seed=0, samples=2)
    assert set(accuracy) == {"greedy", "sampled", "truncated"}


# ---------------------------------------------------------------------------------------------
class _Tokenizer:
    """Decodes token ids as space-separated numbers (the tiny random model's ids mean nothing)."""

    pad_token_id, eos_token_id = TINY_PAD_ID, 1

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(i) for i in ids)


def _sample(prompt, response):
    from stages.sampling.generation import GeneratedSample

    return GeneratedSample(prompt, response, [-1.0] * len(response), "stop", 0)


def _scored() -> list[ScoredSample]:
    prompts, responses = batch_rows(1)
    return scored_rows(prompts, responses, [float(i % 2) for i in range(ROWS)], logprob=-2.0)
