"""The `pipeline` flow: the six DVC stages as Prefect tasks, with training dispatched to the `gpu` pool.

Each stage task is `dvc repro --single-item <stage>` in this worker's clone, so DVC decides what is stale
and dvc.lock stays the one record of what was built. Training runs as the `train` deployment on another
worker; data moves only through the DVC remote:

    orchestrator: download, clean, tokenize -> dvc push tokenize outs
    gpu worker:   dvc pull tokenize outs -> train -> dvc push model      (flows/train.py)
    orchestrator: record the train entry in dvc.lock, dvc pull the model -> evaluate, export -> report
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.report import workspace_report
from flows.train import RESULT_KEY, parse_result_markdown
from flows.workspace import (
    STAGES,
    WorkspaceError,
    checkout,
    dvc,
    lock_entries,
    log,
    merge_lock_entries,
    remote_args,
    resolve_workdir,
    stale_stages,
    workspace_lock,
    write_params,
    write_stage_outputs,
)

HOUR = 3600
TRAIN_INPUTS = ["tokenize"]  # the stages whose outputs the train stage reads (dvc.yaml deps)


@task(task_run_name="dvc repro {stage}")
def repro(workdir: Path, stage: str) -> str:
    """Run one stage through DVC; returns 'ran' or 'skipped' (DVC found it up to date)."""
    out = dvc(workdir, "repro", "--single-item", stage)
    return "ran" if f"Running stage '{stage}'" in out else "skipped"


# Downloads hit the network: retried with growing delays. The rest fail fast; rerunning the flow resumes.
STAGE_TASKS = {
    "download": repro.with_options(
        name="download", retries=3, retry_delay_seconds=[30, 120, 600], timeout_seconds=12 * HOUR
    ),
    "clean": repro.with_options(name="clean", timeout_seconds=12 * HOUR),
    "tokenize": repro.with_options(name="tokenize", timeout_seconds=12 * HOUR),
    "train": repro.with_options(name="train (local)", timeout_seconds=8 * 24 * HOUR),
    "evaluate": repro.with_options(name="evaluate", retries=1, retry_delay_seconds=60, timeout_seconds=6 * HOUR),
    "export": repro.with_options(name="export", retries=1, retry_delay_seconds=60, timeout_seconds=HOUR),
}


@task(name="checkout")
def prepare(workdir: Path, revision: str | None, preset: str | None, overrides: dict[str, Any] | None) -> str:
    commit = checkout(workdir, revision)
    params = write_params(workdir, commit, preset, overrides)
    log().info("%s at %s: %s, %s model", workdir, commit[:12], params.data.pair, params.model.family)
    return commit


@task(name="dvc status")
def status(workdir: Path, *targets: str) -> list[str]:
    return sorted(stale_stages(workdir, *targets))


@task(name="dvc push train inputs", retries=2, retry_delay_seconds=30, timeout_seconds=6 * HOUR)
def push_inputs(workdir: Path, remote: str | None) -> dict[str, dict[str, Any]]:
    dvc(workdir, "push", *remote_args(remote), *TRAIN_INPUTS)
    return lock_entries(workdir, TRAIN_INPUTS)


def _failure_detail(flow_run_id: Any) -> str:
    """The last error lines the worker logged for a flow run, so the cause shows in this run's log."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    errors = [entry.message for entry in logs if entry.level >= 40] or [entry.message for entry in logs[-5:]]
    return "\n".join(errors[-3:])


