"""Evaluation reports people read: report.json, report.md, a self-contained report.html, plots.

A checkpoint label's report holds that checkpoint and every label evaluated in the run before it
(`initial` before `final`), so the final report shows what training changed. When the run has PPO
metrics, the report also plots reward and accuracy against the PPO step, and the value
diagnostics of the last PPO step's rollouts (value by position and by length bin, correct vs.
incorrect responses), computed offline by `value_diagnostics_from_rollouts`.

Several runs side by side: `stages.evaluation.comparison`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from stages.critic.diagnostics import value_diagnostics_from_rollouts
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import utc_now
from storage.metrics import read_metrics
from storage.reports import read_report, read_samples, write_report, write_samples
from storage.rollouts import read_rollouts, rollout_steps

HEADLINE = ("greedy", "pass@1")


# ---------------------------------------------------------------------------------------------
# one run's evaluation report
# ---------------------------------------------------------------------------------------------
def publish_evaluation(
    layout: RunLayout, label: str, result, settings: dict, config_hash: str | None
) -> Location:
    """Write a label's samples, then its report (plots, md, html, json last); returns report.json."""
    write_samples(layout.samples(label), result.samples)
    checkpoints = {k: v for k, v in earlier_checkpoints(layout).items() if k != label}
    checkpoints[label] = {"uri": result.uri, "evaluated_at": utc_now(), "benchmarks": result.benchmarks}
    report = {
        "run_id": layout.run_id,
        "created": utc_now(),
        "config": {"evaluation": settings, "run_config_hash": config_hash},
        "checkpoints": checkpoints,
    }
    lengths = {
        name: _sampled_lengths(layout, name, result.samples if name == label else None)
        for name in checkpoints
    }
    plots = evaluation_plots(
        report, lengths, read_metrics(layout.metrics("ppo")), last_step_diagnostics(layout)
    )
    return write_report(
        layout.evaluation(label),
        report,
        markdown=render_markdown(report, list(plots)),
        html=render_html(report, plots),
        plots=plots,
    )


def earlier_checkpoints(layout: RunLayout) -> dict[str, dict]:
    """label -> its own checkpoint entry, for every label of the run with a report, oldest first."""
    found = {}
    for name in layout.stage("evaluate").list_names():
        report = read_report(layout.report(name, "json")) if name != "manifest.json" else None
        if report and name in report["checkpoints"]:
            found[name] = report["checkpoints"][name]
    return dict(sorted(found.items(), key=lambda item: item[1].get("evaluated_at", "")))


def last_step_diagnostics(layout: RunLayout) -> dict | None:
    """Value diagnostics of the last PPO step's stored rollouts; None without PPO or critic values."""
    steps = rollout_steps(layout.rollouts("ppo"))
    if not steps:
        return None
    table = read_rollouts(layout.rollouts("ppo"), steps=[steps[-1]])
    if not any(table.column("values").to_pylist()):
        return None  # GRPO: no critic
    return {"step": steps[-1], **value_diagnostics_from_rollouts(table)}


def _sampled_lengths(layout: RunLayout, label: str, columns: dict | None) -> list[int]:
    if columns is None:
        try:
            columns = read_samples(layout.samples(label)).select(["mode", "response_len"]).to_pydict()
        except (FileNotFoundError, ValueError):
            return []
    return [n for mode, n in zip(columns["mode"], columns["response_len"], strict=True) if mode == "sampled"]


def report_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(benchmark, label, metrics) in benchmark order, then checkpoint order."""
    benchmarks: list[str] = list(report["config"]["evaluation"].get("benchmarks", []))
    for entry in report["checkpoints"].values():
        benchmarks += [b for b in entry["benchmarks"] if b not in benchmarks]
    return [
        (bench, label, entry["benchmarks"][bench])
        for bench in benchmarks
        for label, entry in report["checkpoints"].items()
        if bench in entry["benchmarks"]
    ]


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "benchmark",
        "checkpoint",
        "problems",
        "greedy",
        "pass@1",
        "pass@k",
        "maj@k",
        "mean len",
        "truncated",
    ]
    rows = []
    for bench, label, m in report_rows(report):
        k = max(m["pass@k"], key=int)
        rows.append([bench, label, str(m["n_problems"]), fmt(m["greedy"]), fmt(m["pass@1"]),
                     f"{fmt(m['pass@k'][k])} (k={k})", f"{fmt(m['maj@k'][k])} (k={k})",
                     f"{m['mean_response_len']:.1f}", fmt(m["truncated_frac"])])  # fmt: skip
    return header, rows


def _changes(report: dict) -> list[str]:
    """One line per benchmark: how the last checkpoint compares with the first (pass@1, greedy)."""
    labels = list(report["checkpoints"])
    if len(labels) < 2:
        return []
    first, last = (
        report["checkpoints"][labels[0]]["benchmarks"],
        report["checkpoints"][labels[-1]]["benchmarks"],
    )
    lines = []
    for bench in (b for b in dict.fromkeys(b for b, _, _ in report_rows(report)) if b in first and b in last):
        deltas = ", ".join(f"{m} {last[bench][m] - first[bench][m]:+.3f}" for m in HEADLINE)
        lines.append(f"{bench}: {labels[-1]} vs. {labels[0]}: {deltas}")
    return lines


def render_markdown(report: dict, plot_names: list[str]) -> str:
    header, rows = report_table(report)
    settings = report["config"]["evaluation"]
    out = [
        f"# Evaluation of run {report['run_id']}",
        "",
        f"Created {report['created']}. {settings['samples']} samples per problem at temperature "
        f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens; a response cut "
        "at the limit counts as wrong.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Checkpoints:",
        *(f"- `{label}`: {entry['uri']}" for label, entry in report["checkpoints"].items()),
    ]
    if changes := _changes(report):
        out += ["", "What training changed:", *(f"- {line}" for line in changes)]
    out += ["", *(f"![{name}](plots/{name})" for name in plot_names)]
    return "\n".join(out) + "\n"


# Marks every plot as loaded or broken once the page has loaded (a broken one says so visibly).
_IMAGE_CHECK = """<script>
window.addEventListener("load", function () {
  document.querySelectorAll("img.plot").forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { img.dataset.loaded = "1"; }
    else { img.classList.add("broken"); img.insertAdjacentText("afterend", "(plot failed to load)"); }
  });
});
</script>"""


def render_html(report: dict, plots: dict[str, bytes]) -> str:
    """A self-contained page: the table, the changes, and the plots embedded as data URIs."""
    header, rows = report_table(report)
    esc = html.escape
    settings = report["config"]["evaluation"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation of {esc(report['run_id'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:48%;margin:4px}</style>",
        "</head><body>",
        f"<h1>Evaluation of run {esc(report['run_id'])}</h1>",
        f"<p>Created {esc(report['created'])}. {settings['samples']} samples per problem at temperature "
        f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens.</p>",
        "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows),
        "</table><ul>",
        *(
            f"<li><code>{esc(label)}</code>: {esc(entry['uri'])}</li>"
            for label, entry in report["checkpoints"].items()
        ),
        "</ul>",
    ]
    if changes := _changes(report):
        parts += ["<h2>What training changed</h2><ul>", *(f"<li>{esc(c)}</li>" for c in changes), "</ul>"]
    parts.append("<h2>Plots</h2>")
    for name, png in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<img class='plot' alt='{esc(name)}' src='data:image/png;base64,{data}'>")
    parts += [_IMAGE_CHECK, "</body></html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def figure():
    """(pyplot, a new figure) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in worker processes
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(6.4, 4.0), dpi=90)


