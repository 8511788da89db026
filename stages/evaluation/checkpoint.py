"""Evaluating one checkpoint: sample greedy and sampled responses on each benchmark, grade them,
compute the report's metrics (`evaluate_checkpoint`), as the `evaluate` stage and `rlpipe eval` do.

Per benchmark: greedy accuracy (one greedy response per problem), pass@1 (the mean over `samples`
responses at `temperature`), unbiased pass@k and maj@k for k = 1, 2, 4, ... <= samples, mean
response length and the truncated fraction of the sampled responses. A response cut at
`max_new_tokens` is wrong; a prompt that leaves no room for `max_new_tokens` in the model's
context is not generated at all and counts as wrong (`prompt_too_long` in the samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.config.evaluation import BENCHMARKS
from stages.config.models import ModelConfig
from stages.config.pipeline import PipelineConfig
from stages.config.sampling import SamplingConfig
from stages.config.task import TaskConfig
from stages.data.grading import extract_answer, grade
from stages.data.problems import format_prompt, load_problems
from stages.data.prompt_rendering import prompt_token_ids, stop_token_ids, uses_chat
from stages.data.records import DataError, Problem
from stages.data.tasks import task_problems
from stages.evaluation.metrics import k_values, mean_maj_at_k, mean_pass_at_k
from stages.lifecycle.contract import StageError
from stages.models.tokenizer import pad_token_id
from stages.sampling.backends import make_generator

STAGE = "evaluate"


@dataclass(frozen=True)
class EvalSettings:
    """Everything `evaluate_checkpoint` needs, resolved (no defaults left to the config)."""

    benchmarks: list[str]
    samples: int
    sampling: SamplingConfig  # temperature and max_new_tokens resolved
    limits: dict[str, int | None]  # benchmark -> first N problems (None: all)
    seed: int
    task: TaskConfig  # the arith benchmark is the task's held-out split
    model: ModelConfig  # how checkpoints load: dtype, attention, remote code

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


def settings_from_config(config: PipelineConfig) -> EvalSettings:
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
        model=config.model,
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
    tokenizer, context = _load_tokenizer(model_dir, uri, settings.model.trust_remote_code)
    generator = make_generator(
        settings.sampling,
        model_dir,
        eos_token_id=stop_token_ids(tokenizer, settings.task.prompt_format),
        pad_token_id=pad_token_id(tokenizer),
        seed=settings.seed,
        model=settings.model,
    )
    try:
        result = CheckpointResult(uri=uri, benchmarks={})
        budget = settings.sampling.max_new_tokens
        chat = uses_chat(tokenizer, settings.task.prompt_format)  # instruct models read their template
        for name in settings.benchmarks:
            problems = benchmark_problems(name, settings.limits[name], settings.task)
            prompts = [prompt_token_ids(format_prompt(p), tokenizer, chat) for p in problems]
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
    finally:
        generator.close()  # one engine at a time: the next checkpoint gets the memory
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
