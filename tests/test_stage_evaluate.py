"""Evaluation: `rlpipe eval` on every benchmark writes every output with its schema; the report's
numbers agree with its graded samples; the HTML renders in headless Chromium; the pipeline stage
evaluates its checkpoints and is skipped when complete; `rlpipe report` compares runs; bad input
gets one line and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_runs import RLPIPE

from flows.cli import main
from stages.config.evaluation import BENCHMARKS
from stages.evaluate import default_label
from stages.evaluation.metrics import mean_pass_at_k
from storage.layout import RunLayout, comparison
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import append_metrics
from storage.reports import read_report, read_samples

QUICK = ["--limit", "3", "--samples", "2", "--max-new-tokens", "8"]
BENCHMARK_KEYS = {
    "n_problems",
    "n_samples",
    "greedy",
    "pass@1",
    "pass@k",
    "maj@k",
    "mean_response_len",
    "truncated_frac",
}
SAMPLE_COLUMNS = {"problem_id", "problem", "ground_truth", "response", "extracted_answer", "correct", "label"}
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def endpoint_args(root: Location) -> list[str]:
    return ["--set", f"storage.endpoint_url={root.endpoint_url}"] if root.endpoint_url else []


def check_outputs(layout: RunLayout, label: str, benchmarks: list[str], samples: int, problems: int) -> dict:
    """Every output file exists with the issue's schema; returns report.json."""
    report = read_report(layout.report(label, "json"))
    assert set(report) >= {"run_id", "created", "config", "checkpoints"} and report["run_id"] == layout.run_id
    entry = report["checkpoints"][label]
    assert set(entry) >= {"uri", "benchmarks"} and set(entry["benchmarks"]) == set(benchmarks)
    ks = [str(k) for k in (1, 2, 4, 8) if k <= samples]
    for name, metrics in entry["benchmarks"].items():
        assert set(metrics) >= BENCHMARK_KEYS, name
        assert metrics["n_problems"] == problems and metrics["n_samples"] == samples
        assert list(metrics["pass@k"]) == ks and list(metrics["maj@k"]) == ks
        for value in (
            metrics["greedy"],
            metrics["pass@1"],
            metrics["truncated_frac"],
            *metrics["pass@k"].values(),
        ):
            assert 0.0 <= value <= 1.0
    table = read_samples(layout.samples(label))
    assert set(table.column_names) >= SAMPLE_COLUMNS
    assert table.num_rows == len(benchmarks) * problems * (1 + samples)
    assert set(table.column("label").to_pylist()) == {label}
    assert "| benchmark | checkpoint |" in layout.report(label, "md").read_text()
    assert layout.report(label, "html").read_text().startswith("<!DOCTYPE html>")
    plots = layout.plots(label)
    for name in ("accuracy.png", "response_length.png"):
        assert (plots / name).read_bytes().startswith(PNG)
    return report


