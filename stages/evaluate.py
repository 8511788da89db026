"""Evaluation: sample on benchmarks, grade, write a report per checkpoint label.

The pipeline's `evaluate` stage evaluates the starting policy (label `initial`: what PPO started
from) and PPO's final policy (label `final`), plus any `evaluate.checkpoints` asked for, so the
report shows what training changed. `rlpipe eval --checkpoint URI` evaluates any HF checkpoint
(local folder, storage URI, hub id or `tiny`) through the same `evaluate_checkpoint`.

Per benchmark and checkpoint: greedy accuracy (one greedy response per problem), pass@1 (the
mean over `samples` responses at `temperature`), unbiased pass@k and maj@k for k = 1, 2, 4, ...
<= samples, mean response length and the truncated fraction of the sampled responses. A response
cut at `max_new_tokens` is wrong; a prompt that leaves no room for `max_new_tokens` in the
model's context is not generated at all and counts as wrong (`prompt_too_long` in the samples).

    python -m stages.evaluate --config FILE [--force]      (or: rlpipe stage evaluate --run-id ID)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from stages import distributed
from stages.artifacts import resolve_model_dir
from stages.config import Section, non_semantic
from stages.datasets import DataError, Problem, format_prompt, load_problems
from stages.eval_metrics import k_values, mean_maj_at_k, mean_pass_at_k
from stages.generation import SamplingConfig, make_generator
from stages.inputs import layout_of, policy_uri
from stages.lifecycle import StageError, StagePlan, begin_stage, finish_stage, make_plan, stage_main
from stages.reports import publish_evaluation
from stages.rewards import extract_answer, grade
from stages.tasks import TaskConfig, task_problems
from storage.manifests import read_manifest

STAGE = "evaluate"
Benchmark = Literal["arith", "gsm8k", "math500", "aime24", "aime25"]
BENCHMARKS: tuple[str, ...] = ("arith", "gsm8k", "math500", "aime24", "aime25")


class EvaluateConfig(Section):
    enabled: bool = Field(True, description="Evaluate the starting and the final policy.")
    benchmarks: list[Benchmark] = Field(
        default_factory=lambda: list(BENCHMARKS),
        min_length=1,
        description="Benchmarks: arith (the task's held-out split), gsm8k (test), math500, aime24, aime25.",
    )
    samples: int = Field(
        4, ge=1, description="Sampled responses per problem (pass@1 is their mean; pass@k, maj@k for k <= N)."
    )
    temperature: float | None = Field(
        None, ge=0, description="Sampling temperature; null: generation.temperature (the training one)."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Response budget in tokens; null: generation.max_new_tokens."
    )
    limit: int | None = Field(
        None, ge=1, description="First N problems of each benchmark; null: all (arith: task.heldout_size)."
    )
    limits: dict[Benchmark, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="Per-benchmark problem counts that override `limit`, e.g. {arith: 200}.",
    )
    checkpoints: dict[str, str] = Field(
        default_factory=dict,
        description="More checkpoints to evaluate: label -> URI (HF folder, storage URI or hub id).",
    )
    batch_size: int = non_semantic(
        64, ge=1, description="hf backend: prompts per generation call (bounds memory)."
    )


@dataclass(frozen=True)
class EvalSettings:
    """Everything `evaluate_checkpoint` needs, resolved (no defaults left to the config)."""

    benchmarks: list[str]
    samples: int
    sampling: SamplingConfig  # temperature and max_new_tokens resolved
    limits: dict[str, int | None]  # benchmark -> first N problems (None: all)
    seed: int
    task: TaskConfig  # the arith benchmark is the task's held-out split
    trust_remote_code: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmarks": self.benchmarks,
            "samples": self.samples,
            "temperature": self.sampling.temperature,
            "max_new_tokens": self.sampling.max_new_tokens,
            "top_p": self.sampling.top_p,
            "backend": self.sampling.backend,
            "limits": self.limits,
            "seed": self.seed,
            "task": self.task.model_dump(mode="json"),
        }


@dataclass
class CheckpointResult:
    uri: str
    benchmarks: dict[str, dict[str, Any]]  # report.json's per-benchmark metrics
    samples: dict[str, list] = field(default_factory=dict)  # columns of samples.parquet


def settings_from_config(config) -> EvalSettings:
    evaluation = config.evaluate
    sampling = config.generation.model_copy(
        update={
            "temperature": config.generation.temperature
            if evaluation.temperature is None
            else evaluation.temperature,
            "max_new_tokens": evaluation.max_new_tokens or config.generation.max_new_tokens,
            "hf_batch_size": evaluation.batch_size,
        }
    )
    return EvalSettings(
        benchmarks=list(evaluation.benchmarks),
        samples=evaluation.samples,
        sampling=sampling,
        limits={name: evaluation.limits.get(name, evaluation.limit) for name in evaluation.benchmarks},
        seed=config.seed,
        task=config.task,
        trust_remote_code=config.model.trust_remote_code,
    )


def benchmark_problems(name: str, limit: int | None, task: TaskConfig) -> list[Problem]:
    """The problems of one benchmark (first `limit`); DataError when the data is missing or empty."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    if name == "arith":
        size = limit or task.heldout_size
        return task_problems(task.model_copy(update={"dataset": "arith", "heldout_size": size}), "test")
    problems = load_problems(name, "test", limit=limit)
    if not problems:
        raise DataError(f"benchmark {name}: no problems")
    return problems