def _train_result(flow_run_id: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    for artifact in artifacts:
        if artifact.key == RESULT_KEY:
            return parse_result_markdown(str(artifact.data))
    raise RuntimeError(f"train flow run {flow_run_id} completed without a {RESULT_KEY!r} artifact")


@task(name="train on gpu pool", timeout_seconds=8 * 24 * HOUR)
def dispatch_train(deployment: str, parameters: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Run the train deployment on whichever `gpu` worker takes it, wait, and return its result."""
    run = run_deployment(deployment, parameters=parameters, timeout=timeout_s, poll_interval=1)
    state = run.state
    if state is None or not state.is_completed():
        detail = _failure_detail(run.id)
        name = state.name if state else "unknown"
        raise RuntimeError(f"training flow run {run.name} ({run.id}) ended {name}: {state and state.message}\n{detail}")
    result = _train_result(run.id)
    log().info("trained on %s in %s; MLflow run %s", result["host"], result["workdir"], result["mlflow_run_id"])
    return result


@task(name="dvc pull model", retries=2, retry_delay_seconds=30, timeout_seconds=6 * HOUR)
def receive_model(workdir: Path, result: dict[str, Any], remote: str | None) -> None:
    """Record the worker's train entry in dvc.lock, write its uncached outputs, pull the model. The result
    names the files: only the train stage's declared uncached outs are written, and only its lock entry merged."""
    write_stage_outputs(workdir, "train", result["files"])
    merge_lock_entries(workdir, {"train": result["lock"]["train"]})
    dvc(workdir, "pull", "--force", *remote_args(remote), "train")


@task(name="report")
def report(workdir: Path) -> str:
    from seq2seq.config import load_params

    params = load_params(workdir / "params.yaml")
    model_name = params.registered_name()
    markdown = workspace_report(workdir, params.mlflow.tracking_uri, model_name)
    create_markdown_artifact(key="nmt-metrics", markdown=markdown, description="test scores vs the champion")
    return markdown


def train_elsewhere(workdir: Path, deployment: str, parameters: dict[str, Any], timeout_s: float | None) -> str:
    """Send the train inputs through the DVC remote, train on the `gpu` pool, take the model back."""
    remote = parameters["remote"]
    inputs = push_inputs(workdir, remote)
    result = dispatch_train(deployment, {**parameters, "inputs": inputs}, timeout_s)
    receive_model(workdir, result, remote)
    if status(workdir, "train"):
        raise WorkspaceError(
            f"{workdir}: the model trained at {result['git_commit'][:12]} on {result['host']} does not match "
            "this workspace's code, params or data (see `dvc status train`)"
        )
    return f"ran on {result['host']}:{result['workdir']}"


@flow(name="pipeline", log_prints=True, timeout_seconds=9 * 24 * HOUR)
def pipeline(
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    revision: str | None = None,
    remote: str | None = None,
    train_deployment: str | None = "train/train",
    train_timeout_s: float | None = None,
    workdir: str | None = None,
    lock_wait_s: float = 600,
) -> dict[str, str]:
    """Build the pipeline at `revision` with params = committed params.yaml + `preset` + `overrides`.

    overrides: dotted params keys to values, e.g. {"data.tgt_lang": "de", "train.max_steps": 1000}.
    remote: the DVC remote (by name, from .dvc/config) that carries data to and from the GPU worker.
    train_deployment: the deployment that trains ("train/train", on the `gpu` pool); None trains here.
    Returns {stage: 'ran' | 'skipped'}.
    """
    wd = resolve_workdir(workdir)
    holder = f"pipeline flow run {flow_run.id} (pid {os.getpid()})"
    with workspace_lock(wd, lock_wait_s, holder):
        commit = prepare(wd, revision, preset, overrides)
        stale = set(status(wd))
        done: dict[str, str] = {}
        upstream_ran = False
        for stage in STAGES:
            if stage not in stale and not upstream_ran:
                log().info("%s: up to date (dvc.lock), skipped", stage)
                done[stage] = "skipped"
                continue
            if stage == "train" and train_deployment:
                if upstream_ran and not status(wd, "train"):
                    done[stage] = "skipped"
                    continue
                parameters = {"revision": commit, "overrides": overrides, "preset": preset, "remote": remote}
                done[stage] = train_elsewhere(wd, train_deployment, parameters, train_timeout_s)
            else:
                done[stage] = STAGE_TASKS[stage](wd, stage)
            upstream_ran = upstream_ran or done[stage] != "skipped"
        if (wd / "metrics/eval.json").exists():
            report(wd)
    return done
