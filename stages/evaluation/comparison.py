"""Several runs side by side (e.g. PPO vs. its GRPO baseline): their reports' numbers in one table
and their held-out accuracy against the number of sampled responses (`rlpipe report`)."""

from __future__ import annotations

from stages.evaluation.report_pages import earlier_checkpoints, figure, fmt, png_bytes, report_rows
from storage.layout import RunLayout, comparison
from storage.location import Location
from storage.manifests import read_manifest, read_pipeline_record, utc_now
from storage.metrics import read_metrics
from storage.reports import read_report, report_json_bytes


def newest_report(layout: RunLayout) -> dict | None:
    """The run's report with the most checkpoints (the last label written), None if none."""
    entries = earlier_checkpoints(layout)
    return read_report(layout.report(list(entries)[-1], "json")) if entries else None


def compare_runs(root: Location, run_ids: list[str]) -> tuple[dict, str]:
    """Side-by-side numbers of runs; written under {root}/comparisons/; returns (json, markdown)."""
    runs: dict[str, dict] = {}
    for run_id in run_ids:
        layout = RunLayout(root, run_id)
        record = read_pipeline_record(layout)
        if record is None:
            raise FileNotFoundError(f"unknown run '{run_id}' in {root}")
        ppo_config = record["config"].get("ppo", {})
        ppo_manifest = read_manifest(layout.manifest("ppo"))
        runs[run_id] = {
            "estimator": ppo_config.get("advantage_estimator"),
            "ppo_steps": ppo_config.get("steps") if ppo_manifest else None,
            "responses_per_step": (ppo_config.get("prompts_per_step") or 0) * (ppo_config.get("samples_per_prompt") or 0),
            "report": newest_report(layout),
            "heldout": [(r["step"], r["ppo/heldout_sampled"]) for r in read_metrics(layout.metrics("ppo")) if r.get("ppo/heldout_sampled") is not None],
        }  # fmt: skip
    header = ["run", "estimator", "benchmark", "checkpoint", "greedy", "pass@1", "maj@k"]
    rows = []
    for run_id, run in runs.items():
        if run["report"] is None:
            rows.append([run_id, str(run["estimator"]), "(no evaluation)", "-", "-", "-", "-"])
            continue
        for bench, label, m in report_rows(run["report"]):
            k = max(m["maj@k"], key=int)
            rows.append([run_id, str(run["estimator"]), bench, label, fmt(m["greedy"]), fmt(m["pass@1"]),
                         f"{fmt(m['maj@k'][k])} (k={k})"])  # fmt: skip
    curves = {
        run_id: [(step * run["responses_per_step"], acc) for step, acc in run["heldout"]]
        for run_id, run in runs.items()
    }
    result = {"created": utc_now(), "runs": {k: {**v, "report": v["report"] is not None} for k, v in runs.items()},
              "table": {"header": header, "rows": rows}, "heldout_vs_samples": curves}  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    text_table = "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    )
    markdown = "\n".join([f"# Comparison of {', '.join(run_ids)}", "", "```", text_table, "```", "",
                          "![held-out accuracy vs. samples](heldout_vs_samples.png)", ""])  # fmt: skip
    folder = comparison(root, run_ids)
    (folder / "heldout_vs_samples.png").write_bytes(_curves_plot(curves))
    (folder / "report.md").write_text(markdown)
    (folder / "report.json").write_bytes(report_json_bytes(result))
    return result, text_table


def _curves_plot(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    plt, fig = figure()
    ax = fig.add_subplot()
    for run_id, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=run_id)
    ax.set_xlabel("sampled responses (PPO steps x responses per step)")
    ax.set_ylabel("held-out pass@1 (sampled)")
    if any(curves.values()):
        ax.legend()
    return png_bytes(plt, fig)
