"""The `train` flow: what a GPU worker does when the pipeline dispatches training to it.

In its own clone ($NMT_WORKDIR): check out the requested revision, write the same params.yaml as the
orchestrator (committed params + preset + overrides), record the tokenize entry the orchestrator sent in
dvc.lock and `dvc pull` exactly those outputs from the DVC remote, run the train stage (torchrun over
every GPU when there are several), `dvc push` the model, and hand back what DVC does not carry: the
train entry of dvc.lock and the small uncached outputs (metrics, loss plot, MLflow run id file).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.workspace import (
    checkout,
    dvc,
    lock_entries,
    log,
    merge_lock_entries,
    out_hashes,
    remote_args,
    resolve_workdir,
    run_command,
    uncached_outs,
    workspace_lock,
    write_params,
)

RESULT_KEY = "train-result"
RESULT_FENCE = "```json"


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):  # no driver: skip importing torch (seconds) to learn the answer
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@task(name="checkout")
def prepare(workdir: Path, revision: str, preset: str | None, overrides: dict[str, Any] | None) -> str:
    commit = checkout(workdir, revision)
    write_params(workdir, commit, preset, overrides)
    return commit


@task(name="dvc pull inputs", retries=2, retry_delay_seconds=30)
def pull_inputs(workdir: Path, entries: dict[str, dict[str, Any]], remote: str | None) -> None:
    merge_lock_entries(workdir, entries)
    dvc(workdir, "pull", "--force", *remote_args(remote), *entries)


@task(name="train stage")
def run_train_stage(workdir: Path) -> str:
    """`dvc repro` the train stage; with several GPUs, torchrun it and record the result with `dvc commit`."""
    n_gpus = gpu_count()
    if n_gpus > 1:
        log().info("%d GPUs: torchrun --nproc-per-node %d -m stages.train", n_gpus, n_gpus)
        run_command(["torchrun", "--standalone", f"--nproc-per-node={n_gpus}", "-m", "stages.train"], workdir)
        dvc(workdir, "commit", "--force", "train")
        return "ran"
    out = dvc(workdir, "repro", "--single-item", "train")
    return "ran" if "Running stage 'train'" in out else "skipped"


@task(name="dvc push model", retries=2, retry_delay_seconds=30)
def push_outputs(workdir: Path, remote: str | None) -> None:
    dvc(workdir, "push", *remote_args(remote), "train")


def collect_result(workdir: Path, commit: str, stage_status: str) -> dict[str, Any]:
    entry = lock_entries(workdir, ["train"])["train"]
    files = {}
    for out in uncached_outs(workdir, "train"):
        paths = (
            sorted(p for p in (workdir / out).rglob("*") if p.is_file())
            if (workdir / out).is_dir()
            else [workdir / out]
        )
        for path in paths:
            with path.open(encoding="utf-8", newline="") as f:  # keep \r\n: DVC hashes the bytes
                files[str(path.relative_to(workdir))] = f.read()
    run_file = next((text for path, text in files.items() if path.endswith("train_run.json")), None)
    return {
        "lock": {"train": entry},
        "files": files,
        "hashes": out_hashes(entry),
        "mlflow_run_id": json.loads(run_file)["run_id"] if run_file else None,
        "git_commit": commit,
        "stage": stage_status,
        "workdir": str(workdir),
        "host": socket.gethostname(),
        "worker": os.environ.get("PREFECT__WORKER_NAME"),
    }


def result_markdown(result: dict[str, Any]) -> str:
    """The result as a markdown artifact: readable in the UI, parsed back by the orchestrator."""
    head = (
        f"# Training on {result['host']}\n\n"
        f"- workdir: `{result['workdir']}`\n- git commit: `{result['git_commit']}`\n"
        f"- MLflow run: `{result['mlflow_run_id']}`\n"
        + "".join(f"- `{p}`: md5 `{h}`\n" for p, h in result["hashes"].items())
    )
    return f"{head}\n{RESULT_FENCE}\n{json.dumps(result, indent=1)}\n```\n"


def parse_result_markdown(markdown: str) -> dict[str, Any]:
    start = markdown.index(RESULT_FENCE) + len(RESULT_FENCE)
    return json.loads(markdown[start : markdown.rindex("```")])


@flow(name="train", log_prints=True)
def train(
    revision: str,
    inputs: dict[str, dict[str, Any]],
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    remote: str | None = None,
    workdir: str | None = None,
    lock_wait_s: float = 3600,
) -> dict[str, Any]:
    """Train at `revision` on `inputs`: dvc.lock entries of the stages it reads (tokenize).

    Returns the train stage's dvc.lock entry, its uncached outputs, the out hashes and the MLflow run id;
    the same is published as the `train-result` artifact of this flow run.
    """
    wd = resolve_workdir(workdir)
    log().info("training in %s on %s", wd, socket.gethostname())
    with workspace_lock(wd, lock_wait_s, holder=f"train flow run {flow_run.id} (pid {os.getpid()})"):
        commit = prepare(wd, revision, preset, overrides)
        pull_inputs(wd, inputs, remote)
        status = run_train_stage(wd)
        push_outputs(wd, remote)
        result = collect_result(wd, commit, status)
    create_markdown_artifact(
        key=RESULT_KEY, markdown=result_markdown(result), description="train stage outputs (DVC) and MLflow run"
    )
    return result
