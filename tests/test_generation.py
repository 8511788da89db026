"""Generation backends: reproducibility, logprobs == the training forward's, EOS/length handling,
greedy limits, ZeRO-3, and (on a GPU with vllm installed) the vLLM adapter.

The tiny random Qwen2 of conftest is almost uniform (logprobs ~ log 1/64), which would hide
position and padding mistakes; `sharp_qwen2` redraws its matrices with a larger scale so that
the next-token distribution depends strongly on the context and its positions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_EOS_ID, TINY_PAD_ID, free_port, make_tiny_qwen2

from stages.config.sampling import SamplingConfig
from stages.sampling.backends import make_generator
from stages.sampling.generation import GeneratedSample, row_seed
from stages.sampling.hf_sampler import HFGenerator

# Prompts of different lengths in one batch: left padding must not change any row's result.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]


def sharp_qwen2(seed: int = 0, std: float = 0.3):
    model = make_tiny_qwen2(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def bias_eos(model, bias: float):
    """Add `bias` to the EOS logit (a hook on lm_head: the generator and the forward both see it)."""
    offset = torch.zeros(model.config.vocab_size)
    offset[TINY_EOS_ID] = bias
    model.lm_head.register_forward_hook(lambda module, args, out: out + offset)
    return model


def hf_generator(model) -> HFGenerator:
    return HFGenerator(model, eos_token_id=TINY_EOS_ID, pad_token_id=TINY_PAD_ID)


def forward_logprobs(model, sample: GeneratedSample, temperature: float) -> torch.Tensor:
    """The training side: logprob of response token t from position prompt_len + t - 1."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    start = len(sample.prompt_ids) - 1
    positions = torch.arange(start, start + len(sample.response_ids))
    return logprobs[positions, torch.tensor(sample.response_ids)]


