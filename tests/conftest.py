"""Shared fixtures: a real S3-compatible server (moto, over HTTP) and storage roots on both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from storage.location import Location


def verify_committed(checkpoints: Location, step: int) -> None:
    """Raise CorruptCheckpointError unless every file COMMITTED lists for `step` is there, intact
    (download_checkpoint re-hashes each one into a throwaway folder)."""
    import tempfile

    from storage.checkpoints import download_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        download_checkpoint(checkpoints, step, folder)


# A quick SFT start (30 steps) that the PPO and critic-warmup stage tests build their runs on.
QUICK_SFT = [
    "wandb.mode=disabled",
    "task.train_size=400",
    "task.heldout_size=8",
    "sft.steps=30",
    "sft.save_every=30",
    "sft.log_every=30",
    "sft.optim.lr=0.002",
    "sft.optim.warmup_steps=5",
    "sft.optim.micro_batch_size=32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start `moto.server` in its own process; tests reach it over HTTP through s3fs/botocore."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials():
    # The test server accepts any credentials; these never reach a real account.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)


@pytest.fixture
def s3_root(s3_endpoint) -> Location:
    """A fresh bucket on the test server."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    root = Location(f"s3://{bucket}", endpoint_url=s3_endpoint)
    root.fs.mkdir(bucket)
    return root / "runs"


@pytest.fixture
def local_root(tmp_path) -> Location:
    return Location(str(tmp_path / "runs"))


@pytest.fixture(params=["local", "s3"])
def storage_root(request) -> Location:
    """The same test against a local directory and against the S3 server."""
    if request.param == "local":
        return request.getfixturevalue("local_root")
    return request.getfixturevalue("s3_root")


# ---------------------------------------------------------------------------------------------
# A tiny random Qwen2 causal LM in Hugging Face format, for tests of models, engines, generation.
# Token ids only: 0 = pad, 1 = eos. (The offline `tiny` recipe's real builder is tested on its own.)
# ---------------------------------------------------------------------------------------------
TINY_PAD_ID, TINY_EOS_ID, TINY_VOCAB = 0, 1, 64


def make_tiny_qwen2(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=TINY_PAD_ID,
        eos_token_id=TINY_EOS_ID,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float().eval()


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """Path of a saved tiny random Qwen2ForCausalLM (safetensors), built once per session."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_qwen2().save_pretrained(path)
    return str(path)


def scored_rows(
    prompts: list[list[int]], responses: list[list[int]], rewards: list[float], logprob: float = 0.0
):
    """Scored samples of prompt/response token ids, 4 samples per prompt, correct where the reward is 1."""
    from stages.sampling.rollout_rows import ScoredSample

    return [
        ScoredSample(
            prompt_id=f"p{i // 4}",
            sample_idx=i % 4,
            dataset="arith",
            prompt="q",
            ground_truth="1",
            response="r",
            prompt_ids=p,
            response_ids=r,
            logprobs=[logprob] * len(r),
            finish_reason="stop",
            policy_version=0,
            score=float(reward),
            rm_score=None,
            reward=float(reward),
            is_correct=reward == 1,
        )  # fmt: skip
        for i, (p, r, reward) in enumerate(zip(prompts, responses, rewards, strict=True))
    ]


# ---------------------------------------------------------------------------------------------
# The evaluation data (../shared/data beside the repo in CI, or $RLPIPE_DATA_DIR).
# ---------------------------------------------------------------------------------------------
def shared_data_dir():
    """../shared/data beside the repo (as in CI), else $RLPIPE_DATA_DIR; None if neither exists."""
    from pathlib import Path

    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    if beside.is_dir():
        return beside
    env = os.environ.get("RLPIPE_DATA_DIR")
    return Path(env) if env and Path(env).is_dir() else None


@pytest.fixture
def data_dir(monkeypatch):
    """The data directory, exported as RLPIPE_DATA_DIR. Missing data FAILS (not skips) the test:
    a silent skip would hide that the loaders and graders went unchecked."""
    path = shared_data_dir()
    if path is None:
        pytest.fail("evaluation data not found: put ../shared/data beside the repo or set RLPIPE_DATA_DIR")
    monkeypatch.setenv("RLPIPE_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server for the session (`prefect_test_harness`: temporary database); its API URL."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()
