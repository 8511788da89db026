"""The offline `tiny` model: builds without network, loads like a hub model, is deterministic, caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from stages.config.models import TinyModelConfig
from stages.data.arith import arith_problems
from stages.data.problems import format_prompt
from stages.models import tiny as tiny_model
from stages.models.tiny import EOS_TOKEN, PAD_TOKEN, build_tiny_model, tiny_model_path

SMALL = TinyModelConfig(corpus_size=300)  # the default sizes, a smaller tokenizer corpus: faster


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_model(SMALL, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(built), AutoTokenizer.from_pretrained(built)


def test_loads_like_a_hub_model(built, loaded):
    model, tokenizer = loaded
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (built / "model.safetensors").is_file() and not list(built.glob("*.bin"))
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (
        2,
        256,
        512,
    )
    assert config.vocab_size == len(tokenizer) <= SMALL.vocab_size
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    record = json.loads((built / "rlpipe_tiny.json").read_text())
    assert TinyModelConfig(**record["tiny_model_config"]) == SMALL


def test_special_tokens(loaded):
    model, tokenizer = loaded
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert (model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.bos_token is None  # nothing is prepended: prompt ids are the text's ids
    assert tokenizer("<|endoftext|>")["input_ids"] == [tokenizer.eos_token_id]


def test_tokenizer_round_trips_task_text_and_splits_digits(loaded):
    _, tokenizer = loaded
    for problem in arith_problems("test", 50, seed=7):  # test split: never in the tokenizer corpus
        text = format_prompt(problem) + problem.solution
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert (
        tokenizer.decode(tokenizer("Grüße, ∑ \\boxed{x}\n\t  end")["input_ids"])
        == "Grüße, ∑ \\boxed{x}\n\t  end"
    )
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("#### 12045")["input_ids"])
    assert pieces[-5:] == ["1", "2", "0", "4", "5"]  # one token per digit
    assert len(tokenizer("Tom has 3 apples.")["input_ids"]) < len("Tom has 3 apples.")  # merges were learnt


def test_auto_tokenizer_matches_the_trained_tokenizer_file(built, loaded):
    """transformers rebuilds a qwen2 tokenizer from vocab + merges: it must tokenize as trained."""
    from tokenizers import Tokenizer

    _, tokenizer = loaded
    trained = Tokenizer.from_file(str(built / "tokenizer.json"))
    for problem in arith_problems("train", 100, seed=1):
        text = format_prompt(problem) + problem.solution
        assert tokenizer(text)["input_ids"] == trained.encode(text).ids


def test_forward_pass(loaded):
    model, tokenizer = loaded
    batch = tokenizer(["Tom has 3 apples.", "1 + 1 = 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_two_builds_are_identical_and_the_seed_matters(tmp_path, built):
    again = build_tiny_model(SMALL, tmp_path / "again")
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name
    a, b = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = load_file(
        build_tiny_model(SMALL.model_copy(update={"seed": 1}), tmp_path / "seed1") / "model.safetensors"
    )
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])


def test_cache_builds_once(tmp_path, monkeypatch):
    builds = []
    real_build = tiny_model.build_tiny_model

    def counting_build(config, out_dir):
        builds.append(out_dir)
        return real_build(config, out_dir)

    monkeypatch.setattr(tiny_model, "build_tiny_model", counting_build)
    monkeypatch.setenv(tiny_model.CACHE_ENV, str(tmp_path / "env_cache"))
    first = tiny_model_path(SMALL)
    assert first.parent == tmp_path / "env_cache" / "tiny" and len(builds) == 1
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path(SMALL) == first and len(builds) == 1  # reused, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging folder left behind
    # an explicit cache_dir wins over the variable; another config is another entry
    elsewhere = tiny_model_path(SMALL, cache_dir=tmp_path / "explicit")
    assert elsewhere.parent == tmp_path / "explicit" / "tiny" and elsewhere.name == first.name
    assert tiny_model_path(SMALL.model_copy(update={"seed": 2}), tmp_path / "explicit").name != first.name
    assert len(builds) == 3


def test_crashed_build_leaves_nothing(tmp_path, monkeypatch):
    def crashing_build(config, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny_model, "build_tiny_model", crashing_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        tiny_model_path(SMALL, tmp_path)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_concurrent_builder_that_loses_the_race_uses_the_winner(tmp_path, monkeypatch):
    real_build = tiny_model.build_tiny_model

    def racing_build(config, out_dir):
        real_build(config, out_dir)
        # another process finishes first: the final folder appears before our rename
        key = Path(out_dir).name.split("-")[1]  # staging is ".tiny-<key>-<random>", final "tiny-<key>"
        winner = Path(out_dir).parent / f"tiny-{key}"
        os.rename(real_build(config, Path(out_dir).parent / "other"), winner)
        (winner / "marker").write_text("winner")

    monkeypatch.setattr(tiny_model, "build_tiny_model", racing_build)
    path = tiny_model_path(SMALL, tmp_path)
    assert (path / "marker").read_text() == "winner"
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [path.name]  # our copy was discarded


def test_config_validation():
    with pytest.raises(ValidationError, match="divisible by num_heads"):
        TinyModelConfig(hidden_size=66, num_heads=4)
    with pytest.raises(ValidationError, match="divisible by num_kv_heads"):
        TinyModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValidationError):
        TinyModelConfig(hidden=64)  # unknown key
    for name, field in TinyModelConfig.model_fields.items():
        assert field.description, name


def test_embedding_rows_pad_the_vocabulary_beyond_the_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.models.tiny import build_tiny_model

    config = TinyModelConfig(embedding_rows=1024)
    build_tiny_model(config, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) < 1024 == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape == (1024, config.hidden_size)
