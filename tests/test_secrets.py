"""Redaction rules of storage/secrets.py: secret keys, URI passwords, environment secrets."""

from __future__ import annotations

import pytest

from storage.secrets import REDACTED, is_secret_name, redact, redact_text


@pytest.mark.parametrize(
    "name",
    [
        "hf_token",
        "HF_TOKEN",
        "WANDB_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",  # the pair access+key, anywhere
        "apiKey",  # camelCase
        "accessKeyId",
        "OpenAIKey",
        "db_password",
        "passwd",
        "client-secret",
        "credentials",
        "Authorization",
        "private_key_path",
        "key",
        "token",
    ],
)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "keep_last",
        "key_order",  # "key" counts only as the last segment
        "monkey",  # not a whole segment
        "tokenizer",
        "max_new_tokens",  # plural is a count, not a credential
        "num_tokens",
        "token_budget",
        "pad_token",  # a vocabulary token
        "eos_token",
        "pad_token_id",
        "prompt_key",  # a dataset column name
        "author",
        "PWD",  # the working directory, often a long string
        "TOKENIZERS_PARALLELISM",
        "learning_rate",
    ],
)
def test_harmless_names(name):
    assert not is_secret_name(name)


def test_redact_keys_deep_copy():
    config = {
        "model": {"name": "Qwen/Qwen2.5-0.5B", "tokenizer": "Qwen/Qwen2.5-0.5B", "max_new_tokens": 512},
        "wandb": {"WANDB_API_KEY": "abc", "project": "rl"},
        "checkpoint": {"keep_last": 3, "key_order": ["a", "b"]},
        "hf_token": None,  # unset: nothing to hide, and "***" would pretend it is set
        "use_auth_token": True,
        "sources": [{"uri": "s3://b/x", "apiKey": 12345}],
        "credentials": {"user": "u", "pass": "p"},  # a whole sub-tree under a secret key
    }
    out = redact(config)
    assert out == {
        "model": {"name": "Qwen/Qwen2.5-0.5B", "tokenizer": "Qwen/Qwen2.5-0.5B", "max_new_tokens": 512},
        "wandb": {"WANDB_API_KEY": REDACTED, "project": "rl"},
        "checkpoint": {"keep_last": 3, "key_order": ["a", "b"]},
        "hf_token": None,
        "use_auth_token": True,
        "sources": [{"uri": "s3://b/x", "apiKey": REDACTED}],
        "credentials": REDACTED,
    }
    # The input is untouched (a copy, not in place).
    assert config["wandb"]["WANDB_API_KEY"] == "abc"
    assert config["sources"][0]["apiKey"] == 12345


def test_redact_uri_passwords_and_query_tokens():
    assert redact({"db": "postgresql://alice:s3cr3t@db.example:5432/prefect"}) == {
        "db": "postgresql://alice:***@db.example:5432/prefect"
    }
    # Without a password nothing changes.
    assert redact(["https://alice@example.com/x", "s3://bucket/a:b"]) == [
        "https://alice@example.com/x",
        "s3://bucket/a:b",
    ]
    line = "GET https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef&X-Amz-Expires=60&part=3 failed"
    assert (
        redact_text(line)
        == "GET https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Expires=60&part=3 failed"
    )
    assert redact_text("retry redis://:hunter22@cache:6379/0 then ftp://u:pw@h") == (
        "retry redis://:***@cache:6379/0 then ftp://u:***@h"
    )


def test_redact_env_secret_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SENTINEL-aws-0123456789")
    monkeypatch.setenv("WANDB_API_KEY", "SENTINEL-wandb-abcdef")
    monkeypatch.setenv("MY_TOKEN", "SENTINEL-my-token-42")
    monkeypatch.setenv("SHORT_TOKEN", "1234567")  # 7 characters: below the minimum, left alone
    monkeypatch.setenv("RLPIPE_NOTE", "SENTINEL-not-secret")  # harmless name: left alone
    obj = {
        "log": ["step 3: auth with SENTINEL-aws-0123456789 failed", {"msg": "k=SENTINEL-wandb-abcdef;"}],
        "cmd": ("run", "--x", "SENTINEL-my-token-42"),
        "n": 1234567,
        "s": "1234567",
        "note": "SENTINEL-not-secret",
    }
    assert redact(obj) == {
        "log": ["step 3: auth with *** failed", {"msg": "k=***;"}],
        "cmd": ("run", "--x", "***"),
        "n": 1234567,
        "s": "1234567",
        "note": "SENTINEL-not-secret",
    }
    assert redact_text("boto: SENTINEL-aws-0123456789 / SENTINEL-my-token-42") == "boto: *** / ***"
