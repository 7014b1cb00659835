"""The Prefect deployments for real: one server, a CPU worker and a GPU-pool worker, each in its own clone.

One module-scoped stack (server on a free 127.0.0.1 port with SQLite, pools `default` and `gpu`, two
process workers, the four deployments of prefect.yaml registered with `prefect deploy --all`); the tests
share its clones, so they run in file order.
The DVC remote is a local directory (one test uses S3 through moto's server); MLflow is a SQLite file
that both workers point at (a stand-in for the tracking server of infra/).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_fixtures import Stack, start_stack, train_result
from tests.servers import Processes, free_port

pytestmark = pytest.mark.integration
PY = sys.executable


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("flows")
    procs = Processes(root / "logs")
    try:
        yield start_stack(root, procs)
    finally:
        procs.stop_all()


def task_names(stack: Stack, flow_run: dict) -> set[str]:
    """Task run names without Prefect's random suffix ("checkout-3f2" -> "checkout")."""
    names = set()
    for t in stack.api.task_runs(flow_run["id"]):
        base, _, suffix = t["name"].rpartition("-")
        names.add(base if base and len(suffix) == 3 else t["name"])
    return names


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_prefect_deploy_all_registers_the_four_deployments_on_a_fresh_server(stack: Stack) -> None:
    deployments = {d["name"]: d for d in stack.api.post("/deployments/filter", {})}
    assert set(deployments) == {"pipeline", "train", "evaluate-champion", "deliver-champion"}
    pipeline, train = deployments["pipeline"], deployments["train"]
    assert pipeline["work_pool_name"] == "default"
    [schedule] = pipeline["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * 1" and schedule["active"] is False  # paused: no runs queue up
    assert train["work_pool_name"] == "gpu" and train["schedules"] == []
    assert "PYTORCH_CUDA_ALLOC_CONF" in train["job_variables"]["env"]
    champion = deployments["evaluate-champion"]
    assert champion["schedules"][0]["schedule"]["cron"] == "0 6 * * *"
    for d in deployments.values():  # the workdir is the worker's $NMT_WORKDIR, read when the run starts
        step = d["pull_steps"][0]["prefect.deployments.steps.run_shell_script"]
        assert step["script"] == "echo $NMT_WORKDIR" and step["expand_env_vars"] is True
    deliver = deployments["deliver-champion"]
    assert deliver["global_concurrency_limit"]["limit"] == 1
    # its trigger became an automation that runs it on the webhook's event, for alias `champion` only
    [automation] = [
        a for a in stack.api.post("/automations/filter", {}) if a["actions"][0].get("deployment_id") == deliver["id"]
    ]
    assert automation["enabled"] and automation["trigger"]["expect"] == ["mlflow.model-version.alias.created"]
    assert automation["trigger"]["match"]["mlflow.alias"] == "champion"


def test_pipeline_trains_on_the_gpu_worker_and_pulls_the_model_back(stack: Stack) -> None:
    t0 = time.monotonic()
    flow_run = stack.run_pipeline({})
    assert flow_run["state_type"] == "COMPLETED", stack.explain(flow_run)
    print(f"pipeline deployment run: {time.monotonic() - t0:.1f}s")

    # training ran as its own flow run, on the gpu pool, by the gpu worker, in that worker's clone
    [train_run] = stack.api.runs_of("train/train")
    assert train_run["state_type"] == "COMPLETED" and train_run["work_pool_name"] == "gpu"
    result = train_result(stack.api, train_run["id"])
    assert result["workdir"] == str(stack.gpu) and result["worker"] == "gpu-worker"

    # the orchestrator never trained: it pulled the worker's model from the DVC remote and went on
    tasks = task_names(stack, flow_run)
    assert {f"dvc repro {s}" for s in ("download", "clean", "tokenize", "evaluate", "export")} <= tasks
    assert {"train on gpu pool", "dvc pull model"} <= tasks and "dvc repro train" not in tasks
    model_md5 = result["hashes"]["models/model.pt"]
    assert md5(stack.orchestrator / "models/model.pt") == model_md5 == md5(stack.gpu / "models/model.pt")
    assert (stack.remote / "files/md5" / model_md5[:2] / model_md5[2:]).exists()
    assert json.loads((stack.orchestrator / "models/train_run.json").read_text())["run_id"] == result["mlflow_run_id"]
    scores = json.loads((stack.orchestrator / "metrics/eval.json").read_text())["toy_test"]
    assert 0 <= scores["bleu"] <= 100
    assert not (stack.gpu / "metrics/eval.json").exists()  # evaluate ran on the orchestrator only
    assert "Data and pipelines are up to date" in stack.dvc(stack.orchestrator, "status")

    # MLflow: the run trained on the worker got the test scores and a registered version
    export = json.loads((stack.orchestrator / "models/export.json").read_text())
    assert export["run_id"] == result["mlflow_run_id"] and stack.registry_versions() == ["1"]
    [report] = [a for a in stack.api.artifacts(flow_run["id"]) if a["key"] == "nmt-metrics"]
    assert "| toy_test | BLEU |" in report["data"] and result["mlflow_run_id"] in report["data"]

    # nothing changed: a second deployment run skips every stage; its cost next to a bare `dvc repro`
    t0 = time.monotonic()
    noop = stack.run_pipeline({})
    flow_s = time.monotonic() - t0
    assert noop["state_type"] == "COMPLETED" and len(stack.api.runs_of("train/train")) == 1
    t0 = time.monotonic()
    assert "Data and pipelines are up to date" in stack.dvc(stack.orchestrator, "repro")
    dvc_s = time.monotonic() - t0
    print(f"no-op deployment run (trigger to completed) {flow_s:.1f}s vs bare dvc repro {dvc_s:.1f}s")


def test_failed_training_fails_the_pipeline_and_a_rerun_resumes(stack: Stack) -> None:
    failed = stack.run_pipeline({"overrides": {"train.max_steps": 30, "train.max_len": 2}})
    assert failed["state_type"] == "FAILED"
    # the worker's own error, in the orchestrating run's state and log
    assert "no training pair is short enough" in failed["state"]["message"], stack.explain(failed)
    assert "no training pair is short enough" in stack.api.logs(failed["id"], wait_for="no training pair")
    assert stack.api.runs_of("train/train")[0]["state_type"] == "FAILED"

    resumed = stack.run_pipeline({"overrides": {"train.max_steps": 30}})
    assert resumed["state_type"] == "COMPLETED", stack.explain(resumed)
    log = stack.api.logs(resumed["id"])
    for stage in ("download", "clean", "tokenize"):
        assert f"{stage}: up to date (dvc.lock), skipped" in log
    tasks = task_names(stack, resumed)
    assert not tasks & {"dvc repro download", "dvc repro clean", "dvc repro tokenize"}
    assert "train on gpu pool" in tasks
    assert json.loads((stack.orchestrator / "metrics/train.json").read_text())["steps"] == 30
    assert stack.registry_versions() == ["1", "2"]


def test_two_runs_on_one_workspace_one_fails_clearly_nothing_corrupted(stack: Stack) -> None:
    # export.* is read by the export stage only: the winner reruns export, nothing is retrained
    params = {"overrides": {"train.max_steps": 30, "export.promotion_margin": 0.5}, "lock_wait_s": 0}
    ids = [stack.api.trigger("pipeline/pipeline", params) for _ in range(2)]
    runs = [stack.api.wait(i, 300) for i in ids]
    states = sorted(r["state_type"] for r in runs)
    assert states == ["COMPLETED", "FAILED"], "\n\n".join(stack.explain(r) for r in runs)
    [loser] = [r for r in runs if r["state_type"] == "FAILED"]
    assert "is busy" in loser["state"]["message"] and "nmt-pipeline.lock" in loser["state"]["message"]
    assert "Data and pipelines are up to date" in stack.dvc(stack.orchestrator, "status")
    assert json.loads((stack.orchestrator / "models/export.json").read_text())["version"] == "3"
    assert stack.registry_versions() == ["1", "2", "3"]


def test_s3_remote_through_moto(stack: Stack) -> None:
    pytest.importorskip("dvc_s3")
    pytest.importorskip("moto")
    import boto3

    port = free_port()
    moto = stack.procs.start(
        "moto", [str(Path(PY).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stack.root, stack.env
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        stack.procs.wait_ready("moto", moto, f"{endpoint}/moto-api/")
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        s3.create_bucket(Bucket="nmt")
        # each machine configures the remote's endpoint and credentials in its own git-ignored config.local
        for ws in (stack.orchestrator, stack.gpu):
            stack.dvc(ws, "remote", "add", "--local", "s3", "s3://nmt/dvc")
            for key, value in (("endpointurl", endpoint), ("access_key_id", "test"), ("secret_access_key", "test")):
                stack.dvc(ws, "remote", "modify", "--local", "s3", key, value)
        flow_run = stack.run_pipeline({"remote": "s3", "overrides": {"train.max_steps": 20}})
        assert flow_run["state_type"] == "COMPLETED", stack.explain(flow_run)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="nmt")["Contents"]}
        model_md5 = md5(stack.orchestrator / "models/model.pt")
        assert f"dvc/files/md5/{model_md5[:2]}/{model_md5[2:]}" in keys  # the model went through S3
        assert md5(stack.gpu / "models/model.pt") == model_md5
    finally:
        stack.procs.stop(moto)