def png_bytes(plt, fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def evaluation_plots(
    report: dict, lengths: dict[str, list[int]], ppo_rows: list[dict], diagnostics: dict | None
) -> dict[str, bytes]:
    plots = {"accuracy.png": _accuracy_plot(report), "response_length.png": _length_plot(lengths)}
    steps = [r for r in ppo_rows if "ppo/reward" in r]
    if steps:
        plots["ppo_reward_accuracy.png"] = _ppo_plot(ppo_rows)
    if diagnostics:
        for key, xlabel in (
            ("by_position", "response token position"),
            ("by_length_bin", "percentile-of-length bin (of 20)"),
        ):
            plots[f"value_{key}.png"] = _value_plot(diagnostics, key, xlabel)
    return plots


def _accuracy_plot(report: dict) -> bytes:
    plt, fig = figure()
    ax = fig.add_subplot()
    labels = list(report["checkpoints"])
    benches = list(dict.fromkeys(bench for bench, _, _ in report_rows(report)))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        metrics = report["checkpoints"][label]["benchmarks"]
        xs = [j + i * width for j, b in enumerate(benches) if b in metrics]
        ax.bar(xs, [metrics[b]["pass@1"] for b in benches if b in metrics], width, label=f"{label} pass@1")
        ax.scatter(xs, [metrics[b]["greedy"] for b in benches if b in metrics], marker="_", s=200, color="k")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(benches))], benches)
    ax.set_ylabel("accuracy (bars: pass@1; dashes: greedy)")
    ax.set_ylim(0, 1)
    ax.legend()
    return png_bytes(plt, fig)


def _length_plot(lengths: dict[str, list[int]]) -> bytes:
    plt, fig = figure()
    ax = fig.add_subplot()
    for label, values in lengths.items():
        if values:
            ax.hist(values, bins=30, alpha=0.5, label=label)
    ax.set_xlabel("sampled response length (tokens)")
    ax.set_ylabel("responses")
    if any(lengths.values()):
        ax.legend()
    return png_bytes(plt, fig)


def _ppo_plot(rows: list[dict]) -> bytes:
    plt, fig = figure()
    ax = fig.add_subplot()
    train = [r for r in rows if "ppo/reward" in r]
    ax.plot([r["step"] for r in train], [r["ppo/reward"] for r in train], lw=0.6, alpha=0.6, label="reward")
    if any("ppo/accuracy" in r for r in train):
        acc = [r for r in train if "ppo/accuracy" in r]
        ax.plot(
            [r["step"] for r in acc],
            [r["ppo/accuracy"] for r in acc],
            lw=0.6,
            alpha=0.6,
            label="train accuracy",
        )
    for key in ("ppo/heldout_sampled", "ppo/heldout_greedy"):
        held = [r for r in rows if r.get(key) is not None]
        if held:
            ax.plot(
                [r["step"] for r in held],
                [r[key] for r in held],
                "o-",
                label=key.split("/")[-1].replace("_", " "),
            )
    ax.set_xlabel("PPO step")
    ax.legend()
    return png_bytes(plt, fig)


def _value_plot(diagnostics: dict, key: str, xlabel: str) -> bytes:
    plt, fig = figure()
    ax = fig.add_subplot()
    for group in ("correct", "incorrect"):
        curve = diagnostics.get(f"value_{group}_{key}") or []
        points = [(x, v) for x, v in enumerate(curve) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=f"{group} responses")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean value (PPO step {diagnostics['step']})")
    ax.legend()
    return png_bytes(plt, fig)