def batched_forward_logprobs(model, samples: list[GeneratedSample], temperature: float) -> list[list[float]]:
    """Same as `forward_logprobs`, for all samples in one RIGHT-padded batch (as the trainer does)."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [TINY_PAD_ID] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logprobs = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1
        )
    out = []
    for row, s in enumerate(samples):
        start = len(s.prompt_ids) - 1
        positions = torch.arange(start, start + len(s.response_ids))
        out.append(logprobs[row, positions, torch.tensor(s.response_ids)].tolist())
    return out


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_sampling_config_is_documented_and_strict():
    for name, field in SamplingConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temprature=1.0)


def test_row_seeds_differ_per_prompt_and_per_seed():
    seeds = {row_seed(s, i) for s in range(4) for i in range(64)}
    assert len(seeds) == 4 * 64
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------
# HF backend
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_samples_different_seed_different():
    gen = hf_generator(sharp_qwen2())
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10)
    first = gen.generate(PROMPTS, sampling, seed=7)
    again = gen.generate(PROMPTS, sampling, seed=7)
    other = gen.generate(PROMPTS, sampling, seed=8)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert [s.logprobs for s in first] == [s.logprobs for s in again]
    assert [s.response_ids for s in first] != [s.response_ids for s in other]
    # the global RNG is neither used nor needed
    torch.manual_seed(123)
    assert [s.response_ids for s in gen.generate(PROMPTS, sampling, seed=7)] == [
        s.response_ids for s in first
    ]


def test_repeated_prompts_get_different_samples():
    gen = hf_generator(sharp_qwen2())
    samples = gen.generate([PROMPTS[0]] * 4, SamplingConfig(max_new_tokens=10), seed=0)
    assert len({tuple(s.response_ids) for s in samples}) > 1


def test_samples_do_not_depend_on_micro_batching():
    """Each prompt has its own random stream and positions: one batch == one prompt at a time."""
    gen = hf_generator(sharp_qwen2())
    whole = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=10), seed=3)
    single = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=10, hf_batch_size=1), seed=3)
    assert [s.response_ids for s in whole] == [s.response_ids for s in single]
    for a, b in zip(whole, single, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_logprobs_match_training_forward(top_p):
    """logprob[t] == log_softmax(logits / T) at position prompt_len + t - 1 of a plain forward pass
    (prompts of different lengths in one batch; checked per sequence and right-padded batched)."""
    model = bias_eos(sharp_qwen2(), 2.0)  # some rows stop early, the others go on
    temperature = 0.7
    samples = hf_generator(model).generate(
        PROMPTS, SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=16), seed=1
    )
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    batched = batched_forward_logprobs(model, samples, temperature)
    for sample, expected_batched in zip(samples, batched, strict=True):
        assert len(sample.logprobs) == len(sample.response_ids)
        expected = forward_logprobs(model, sample, temperature)
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(sample.logprobs, expected_batched, rtol=0, atol=1e-4)


def test_stops_at_eos_per_sequence():
    model = bias_eos(sharp_qwen2(), 3.0)
    max_new = 24
    samples = hf_generator(model).generate(PROMPTS * 2, SamplingConfig(max_new_tokens=max_new), seed=2)
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert len({len(s.response_ids) for s in stopped}) > 1, "rows should stop at different steps"
    for s in samples:
        eos_positions = [i for i, tok in enumerate(s.response_ids) if tok == TINY_EOS_ID]
        if s.finish_reason == "stop":
            assert eos_positions == [len(s.response_ids) - 1]
        else:
            assert eos_positions == [] and len(s.response_ids) == max_new
        assert len(s.logprobs) == len(s.response_ids)
        assert s.prompt_ids in PROMPTS and s.policy_version == 0


def test_max_new_tokens_gives_length():
    model = bias_eos(sharp_qwen2(), -1e4)  # EOS never sampled
    samples = hf_generator(model).generate(PROMPTS, SamplingConfig(max_new_tokens=7), seed=0)
    assert all(s.finish_reason == "length" and len(s.response_ids) == 7 for s in samples)


def test_temperature_zero_is_greedy_argmax_of_forward():
    model = sharp_qwen2()
    samples = hf_generator(model).generate(
        PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=10), seed=0
    )
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        start = len(s.prompt_ids) - 1
        argmax = logits[start : start + len(s.response_ids)].argmax(-1).tolist()
        assert s.response_ids == argmax
        # documented: greedy logprobs are those of the argmax token at temperature 1
        torch.testing.assert_close(
            torch.tensor(s.logprobs), forward_logprobs(model, s, 1.0), rtol=0, atol=1e-4
        )


def test_tiny_top_p_is_greedy():
    model = sharp_qwen2()
    gen = hf_generator(model)
    greedy = gen.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=10), seed=0)
    nucleus = gen.generate(PROMPTS, SamplingConfig(temperature=0.7, top_p=1e-6, max_new_tokens=10), seed=5)
    assert [s.response_ids for s in nucleus] == [s.response_ids for s in greedy]
    # logprobs stay those of the untruncated distribution at T = 0.7 (not 0 = log 1)
    for s in nucleus:
        torch.testing.assert_close(
            torch.tensor(s.logprobs), forward_logprobs(model, s, 0.7), rtol=0, atol=1e-4
        )
        assert max(s.logprobs) < -1e-3


def test_training_mode_restored_and_weight_updates():
    model = sharp_qwen2().train()
    gen = hf_generator(model)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)
    before = gen.generate(PROMPTS, sampling, seed=0)
    assert model.training
    # live module changed in place: update_weights only records the version
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    gen.update_weights(model, version=3)
    after = gen.generate(PROMPTS, sampling, seed=0)
    assert gen.policy_version == 3 and all(s.policy_version == 3 for s in after)
    assert [s.logprobs for s in after] != [s.logprobs for s in before]
    # a state dict is loaded: back to the original weights
    gen.update_weights(sharp_qwen2().state_dict(), version=4)
    restored = gen.generate(PROMPTS, sampling, seed=0)
    assert [s.response_ids for s in restored] == [s.response_ids for s in before]
    assert restored[0].policy_version == 4
    gen.sleep()
    gen.wake()


def test_make_generator_hf_from_path(tiny_qwen2_dir):
    gen = make_generator(SamplingConfig(), tiny_qwen2_dir, eos_token_id=TINY_EOS_ID, pad_token_id=TINY_PAD_ID)
    assert isinstance(gen, HFGenerator)
    samples = gen.generate([[3, 4]], SamplingConfig(max_new_tokens=3), seed=0)
    assert 1 <= len(samples[0].response_ids) <= 3
    with pytest.raises(TypeError):
        make_generator(
            SamplingConfig(backend="vllm"), make_tiny_qwen2(), eos_token_id=TINY_EOS_ID, pad_token_id=0
        )


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (own process: distributed init is global)
# ---------------------------------------------------------------------------------------------
ZERO3_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    from stages.config.sampling import SamplingConfig
    from stages.sampling.hf_sampler import HFGenerator
    from conftest import make_tiny_qwen2
    from stages.runtime.distributed import init_distributed

    init_distributed()  # the stages' own init: loads the shm comm op under its kill-safe lock
    prompts = {prompts}
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=8)
    reference = HFGenerator(make_tiny_qwen2(seed=0), 1, 0).generate(prompts, sampling, seed=11)

    model = make_tiny_qwen2(seed=0).train()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}}}},
    )
    params = list(engine.module.parameters())
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    gen = HFGenerator(engine, 1, 0)
    samples = gen.generate(prompts, sampling, seed=11)
    result = dict(
        partitioned_before=partitioned,
        partitioned_after=all(p.numel() == 0 for p in params),
        training_after=engine.module.training,
        reference=[s.response_ids for s in reference],
        responses=[s.response_ids for s in samples],
        max_logprob_diff=max(
            abs(a - b) for s, r in zip(samples, reference) for a, b in zip(s.logprobs, r.logprobs)
        ),
    )
    # the engine still trains, and the generator sees the live updated weights
    ids = torch.tensor([prompts[1]])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    gen.update_weights(engine, version=1)
    updated = gen.generate(prompts, sampling, seed=11)
    result["logprobs_changed"] = [s.logprobs for s in updated] != [s.logprobs for s in samples]
    result["version"] = updated[0].policy_version
    print("RESULT " + json.dumps(result))
    """
)


