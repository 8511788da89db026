"""`rlpipe bench storage`: the rollout and checkpoint I/O paths against the obvious baselines
(pandas Parquet, `torch.save`/`torch.load`). Speed is printed, never asserted."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.location import Location


def synthetic_rollouts(rows: int, response_len: int, seed: int = 0) -> dict[str, list]:
    """Schema-v1 columns of `rows` rollouts with `response_len` tokens (prompt: 64 tokens)."""
    rng = np.random.default_rng(seed)

    def floats() -> list[list[float]]:
        return rng.standard_normal((rows, response_len), dtype=np.float32).tolist()

    return {
        "run_id": ["bench"] * rows, "stage": ["ppo"] * rows, "step": [1] * rows, "policy_version": [1] * rows,
        "prompt_id": [f"arith/train/{i // 4}" for i in range(rows)], "sample_idx": [i % 4 for i in range(rows)],
        "dataset": ["arith"] * rows, "prompt": ["What is 12 + 30?"] * rows, "response": ["12 + 30 = 42"] * rows,
        "ground_truth": ["42"] * rows, "prompt_ids": rng.integers(0, 1024, (rows, 64)).tolist(),
        "response_ids": rng.integers(0, 1024, (rows, response_len)).tolist(), "logprobs": floats(),
        "ref_logprobs": floats(), "values": floats(), "advantages": floats(), "returns": floats(),
        "score": [1.0] * rows, "rm_score": [None] * rows, "reward": [1.0] * rows, "is_correct": [True] * rows,
        "finish_reason": ["stop"] * rows, "response_len": [response_len] * rows,
    }  # fmt: skip


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_storage(
    root: Location, rows: int = 4096, response_len: int = 256, checkpoint_mb: int = 256
) -> dict:
    """Rollout Parquet write/read (rlpipe vs. pandas) and checkpoint save/load (commit protocol with
    sha256 vs. `torch.save`/`torch.load`), under `root` (local or S3), in a fresh folder it removes."""
    import pandas as pd

    from storage.checkpoints import commit_checkpoint, restore_latest
    from storage.rollouts import read_rollouts, write_rollouts

    base = root / f"bench-storage-{time.time_ns()}"
    columns = synthetic_rollouts(rows, response_len)
    result: dict[str, Any] = {"root": root.uri, "rows": rows, "response_len": response_len}
    try:
        part = base / "rollouts" / "step=000001" / "part-00000.parquet"
        write_s, _ = timed(lambda: write_rollouts(part, columns))
        size = part.fs.size(part.path)
        read_s, table = timed(lambda: read_rollouts(base / "rollouts"))
        assert table.num_rows == rows
        frame = pd.DataFrame(columns)
        pandas_path = str(base / "pandas.parquet")
        options = {"client_kwargs": {"endpoint_url": root.endpoint_url}} if root.endpoint_url else None
        pd_write_s, _ = timed(lambda: frame.to_parquet(pandas_path, storage_options=options))
        pd_read_s, _ = timed(lambda: pd.read_parquet(pandas_path, storage_options=options))
        result["rollouts"] = {
            "file_mb": size / 1e6,
            "rlpipe_write_rows_per_s": rows / write_s, "rlpipe_write_mb_per_s": size / 1e6 / write_s,
            "rlpipe_read_rows_per_s": rows / read_s, "rlpipe_read_mb_per_s": size / 1e6 / read_s,
            "pandas_write_rows_per_s": rows / pd_write_s, "pandas_read_rows_per_s": rows / pd_read_s,
        }  # fmt: skip

        state = {f"w{i}": torch.randn(checkpoint_mb * 2**20 // 4 // 16) for i in range(16)}
        mb = sum(t.numel() * 4 for t in state.values()) / 1e6
        with tempfile.TemporaryDirectory(prefix="rlpipe-bench-") as tmp:
            staged = Path(tmp) / "staged"
            staged.mkdir()
            from safetensors.torch import save_file

            save_file(state, str(staged / "model.safetensors"))
            save_s, _ = timed(lambda: commit_checkpoint(staged, base / "checkpoints", 1))
            load_s, restored = timed(lambda: restore_latest(base / "checkpoints", Path(tmp) / "restored"))
            assert restored is not None and restored[0] == 1
            torch_path = base / "torch.pt"

            def torch_save():
                with torch_path.fs.open(torch_path.path, "wb") as f:
                    torch.save(state, f)

            def torch_load():
                with torch_path.fs.open(torch_path.path, "rb") as f:
                    return torch.load(f, weights_only=True)

            torch_save_s, _ = timed(torch_save)
            torch_load_s, _ = timed(torch_load)
            shutil.rmtree(tmp, ignore_errors=True)
        result["checkpoint"] = {
            "mb": mb,
            "rlpipe_save_mb_per_s": mb / save_s, "rlpipe_load_mb_per_s": mb / load_s,
            "torch_save_mb_per_s": mb / torch_save_s, "torch_load_mb_per_s": mb / torch_load_s,
        }  # fmt: skip
    finally:
        base.remove(recursive=True)
    return result