def evaluate_checkpoint(model_dir: str, uri: str, label: str, settings: EvalSettings) -> CheckpointResult:
    """Generate greedy and sampled responses on every benchmark, grade them, compute the metrics."""
    tokenizer, context = _load_tokenizer(model_dir, uri, settings.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = make_generator(
        settings.sampling,
        model_dir,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        seed=settings.seed,
    )
    result = CheckpointResult(uri=uri, benchmarks={})
    budget = settings.sampling.max_new_tokens
    for name in settings.benchmarks:
        problems = benchmark_problems(name, settings.limits[name], settings.task)
        prompts = [tokenizer(format_prompt(p), add_special_tokens=False)["input_ids"] for p in problems]
        fits = [context is None or len(ids) + budget <= context for ids in prompts]
        greedy = _generate(
            generator,
            prompts,
            fits,
            1,
            settings.sampling.model_copy(update={"temperature": 0.0}),
            settings.seed,
        )
        sampled = _generate(generator, prompts, fits, settings.samples, settings.sampling, settings.seed)
        graded = {
            mode: [
                [_graded(p, s, tokenizer) for s in per_problem]
                for p, per_problem in zip(problems, rows, strict=True)
            ]
            for mode, rows in (("greedy", greedy), ("sampled", sampled))
        }
        result.benchmarks[name] = benchmark_metrics(graded["greedy"], graded["sampled"], settings.samples)
        result.benchmarks[name]["prompt_too_long"] = sum(not f for f in fits)
        _append_samples(result.samples, label, name, problems, graded)
    return result


def benchmark_metrics(greedy: list[list[dict]], sampled: list[list[dict]], n_samples: int) -> dict[str, Any]:
    """report.json's metrics of one benchmark from graded rows ([problem][sample] dicts)."""
    correct = [[row["correct"] for row in per_problem] for per_problem in sampled]
    # Only complete responses vote: a truncated one has no final answer, whatever its text says.
    answers = [
        [row["extracted_answer"] if row["finish_reason"] == "stop" else None for row in per_problem]
        for per_problem in sampled
    ]
    flat = [row for per_problem in sampled for row in per_problem]
    ks = k_values(n_samples)
    return {
        "n_problems": len(sampled),
        "n_samples": n_samples,
        "greedy": sum(rows[0]["correct"] for rows in greedy) / max(len(greedy), 1),
        "pass@1": mean_pass_at_k(correct, 1),
        "pass@k": {str(k): mean_pass_at_k(correct, k) for k in ks},
        "maj@k": {str(k): mean_maj_at_k(answers, correct, k) for k in ks},
        "mean_response_len": sum(r["response_len"] for r in flat) / max(len(flat), 1),
        "truncated_frac": sum(r["finish_reason"] == "length" for r in flat) / max(len(flat), 1),
    }


def _load_tokenizer(model_dir: str, uri: str, trust_remote_code: bool):
    """The checkpoint's tokenizer and context length (None if the config names none); one line on failure."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"{STAGE}: cannot load checkpoint {uri}: {first}") from None
    return tokenizer, getattr(model_config, "max_position_embeddings", None)


def _generate(
    generator, prompts: list[list[int]], fits: list[bool], repeats: int, sampling, seed: int
) -> list[list]:
    """[problem][sample] GeneratedSample, or None for prompts that do not fit the context."""
    batch = [(i, ids) for i, ids in enumerate(prompts) if fits[i] for _ in range(repeats)]
    generated = generator.generate([ids for _, ids in batch], sampling, seed) if batch else []
    out: list[list] = [[None] * repeats if not fit else [] for fit in fits]
    for (i, _), sample in zip(batch, generated, strict=True):
        out[i].append(sample)
    return out


def _graded(problem: Problem, sample, tokenizer) -> dict[str, Any]:
    if sample is None:
        return {"response": "", "extracted_answer": None, "correct": False,
                "finish_reason": "prompt_too_long", "response_len": 0}  # fmt: skip
    text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    correct = sample.finish_reason == "stop" and grade(problem.dataset, text, problem.answer)
    return {
        "response": text,
        "extracted_answer": extract_answer(problem.dataset, text),
        "correct": bool(correct),
        "finish_reason": sample.finish_reason,
        "response_len": len(sample.response_ids),
    }


def _append_samples(columns: dict[str, list], label: str, benchmark: str, problems, graded) -> None:
    for mode, rows in graded.items():
        for problem, per_problem in zip(problems, rows, strict=True):
            for index, row in enumerate(per_problem):
                record = {
                    "label": label, "benchmark": benchmark, "problem_id": problem.id,
                    "problem": problem.question, "ground_truth": problem.answer, "mode": mode,
                    "sample_idx": index, **row,
                }  # fmt: skip
                for key, value in record.items():
                    columns.setdefault(key, []).append(value)


def checkpoints_to_evaluate(config) -> dict[str, str]:
    """label -> URI: the starting policy, PPO's final policy (when PPO is enabled), then any extras."""
    checkpoints = {"initial": policy_uri(config, config.ppo.policy_from)}
    if config.ppo.enabled:
        layout = layout_of(config)
        if read_manifest(layout.manifest("ppo")) is None:
            raise StageError(
                f"{STAGE}: ppo has not completed in run {config.run_id}: run it first (or disable ppo)"
            )
        checkpoints["final"] = str(layout.final("ppo", "policy"))
    for label, uri in config.evaluate.checkpoints.items():
        if label in checkpoints:
            raise StageError(f"{STAGE}: checkpoint label {label!r} is reserved (initial, final)")
        checkpoints[label] = uri
    return checkpoints


def plan(config) -> StagePlan:
    """What the reports depend on: this section, sampling, task, seed; inputs: the checkpoints."""
    semantic = {"evaluate": config.evaluate, "generation": config.generation, "task": config.task}
    return make_plan(config, semantic | {"seed": config.seed}, checkpoints_to_evaluate(config))


def run(config, force: bool = False) -> None:
    """The evaluation recipe, top to bottom (one process: vLLM's tensor parallelism spreads a big model)."""
    if distributed.world_size() > 1:
        raise StageError(
            f"{STAGE}: runs as one process (got {distributed.world_size()} ranks); use --nproc 1"
        )

    # 1. Skip if complete for this config and these checkpoints; otherwise claim the stage.
    checkpoints = checkpoints_to_evaluate(config)
    settings = settings_from_config(config)
    ctx = begin_stage(STAGE, config, plan(config), force=force)
    if ctx is None:
        print(f"{STAGE}: complete for this config and inputs, skipped (use --force to rerun)", flush=True)
        return
    for name in settings.benchmarks:  # missing data fails before any model is loaded
        benchmark_problems(name, settings.limits[name], settings.task)

    # 2. Evaluate each checkpoint; its report (which includes the labels evaluated before it) is
    #    written as soon as it is done, so a crash later loses only the labels not yet written.
    reports: dict[str, str] = {}
    summary: dict[str, float] = {}  # the headline numbers, for the manifest
    for label, uri in checkpoints.items():
        model_dir = resolve_model_dir(uri, config.tiny_model, ctx.endpoint_url)
        print(f"{STAGE}: {label} = {uri}", flush=True)
        result = evaluate_checkpoint(model_dir, uri, label, settings)
        reports[label] = str(
            publish_evaluation(ctx.layout, label, result, settings.as_dict(), config_hash=ctx.config_hash)
        )
        for name, metrics in result.benchmarks.items():
            summary |= {f"{label}/{name}/{m}": metrics[m] for m in ("greedy", "pass@1")}
            print(
                f"{STAGE}: {label} {name}: greedy {metrics['greedy']:.3f} pass@1 {metrics['pass@1']:.3f}",
                flush=True,
            )

    # 3. The manifest (last): report locations and the headline numbers.
    # "report": the one to read, the last label's (it holds every label of the run).
    readable = str(ctx.layout.report(list(reports)[-1], "md"))
    finish_stage(ctx, outputs={**reports, "report": readable}, metrics=summary)
    print(f"{STAGE}: done; report at {readable}", flush=True)


def evaluate_into_run(config, uri: str, label: str) -> str:
    """`rlpipe eval`: evaluate one checkpoint in-process and write its report into the run; returns
    the report.md location. Not the pipeline stage: it writes no manifest."""
    from stages.runs import open_run
    from storage.layout import validate_run_id

    try:
        validate_run_id(label)
    except ValueError as err:
        raise StageError(f"{STAGE}: invalid label: {err}".replace("run id", "label")) from None
    settings = settings_from_config(config)
    for name in settings.benchmarks:
        benchmark_problems(name, settings.limits[name], settings.task)
    model_dir = resolve_model_dir(uri, config.tiny_model, config.storage.endpoint_url)
    result = evaluate_checkpoint(model_dir, uri, label, settings)
    layout = open_run(config)  # only now: bad input above leaves storage untouched
    publish_evaluation(layout, label, result, settings.as_dict(), config_hash=None)
    return str(layout.report(label, "md"))


def default_label(uri: str) -> str:
    """A label from a checkpoint URI: its last three path parts, e.g. `ppo-final-policy`."""
    import re

    parts = [p for p in re.split(r"[/\\]+", uri.split("://")[-1]) if p][-3:]
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-._")
    return label[:128] or "checkpoint"


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
