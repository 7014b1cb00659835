"""The `pipeline` flow: the six DVC stages as Prefect tasks, with training dispatched to the `gpu` pool.

Each stage task is `dvc repro --single-item <stage>` in this worker's clone, so DVC decides what is stale
and dvc.lock stays the one record of what was built. Training runs as the `train` deployment on another
worker; data moves only through the DVC remote:

    orchestrator: download, clean, tokenize -> dvc push tokenize outs
    gpu worker:   dvc pull tokenize outs -> train -> dvc push model      (flows/train.py)
    orchestrator: record the train entry in dvc.lock, dvc pull the model -> evaluate, export -> report

A train flow run whose process dies with its worker (SIGKILL, a lost machine) stays RUNNING in Prefect 3
for ever: nothing on the server crashes it. The orchestrator watches the run's heartbeat events (the train
deployment sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY); after `train_silence_s` without one it marks the run
CRASHED, naming the silence, and dispatches training again, as it does for a run that ended CRASHED (a
worker killed alone takes its flow-run process down with a broken pipe). The next run on that worker's
clone resumes from the checkpoints it left there (<train.checkpoint_dir>/, kept in the clone, not a DVC out).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.runtime import flow_run
from prefect.states import Crashed
from pydantic import Field

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
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
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


class TrainRunLost(RuntimeError):
    """The train flow run crashed or went silent (no heartbeats): its worker or machine died, not the training.
    Training is dispatched again, and resumes from the checkpoints in the worker's clone."""


def _now() -> datetime:
    return datetime.now(UTC)


def _last_sign_of_life(client: Any, run: FlowRun) -> datetime:
    """When a running train flow run last showed it was alive: its latest heartbeat, else when it started."""
    events = client.read_events(
        EventFilter(
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ),
        limit=1,
    ).events
    candidates = [e.occurred for e in events] + [t for t in (run.start_time, run.state and run.state.timestamp) if t]
    return max(candidates)


def wait_for_train(run_id: UUID, timeout_s: float | None, silence_s: float, poll_s: float = 2.0) -> FlowRun:
    """Poll the train flow run until it ends; a run RUNNING without a heartbeat for `silence_s` is marked
    CRASHED and raised as TrainRunLost; after `timeout_s` (None: no limit) a TimeoutError names the run."""
    start = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:  # a Prefect server restart meanwhile is ridden out by the client's own retries
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            if run.state is not None and run.state.is_running():
                silent = (_now() - _last_sign_of_life(client, run)).total_seconds()
                if silent > silence_s:
                    message = (
                        f"no heartbeat for {silent:.0f}s (limit train_silence_s={silence_s:.0f}): "
                        "its worker or machine died; marked crashed by the pipeline"
                    )
                    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                    raise TrainRunLost(f"training flow run {run.name} ({run_id}): {message}")
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                state = run.state.name if run.state else "unknown"
                raise TimeoutError(f"training flow run {run_id} still {state} after train_timeout_s={timeout_s:.0f}")
            time.sleep(poll_s)


def _lost_train_run(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry the dispatch only when the train run was lost with its worker (not when training itself failed)."""
    return isinstance(state.result(raise_on_failure=False), TrainRunLost)


@task(
    name="train on gpu pool",
    timeout_seconds=8 * 24 * HOUR,
    retries=2,
    retry_delay_seconds=0,
    retry_condition_fn=_lost_train_run,
)
def dispatch_train(
    deployment: str, parameters: dict[str, Any], timeout_s: float | None, silence_s: float
) -> dict[str, Any]:
    """Run the train deployment on whichever `gpu` worker takes it, wait, and return its result."""
    run = run_deployment(deployment, parameters=parameters, timeout=0)
    log().info("training flow run %s (%s) dispatched to %s", run.name, run.id, deployment)
    run = wait_for_train(run.id, timeout_s, silence_s)
    state = run.state
    if state is not None and state.is_crashed():  # its process died (e.g. with its worker): not a training error
        raise TrainRunLost(f"training flow run {run.name} ({run.id}) crashed: {state.message}")
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


def train_elsewhere(
    workdir: Path, deployment: str, parameters: dict[str, Any], timeout_s: float | None, silence_s: float
) -> str:
    """Send the train inputs through the DVC remote, train on the `gpu` pool, take the model back."""
    remote = parameters["remote"]
    inputs = push_inputs(workdir, remote)
    result = dispatch_train(deployment, {**parameters, "inputs": inputs}, timeout_s, silence_s)
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
    train_timeout_s: Annotated[float, Field(gt=0)] | None = None,
    train_silence_s: Annotated[float, Field(ge=30)] = 600,  # at least the train deployment's heartbeat period
    workdir: str | None = None,
    lock_wait_s: Annotated[float, Field(ge=0)] = 600,
) -> dict[str, str]:
    """Build the pipeline at `revision` with params = committed params.yaml + `preset` + `overrides`.

    overrides: dotted params keys to values, e.g. {"data.tgt_lang": "de", "train.max_steps": 1000}.
    remote: the DVC remote (by name, from .dvc/config) that carries data to and from the GPU worker.
    train_deployment: the deployment that trains ("train/train", on the `gpu` pool); None trains here.
    train_timeout_s: give up waiting for one train flow run after this long (None: no limit).
    train_silence_s: a running train flow run without a heartbeat for this long is crashed and dispatched again.
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
                done[stage] = train_elsewhere(wd, train_deployment, parameters, train_timeout_s, train_silence_s)
            else:
                done[stage] = STAGE_TASKS[stage](wd, stage)
            upstream_ran = upstream_ran or done[stage] != "skipped"
        if (wd / "metrics/eval.json").exists():
            report(wd)
    return done
