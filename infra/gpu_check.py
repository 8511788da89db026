"""The GPU check: the training stages on one CUDA device, on the offline tiny model in bf16.

    infra/gpu_check.sh            (on the GPU machine: installs the carried wheels, then runs this)

What it runs and prints (one JSON object, also written to $OUT/gpu_check.json when OUT is set):
1. SFT, critic warmup and a few PPO steps (HF backend), each stage as the pipeline runs it
   (`stages.registry`), with its seconds and the GPU's peak memory;
2. three more PPO steps in this process, under a dispatch mode that records every op whose tensors
   are not all on cuda:0, with every engine's parameters checked to be on cuda:0 in bf16, the
   time per step and per phase, and the generation/trainer log-prob agreement (`logprob_gen_diff`);
3. the same PPO steps with the vLLM backend, when vllm imports (it is too large to carry).

`--allow-cpu` runs everything on the CPU: it checks this script, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: stages/, storage/, configs/

from stages.config.batches import stage_layouts  # noqa: E402
from stages.config.pipeline import load_config  # noqa: E402
from stages.data.tasks import batch_indices, encode_problems, task_problems  # noqa: E402
from stages.lifecycle.runs import open_run  # noqa: E402
from stages.models.tokenizer import load_tokenizer, pad_token_id  # noqa: E402
from stages.ppo.engines import build_models  # noqa: E402
from stages.ppo.step import StepTimer, run_step  # noqa: E402
from stages.registry import STAGES  # noqa: E402
from stages.runtime import distributed  # noqa: E402
from stages.runtime.devices import device  # noqa: E402
from stages.sampling.backends import make_generator  # noqa: E402
from storage.layout import RunLayout  # noqa: E402
from storage.metrics import read_metrics  # noqa: E402

STEPS = {"sft": 60, "critic_warmup": 3, "ppo": 4}


class DeviceAudit(TorchDispatchMode):
    """Counts the ops whose tensors (beyond 0-dim scalars) are not all on `expected`."""

    def __init__(self, expected: torch.device):
        super().__init__()
        self.expected, self.ops, self.off_device = expected, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        devices = {
            x.device for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim() > 0
        }
        if devices - {self.expected} and not func.__name__.startswith(("_to_copy", "copy_", "_local_scalar")):
            name = f"{func} {sorted(str(d) for d in devices)}"
            self.off_device[name] = self.off_device.get(name, 0) + 1
        return func(*args, **kwargs)


def overrides(root: str, run_id: str) -> list[str]:
    return [
        f"storage.root={root}", f"run_id={run_id}", "wandb.mode=disabled", "reward_model.enabled=false",
        "model.critic_init=policy", "task.heldout_size=32", "evaluate.enabled=false",
        f"sft.steps={STEPS['sft']}", f"sft.save_every={STEPS['sft']}", "sft.log_every=10",
        f"critic_warmup.steps={STEPS['critic_warmup']}", f"critic_warmup.save_every={STEPS['critic_warmup']}",
        f"ppo.steps={STEPS['ppo']}", f"ppo.save_every={STEPS['ppo']}", "ppo.eval_every=null", "ppo.kl_coef=0.05",
    ]  # fmt: skip


def run_stages(config) -> dict:
    """Each stage as the pipeline runs it: seconds and peak GPU memory."""
    report = {}
    for name in ("sft", "critic_warmup", "ppo"):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        STAGES[name].run(config, force=True)
        report[name] = {"seconds": round(time.perf_counter() - started, 2), "steps": STEPS[name]}
        if torch.cuda.is_available():
            report[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    layout = RunLayout(config.storage.root_location(), config.run_id)
    ppo_rows = [r for r in read_metrics(layout.metrics("ppo")) if "ppo/logprob_gen_diff" in r]
    report["ppo"]["logprob_gen_diff"] = [r["ppo/logprob_gen_diff"] for r in ppo_rows]
    return report


def audited_steps(config, steps: int = 3) -> dict:
    """PPO steps in this process under the device audit, from the stages' own outputs."""
    layout = RunLayout(config.storage.root_location(), config.run_id)
    policy = str(Path(layout.final("sft", "policy").path))
    critic = str(Path(layout.final("critic_warmup", "value").path))
    tokenizer = load_tokenizer(policy)
    batches = stage_layouts(config, "ppo", distributed.world_size())
    models = build_models(config.ppo, config.model, {"policy": policy, "critic": critic}, batches)
    expected = device()
    engines = {name: engine for name, engine in models.engines.items()}
    placement = {
        name: sorted({f"{p.device}/{p.dtype}" for p in engine.module.parameters()})
        for name, engine in engines.items()
    }
    generator = make_generator(
        config.generation, policy if config.generation.backend == "vllm" else models.policy,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), seed=0, model=config.model,
    )  # fmt: skip
    train = encode_problems(task_problems(config.task, "train"), tokenizer)
    ppo, timer, step_seconds, diffs, syncs = config.ppo, StepTimer(), [], [], []
    audit = DeviceAudit(expected)
    for step in range(steps):
        picked = batch_indices(len(train), ppo.prompts_per_step, step, config.seed)
        prompts = [train[i] for i in picked for _ in range(ppo.samples_per_prompt)]
        group_ids_B = torch.tensor([i for i in picked for _ in range(ppo.samples_per_prompt)])
        started = time.perf_counter()
        with audit:
            outcome = run_step(
                models, generator, prompts, group_ids_B, tokenizer, ppo=ppo, sampling=config.generation,
                reward=config.reward, seed=config.seed, step=step + 1, rank=0, train_policy=True, timer=timer,
            )  # fmt: skip
        step_seconds.append(round(time.perf_counter() - started, 3))
        diffs.append(outcome.old.logprob_gen_diff)
        syncs.append(outcome.stats["weight_sync_s"])
    generator.close()
    return {
        "device": str(expected),
        "engines": placement,
        "ops_audited": audit.ops,
        "ops_off_device": audit.off_device,
        "step_seconds": step_seconds,
        "phase_seconds_per_step": {k: round(v / steps, 3) for k, v in timer.seconds.items()},
        "logprob_gen_diff": diffs,
        "weight_sync_s": syncs,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="Run on the CPU (checks the script only).")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device (use --allow-cpu to check the script on a CPU)", file=sys.stderr)
        return 2
    distributed.init_distributed()
    root = tempfile.mkdtemp(prefix="rlpipe-gpu-check-")
    summary: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    config = load_config(None, overrides(root, "hf"))
    open_run(config)
    summary["hf"] = {"stages": run_stages(config), "audited": audited_steps(config)}
    try:
        import vllm  # noqa: F401

        vllm_config = config.model_copy(
            update={"generation": config.generation.model_copy(update={"backend": "vllm"})}
        )
        summary["vllm"] = {"audited": audited_steps(vllm_config)}
    except ImportError:
        summary["vllm"] = "not installed (too large to carry): not checked"
    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    ok = not summary["hf"]["audited"]["ops_off_device"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
