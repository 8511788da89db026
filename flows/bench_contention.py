"""`rlpipe bench contention`: SFT stage processes sharing one machine's CPUs, before and after the
thread budget (`stages.runtime.threads`).

Each mode (`runtime.threads` = `torch`, torch's default threads, the behaviour before the budget;
`auto`, the budget) runs three launches of the default tiny recipe's SFT stage, back to back:
- alone: one process, one rank (the reference);
- two at once: two independent processes started together, as two users would (`rlpipe stage`
  twice), each in its own run;
- nproc 2: one launch of 2 ranks (the same global batch, so its steps/s compares with alone's).

Speed is each stage's training loop (`steps_per_s` in its manifest: steps over the loop's wall
time, checkpoints included); model loading and the held-out accuracy at the end are not in it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.launcher import run_stage_process
from stages.lifecycle.runs import open_run, resolve_config
from storage.layout import RunLayout
from storage.manifests import read_manifest

MODES = ("torch", "auto")


def _sft_launch(
    root: Path, run_id: str, steps: int, threads: str, nproc: int, log: Callable[[str], None]
) -> dict:
    """Run SFT alone in a new run; its manifest's speed and threads."""
    overrides = [f"sft.steps={steps}", f"sft.save_every={steps}", f"runtime.threads={threads}"]
    config, _ = resolve_config(None, overrides, run_id=run_id, storage=str(root))
    layout = open_run(config)
    run_stage_process("sft", config, nproc=nproc, log_line=log)
    manifest = read_manifest(RunLayout(config.storage.root_location(), run_id).manifest("sft"))
    if manifest is None:
        raise RuntimeError(f"sft of {layout.run_id} left no manifest")
    return {k: manifest.metrics[k] for k in ("steps_per_s", "cpu_threads", "cpu_threads_fewest")}


def bench_contention(
    steps: int = 300, modes: tuple[str, ...] = MODES, log: Callable[[str], None] = lambda _: None
) -> dict:
    """{mode: {scenario: [one result per process]}} plus the ratios the targets are stated in."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlpipe-bench-contention-") as tmp:
        root = Path(tmp)
        _sft_launch(root, "warm-up", 2, "auto", 1, log)  # builds and caches the tiny model first
        for mode in modes:
            alone = [_sft_launch(root, f"{mode}-alone", steps, mode, 1, log)]
            with ThreadPoolExecutor(2) as pool:  # started together; a failure of either is raised here
                runs = [
                    pool.submit(_sft_launch, root, f"{mode}-two-{i}", steps, mode, 1, log) for i in range(2)
                ]
                pair = [run.result() for run in runs]
            ranks = [_sft_launch(root, f"{mode}-nproc2", steps, mode, 2, log)]
            solo = alone[0]["steps_per_s"]
            results[mode] = {
                "alone": alone,
                "two_at_once": pair,
                "nproc_2": ranks,
                "two_at_once_vs_alone": min(p["steps_per_s"] for p in pair) / solo,
                "nproc_2_vs_alone": ranks[0]["steps_per_s"] / solo,
            }
    if "torch" in results and "auto" in results:
        before, after = results["torch"]["alone"][0], results["auto"]["alone"][0]
        results["alone_auto_vs_torch"] = after["steps_per_s"] / before["steps_per_s"]
    return {"steps": steps, **results}