def test_eval_on_every_benchmark_writes_every_output(storage_root, data_dir, capsys):
    code, out, err = run_cli(
        capsys, "eval", "--checkpoint", "tiny", "--benchmark", ",".join(BENCHMARKS), *QUICK,
        "--label", "t0", "--run-id", "ev", "--storage", storage_root.uri, *endpoint_args(storage_root),
    )  # fmt: skip
    assert code == 0, err
    layout = RunLayout(storage_root, "ev")
    assert str(layout.report("t0", "md")) in out
    report = check_outputs(layout, "t0", list(BENCHMARKS), samples=2, problems=3)
    assert report["config"]["evaluation"]["max_new_tokens"] == 8
    # the report's numbers are the graded samples' numbers
    table = read_samples(layout.samples("t0")).to_pydict()
    for name, metrics in report["checkpoints"]["t0"]["benchmarks"].items():
        rows = [i for i, b in enumerate(table["benchmark"]) if b == name]
        greedy = [table["correct"][i] for i in rows if table["mode"][i] == "greedy"]
        sampled = [i for i in rows if table["mode"][i] == "sampled"]
        by_problem: dict[str, list[bool]] = {}
        for i in sampled:
            by_problem.setdefault(table["problem_id"][i], []).append(table["correct"][i])
        assert metrics["greedy"] == pytest.approx(sum(greedy) / len(greedy))
        assert metrics["pass@1"] == pytest.approx(mean_pass_at_k(list(by_problem.values()), 1))
        assert metrics["truncated_frac"] == pytest.approx(
            sum(table["finish_reason"][i] == "length" for i in sampled) / len(sampled)
        )
    # a response that did not finish is never correct
    assert not any(c for c, f in zip(table["correct"], table["finish_reason"], strict=True) if f != "stop")


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    """A run evaluated by the SFT-free `tiny` policy twice (labels a, b) on arith, through the CLI."""
    root = tmp_path_factory.mktemp("evals")
    for label in ("a", "b"):
        proc = subprocess.run(
            [RLPIPE, "eval", "--checkpoint", "tiny", "--benchmark", "arith", *QUICK, "--label", label,
             "--run-id", "ar", "--storage", str(root)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return RunLayout(Location(str(root)), "ar")


def test_a_later_label_reports_the_earlier_ones_too(arith_run):
    first = check_outputs(arith_run, "a", ["arith"], samples=2, problems=3)
    second = check_outputs(arith_run, "b", ["arith"], samples=2, problems=3)
    assert list(first["checkpoints"]) == ["a"] and list(second["checkpoints"]) == ["a", "b"]
    # the same checkpoint and seed: the same numbers
    assert second["checkpoints"]["a"]["benchmarks"] == second["checkpoints"]["b"]["benchmarks"]
    markdown = arith_run.report("b", "md").read_text()
    assert "What training changed:" in markdown and "arith: b vs. a: greedy +0.000, pass@1 +0.000" in markdown


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium installed (CI installs it)")
def test_html_report_renders_its_plots_in_headless_chromium(arith_run, tmp_path):
    page = Path(arith_run.report("b", "html").path)
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "--virtual-time-budget=5000",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_plots = len(arith_run.plots("b").list_names())
    assert n_plots >= 2
    assert proc.stdout.count('data-loaded="1"') == n_plots, "every embedded plot decoded"
    assert "plot broken" not in proc.stdout
    assert "Uncaught" not in proc.stderr and ":CONSOLE" not in proc.stderr


def test_report_compares_runs_and_plots_accuracy_vs_samples(arith_run, capsys):
    root = arith_run.root
    other = RunLayout(root, "other")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", "tiny", "--benchmark", "arith", *QUICK,
                           "--label", "final", "--run-id", "other", "--storage", root.uri)  # fmt: skip
    assert code == 0, err
    # PPO's held-out curve of "other" (the defaults: 32 prompts x 4 samples per step)
    append_metrics(other.metrics("ppo"), {"step": 0, "ppo/heldout_sampled": 0.25})
    append_metrics(other.metrics("ppo"), {"step": 10, "ppo/heldout_sampled": 0.5})
    code, out, err = run_cli(capsys, "report", "ar", "other", "--storage", root.uri)
    assert code == 0, err
    assert any(line.startswith("ar ") for line in out.splitlines())
    assert any(line.startswith("other ") and " final " in line for line in out.splitlines())
    folder = comparison(root, ["ar", "other"])
    stored = json.loads((folder / "report.json").read_text())
    assert stored["heldout_vs_samples"]["other"] == [[0, 0.25], [1280, 0.5]]
    assert stored["heldout_vs_samples"]["ar"] == []
    assert (folder / "heldout_vs_samples.png").read_bytes().startswith(PNG)
    code, _, err = run_cli(capsys, "report", "ar", "nope", "--storage", root.uri)
    assert code == 1 and err.strip() == f"error: unknown run 'nope' in {root.uri}"


def test_prompts_longer_than_the_context_count_as_wrong(data_dir, tmp_path, capsys):
    # the tiny model's context is 512 tokens: 510 new tokens leave no room for any AIME prompt
    code, _, err = run_cli(capsys, "eval", "--checkpoint", "tiny", "--benchmark", "aime24", "--limit", "2",
                           "--samples", "1", "--max-new-tokens", "510", "--label", "x", "--run-id", "long",
                           "--storage", str(tmp_path))  # fmt: skip
    assert code == 0, err
    layout = RunLayout(Location(str(tmp_path)), "long")
    metrics = read_report(layout.report("x", "json"))["checkpoints"]["x"]["benchmarks"]["aime24"]
    assert metrics["prompt_too_long"] == 2 and metrics["greedy"] == 0.0 and metrics["pass@1"] == 0.0
    table = pq.read_table(layout.samples("x").path).to_pydict()
    assert set(table["finish_reason"]) == {"prompt_too_long"} and not any(table["correct"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "tiny", "--benchmark", "arith,gsm9k"], "error: unknown benchmark gsm9k (known: arith, gsm8k, math500, aime24, aime25)"),
        (["--checkpoint", "/nonexistent/model", "--benchmark", "arith"], "error: model not found: /nonexistent/model (has the stage that writes it run?)"),
        (["--checkpoint", "tiny", "--benchmark", "arith", "--label", "a/b"], "error: evaluate: invalid label: invalid label 'a/b'"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    root = tmp_path / "runs"
    code, _, err = run_cli(capsys, "eval", *args, "--run-id", "bad", "--storage", str(root))
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith(message), err
    assert not root.exists()


def test_an_unloadable_checkpoint_and_missing_data_get_one_line(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(junk), "--benchmark", "arith",
                           "--storage", str(tmp_path / "runs"))  # fmt: skip
    assert (
        code == 1
        and err.startswith(f"error: evaluate: cannot load checkpoint {junk}")
        and len(err.splitlines()) == 1
    )
    monkeypatch.setenv("RLPIPE_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", "--checkpoint", "tiny", "--benchmark", "gsm8k",
                           "--storage", str(tmp_path / "runs"))  # fmt: skip
    assert code == 1 and "gsm8k" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_pipeline_stage_evaluates_its_checkpoints_and_is_skipped_when_complete(tmp_path):
    no_training = [f"{s}.enabled=false" for s in ("sft", "reward_model", "critic_warmup", "ppo")]
    sets = [*no_training, "model.policy=tiny", "evaluate.benchmarks=[arith]", "evaluate.limit=50", "evaluate.limits={arith: 3}",
            "evaluate.samples=2", "generation.max_new_tokens=8", "evaluate.checkpoints={again: tiny}",
            "wandb.mode=disabled"]  # fmt: skip
    args = [
        RLPIPE,
        "run",
        "--run-id",
        "pipe",
        "--storage",
        str(tmp_path),
        *[a for s in sets for a in ("--set", s)],
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    layout = RunLayout(Location(str(tmp_path)), "pipe")
    manifest = read_manifest(layout.manifest("evaluate"))
    assert manifest.outputs == {
        "initial": str(layout.report("initial", "json")),
        "again": str(layout.report("again", "json")),
        "report": str(layout.report("again", "md")),
    }
    assert set(manifest.inputs) == {"initial", "again"}
    report = check_outputs(layout, "again", ["arith"], samples=2, problems=3)
    assert list(report["checkpoints"]) == ["initial", "again"]
    assert (
        manifest.metrics["again/arith/pass@1"]
        == report["checkpoints"]["again"]["benchmarks"]["arith"]["pass@1"]
    )
    assert f"report: {layout.report('again', 'md')}" in first.stdout
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "  evaluate       skipped" in second.stdout
    assert "evaluate: complete for this config and inputs, skipped" in second.stderr  # the flow's log


def test_default_label_names_the_checkpoint():
    assert default_label("/runs/r1/ppo/final/policy") == "ppo-final-policy"
    assert default_label("s3://bucket/runs/r1/sft/final/policy/") == "sft-final-policy"
    assert default_label("Qwen/Qwen2.5-0.5B") == "Qwen-Qwen2.5-0.5B"
    assert default_label("tiny") == "tiny"


def test_a_killed_evaluation_reruns_to_a_complete_report(tmp_path):
    """kill -9 in the second checkpoint's generation: no manifest, no half-written report.json; the
    rerun writes every output. (tests/faultpoints: `generate:3` = "again"'s greedy pass.)"""
    from kill_points import kill_during

    sets = ["model.policy=tiny", "sft.enabled=false", "ppo.enabled=false", "evaluate.benchmarks=[arith]",
            "evaluate.limits={arith: 3}", "evaluate.samples=2", "generation.max_new_tokens=8",
            "evaluate.checkpoints={again: tiny}", "wandb.mode=disabled"]  # fmt: skip
    command = [RLPIPE, "stage", "evaluate", "--run-id", "k", "--storage", str(tmp_path)]
    layout = RunLayout(Location(str(tmp_path)), "k")
    kill_during([*command, *[a for s in sets for a in ("--set", s)]], layout, "evaluate", "generate:3")
    assert read_manifest(layout.manifest("evaluate")) is None
    assert not Path(layout.report("again", "json").path).exists()  # report.json is written last
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert read_manifest(layout.manifest("evaluate")) is not None
    report = check_outputs(layout, "again", ["arith"], samples=2, problems=3)
    assert list(report["checkpoints"]) == ["initial", "again"]


def test_one_checkpoint_is_an_ordinary_stage_entry(tmp_path):
    """`python -m stages.evaluate --checkpoint URI --label L` (what the scheduled evaluation launches)
    writes that label's report into the run and no manifest; half the pair is bad input (exit 3)."""
    from stages.config.pipeline import load_config

    config = load_config(
        None,
        [f"storage.root={tmp_path}", "run_id=entry", "wandb.mode=disabled", "evaluate.benchmarks=[arith]",
         "evaluate.limits={arith: 3}", "evaluate.samples=2", "generation.max_new_tokens=8"],
    )  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    entry = [sys.executable, "-m", "stages.evaluate", "--config", str(path)]
    proc = subprocess.run([*entry, "--checkpoint", "tiny", "--label", "t1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layout = RunLayout(Location(str(tmp_path)), "entry")
    check_outputs(layout, "t1", ["arith"], samples=2, problems=3)
    assert read_manifest(layout.manifest("evaluate")) is None
    half = subprocess.run([*entry, "--checkpoint", "tiny"], capture_output=True, text=True)
    assert (
        half.returncode == 3
        and half.stderr.strip() == "error: evaluate: --checkpoint and --label go together"
    )
