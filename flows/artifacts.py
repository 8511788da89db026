"""What a flow shows in the Prefect UI: links to a stage's outputs, the evaluation report, progress.

Artifact keys are stable (`eval-report`, `eval-report-table`, `ppo-policy`, ...), so the UI keeps
one history per key across runs. Everything shown is redacted like what is written to storage.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from stages.evaluation.report_pages import report_table
from storage.layout import RunLayout
from storage.manifests import read_manifest
from storage.reports import read_report
from storage.secrets import redact, redact_text


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes."""
    return "-".join(parts).lower().replace("_", "-")


def publish_stage_outputs(layout: RunLayout, stage: str) -> list[str]:
    """A link artifact per output of the stage's manifest (checkpoint exports, rollouts, reports)."""
    manifest = read_manifest(layout.manifest(stage))
    if manifest is None:
        return []
    keys = []
    for name, uri in sorted(manifest.outputs.items()):
        key = artifact_key(stage, name)
        create_link_artifact(
            link=_browsable(uri),
            link_text=f"{layout.run_id}: {stage} {name}",
            key=key,
            description=f"`{name}` written by stage `{stage}` of run `{layout.run_id}`: {uri}",
        )
        keys.append(key)
    return keys


def publish_evaluation_report(layout: RunLayout, label: str, key: str = "eval-report") -> list[str]:
    """The report of `label` as markdown (`key`) and as a table (`key`-table), plus a link to its HTML."""
    report = read_report(layout.report(label, "json"))
    if report is None:
        return []
    markdown = layout.report(label, "md").read_bytes().decode()
    html = layout.report(label, "html")
    create_markdown_artifact(
        markdown=redact_text(markdown + f"\n\nFull report with plots: {html}\n"),
        key=key,
        description=f"Evaluation of run {layout.run_id} ({label})",
    )
    header, rows = report_table(report)
    create_table_artifact(
        table=redact([dict(zip(header, row, strict=True)) for row in rows]),
        key=f"{key}-table",
        description=f"Evaluation of run {layout.run_id} ({label}): one row per benchmark and checkpoint",
    )
    create_link_artifact(
        link=_browsable(str(html)), link_text="report.html", key=f"{key}-html",
        description=f"Self-contained HTML report of run {layout.run_id} ({label})",
    )  # fmt: skip
    return [key, f"{key}-table", f"{key}-html"]


class ProgressArtifact:
    """A progress artifact fed by a stage's progress lines, updated at most every `every_s`."""

    def __init__(self, stage: str, run_id: str, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self._shown = -1.0
        self.artifact_id = create_progress_artifact(
            0.0, key=artifact_key(stage, "progress"), description=f"{stage} of run {run_id}: steps done"
        )

    def update(self, done: int, total: int, force: bool = False) -> None:
        percent = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if percent == self._shown or not force and now - self._last < self.every_s:
            return
        update_progress_artifact(self.artifact_id, percent)
        self._last, self._shown = now, percent


def _browsable(uri: str) -> str:
    """A link the UI can show: URLs as they are, local paths as file:// URLs."""
    return uri if "://" in uri else Path(uri).resolve().as_uri()
