"""The same update on 1 or N ranks: one SFT step and one PPO update (policy and separate critic,
token-level loss, KL in the reward, advantages whitened over the global batch) on identical data move
every parameter the same on 1 rank and on 2 ranks (ZeRO-2 and ZeRO-3), and with micro-batches of 4
accumulated 4 times as with one micro-batch of 16 (`tests/equal_update_script.py`, fresh processes).

Ranks and micro-batches hold different token counts, so a loss normalised per rank or per
micro-batch instead of over the global batch fails these comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.launcher import remove_shm_buffers
from stages.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "equal_update_script.py"


def moved(tmp_path: Path, model_dir: str, name: str, micro: int, ranks: int = 1, zero: int = 2) -> dict:
    out = tmp_path / f"{name}.safetensors"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [str(SCRIPT), "--model", model_dir, "--out", str(out), "--micro", str(micro), "--zero", str(zero)]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        launcher, port = str(Path(sys.executable).parent / "deepspeed"), free_port()
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if ranks > 1:
            remove_shm_buffers(("127.0.0.1", port))  # what rlpipe's launcher does after every launch
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_file(str(out))


def assert_same_update(a: dict, b: dict) -> None:
    """Every parameter moved the same, relative to how far the parameters moved at all."""
    assert a.keys() == b.keys()
    for prefix in ("sft.", "ppo.policy.", "ppo.critic."):
        keys = [k for k in a if k.startswith(prefix)]
        scale = max(a[k].abs().max() for k in keys)
        assert scale > 0, f"{prefix}: nothing moved"
        worst = max((a[k] - b[k]).abs().max() for k in keys)
        assert worst <= 1e-4 * scale, (
            f"{prefix}: moved differently by {float(worst):.3g} (scale {float(scale):.3g})"
        )


@pytest.fixture(scope="module")
def one_rank(tiny_qwen2_dir, tmp_path_factory):
    """The reference: one rank, one micro-batch of 16 rows per optimizer step."""
    return moved(tmp_path_factory.mktemp("one"), tiny_qwen2_dir, "one", micro=16)


def test_accumulating_micro_batches_equals_one_big_batch(one_rank, tiny_qwen2_dir, tmp_path):
    assert_same_update(one_rank, moved(tmp_path, tiny_qwen2_dir, "accum", micro=4))


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_make_the_one_rank_update(one_rank, tiny_qwen2_dir, tmp_path, zero):
    assert_same_update(one_rank, moved(tmp_path, tiny_qwen2_dir, f"ranks{zero}", micro=4, ranks=2, zero=zero))


def test_the_comparison_can_fail():
    """A different weighting of the rows (what per-rank normalisation gives) is caught."""
    a = {
        "sft.w": torch.tensor([1e-3, 2e-3]),
        "ppo.policy.w": torch.tensor([1e-3]),
        "ppo.critic.w": torch.tensor([1e-3]),
    }
    b = dict(a) | {"sft.w": torch.tensor([1e-3, 2.1e-3])}
    with pytest.raises(AssertionError, match="sft.: moved differently"):
        assert_same_update(a, b)