def test_zero3_engine_generates_like_unsharded_model():
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]),
    )
    code = ZERO3_SCRIPT.format(prompts=PROMPTS[:3])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["partitioned_before"] and result["partitioned_after"]
    assert result["training_after"]
    assert result["responses"] == result["reference"]
    assert result["max_logprob_diff"] < 1e-5
    assert result["logprobs_changed"] and result["version"] == 1


# ---------------------------------------------------------------------------------------------
# vLLM (GPU only)
# ---------------------------------------------------------------------------------------------
needs_vllm = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="vLLM needs a CUDA device and the vllm package",
)


@pytest.fixture(scope="module")
def vllm_generator(tiny_qwen2_dir):
    from stages.sampling.vllm_sampler import VLLMGenerator

    sampling = SamplingConfig(backend="vllm", gpu_memory_utilization=0.2, dtype="float32", colocate=True)
    return VLLMGenerator(tiny_qwen2_dir, sampling, eos_token_id=TINY_EOS_ID, seed=0)


@pytest.mark.gpu
@needs_vllm
def test_vllm_reproducible_and_logprobs_match_hf_forward(vllm_generator):
    sampling = SamplingConfig(backend="vllm", temperature=0.7, max_new_tokens=12)
    first = vllm_generator.generate(PROMPTS, sampling, seed=4)
    again = vllm_generator.generate(PROMPTS, sampling, seed=4)
    other = vllm_generator.generate(PROMPTS, sampling, seed=5)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert [s.response_ids for s in first] != [s.response_ids for s in other]
    model = make_tiny_qwen2()
    for s in first:
        assert s.finish_reason in ("stop", "length") and len(s.logprobs) == len(s.response_ids)
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == TINY_EOS_ID
        else:
            assert len(s.response_ids) == 12
        torch.testing.assert_close(
            torch.tensor(s.logprobs), forward_logprobs(model, s, 0.7), rtol=0, atol=1e-2
        )


@pytest.mark.gpu
@needs_vllm
def test_vllm_weight_update_and_sleep_wake(vllm_generator):
    sampling = SamplingConfig(backend="vllm", temperature=0.0, max_new_tokens=8)
    before = vllm_generator.generate(PROMPTS, sampling, seed=0)
    vllm_generator.sleep()
    with pytest.raises(RuntimeError):
        vllm_generator.generate(PROMPTS, sampling, seed=0)
    vllm_generator.wake()
    assert [s.response_ids for s in vllm_generator.generate(PROMPTS, sampling, seed=0)] == [
        s.response_ids for s in before
    ]
    new_model = sharp_qwen2(seed=1)
    vllm_generator.update_weights(new_model.state_dict(), version=5)
    after = vllm_generator.generate(PROMPTS, sampling, seed=0)
    assert vllm_generator.policy_version == 5 and all(s.policy_version == 5 for s in after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    for s in after:  # greedy under the NEW weights
        torch.testing.assert_close(
            torch.tensor(s.logprobs), forward_logprobs(new_model, s, 1.0), rtol=0, atol=1e-2
        )


def test_generation_logprobs_equal_the_trainers_forward():
    """The generator's logprobs are the old logprobs PPO starts from: they must equal what the
    training code (`stages.models.forward.response_logprobs`) computes for the same tokens."""
    from stages.models.forward import build_token_batch, response_logprobs

    model = bias_eos(sharp_qwen2(seed=3), 2.0)
    temperature = 0.7
    samples = hf_generator(model).generate(
        PROMPTS, SamplingConfig(temperature=temperature, max_new_tokens=16), seed=5
    )
    batch = build_token_batch([s.prompt_ids for s in samples], [s.response_ids for s in samples], TINY_PAD_ID)
    with torch.no_grad():
        trained, _ = response_logprobs(model, batch, temperature=temperature)
    for row, sample in enumerate(samples):
        n = len(sample.response_ids)
        torch.testing.assert_close(trained[row, :n], torch.tensor(sample.logprobs), rtol=0, atol=1e-4)
