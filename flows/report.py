"""The per-run markdown report: test-set scores versus the current champion, and the MLflow run link."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCORES = ("bleu", "chrf", "ter")  # whichever of these evaluate wrote; TER is lower-is-better


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A clickable link on a tracking server; for a local store, how to open it."""
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"[{run_id}]({url})"
    return f"`{run_id}` (local store: `mlflow ui --backend-store-uri {tracking_uri}`)"


def metrics_markdown(
    scores: dict[str, dict[str, Any]],
    champion: dict[str, dict[str, float]] | None,
    champion_label: str,
    model_uri: str | None,
    link: str,
) -> str:
    """Markdown table: one row per test set and metric, this run vs the champion (`champion` None: none yet)."""
    lines = [
        "# NMT pipeline run",
        "",
        f"- MLflow run: {link}",
        f"- registered model: `{model_uri or 'not exported'}`",
        f"- champion: {champion_label if champion is not None else 'none yet (no `champion` alias)'}",
        "",
        "| test set | metric | this run | champion | Δ |",
        "|---|---|---:|---:|---:|",
    ]
    for test_set, s in scores.items():
        for metric in SCORES:
            if metric not in s:
                continue
            ours = float(s[metric])
            theirs = (champion or {}).get(test_set, {}).get(metric)
            delta = f"{ours - theirs:+.2f}" if theirs is not None else "–"
            shown = f"{theirs:.2f}" if theirs is not None else "–"
            lines.append(f"| {test_set} | {metric.upper()} | {ours:.2f} | {shown} | {delta} |")
    return "\n".join(lines) + "\n"


def champion_scores(tracking_uri: str, model_name: str, test_sets: list[str]) -> tuple[dict | None, str]:
    """Scores of `models:/<name>@champion` from its run's `test/<set>/<metric>` metrics; (None, '') if no alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, ""
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    scores = {t: {m: metrics[f"test/{t}/{m}"] for m in SCORES if f"test/{t}/{m}" in metrics} for t in test_sets}
    return scores, f"`models:/{model_name}/{version.version}`"


def workspace_report(workdir: Path, tracking_uri: str, model_name: str) -> str:
    """The report for the outputs in `workdir` (metrics/eval.json, models/train_run.json, models/export.json)."""
    scores = json.loads((workdir / "metrics/eval.json").read_text())
    run = json.loads((workdir / "models/train_run.json").read_text())
    export_file = workdir / "models/export.json"
    model_uri = json.loads(export_file.read_text())["model_uri"] if export_file.exists() else None
    champion, label = champion_scores(tracking_uri, model_name, list(scores))
    link = run_link(tracking_uri, run["experiment_id"], run["run_id"])
    return metrics_markdown(scores, champion, label, model_uri, link)
