"""The production rehearsal: the team's topology on 127.0.0.1, locked down, all real, and the pipeline through it.

One module-scoped topology (tests/topology.py):
- Prefect's server with an auth string (PREFECT_SERVER_API_AUTH_STRING); workers and this test send it;
- MLflow's server with basic auth (infra's config: NO_PERMISSIONS by default), PostgreSQL as its backend
  store (SQLite where Debian's PostgreSQL is not installed) and its artifacts proxied to an S3 bucket on moto;
  the admin only runs infra/mlflow_users.py, which makes the `trainer` and `reader` accounts;
- the DVC remote in another bucket of the same S3;
- two process workers (pools `default` and `gpu`), each in its own git clone, holding only the `trainer`
  account, the Prefect auth string and (in their clones' git-ignored DVC config) the S3 keys.

The `pipeline` deployment runs once for the module (`rehearsal`); the tests check that run, then the
fault test retrains through the same topology with MLflow down, and the last one tampers with the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient

from seq2seq.textio import file_sha256
from tests.pipeline_fixtures import make_workspace, run, tiny_params, tool_env, write_toy_corpus
from tests.prefect_fixtures import (
    FINAL_STATES,
    PrefectApi,
    deploy_with_two_workers,
    prefect_env,
    start_server,
    train_result,
)
from tests.prefect_fixtures import wait_server as wait_prefect
from tests.servers import Processes
from tests.topology import (
    PREFECT_AUTH_STRING,
    S3_KEYS,
    SECRETS,
    Postgres,
    create_mlflow_users,
    credentials,
    postgres_bin,
    prefect_auth_env,
    refused,
    s3_client,
    s3_objects,
    start_locked_mlflow,
    start_moto,
    start_postgres,
    wait_mlflow,
)

pytestmark = [pytest.mark.integration, pytest.mark.production]
PY = sys.executable
MODEL_NAME = "toy-en-fr"
MLFLOW_BUCKET, DVC_BUCKET = "mlflow", "dvc"
ARTIFACTS = f"s3://{MLFLOW_BUCKET}/artifacts"


@dataclass
class Topology:
    root: Path
    procs: Processes
    prefect: PrefectApi
    mlflow_uri: str
    mlflow_env: dict[str, str]  # the MLflow server's: the S3 keys and endpoint (the admin's come with it)
    backend_store_uri: str
    s3: str  # the S3 endpoint
    orchestrator: Path  # the `default` worker's clone
    gpu: Path  # the `gpu` worker's clone

    def stop_mlflow(self) -> None:
        [proc] = [p for name, p in self.procs.procs if name == "mlflow"]
        self.procs.stop(proc)

    def restart_mlflow(self) -> None:
        port = int(self.mlflow_uri.rsplit(":", 1)[1])
        start_mlflow(self.procs, self.root, self.mlflow_env, self.backend_store_uri, port)

    def run_pipeline(self, parameters: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        return self.prefect.wait(self.prefect.trigger("pipeline/pipeline", parameters), timeout)

    def explain(self, flow_run: dict[str, Any]) -> str:
        """Everything needed to see why a run ended as it did."""
        return (
            f"{flow_run['state_type']}: {flow_run['state']['message']}\n--- run log\n"
            f"{self.prefect.logs(flow_run['id'])}\n--- cpu worker\n{self.procs.log('cpu-worker')[-3000:]}"
            f"\n--- gpu worker\n{self.procs.log('gpu-worker')[-3000:]}"
        )

    def client(self, user: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
        """An MLflow client logged in as `user` (for the rest of the test)."""
        for key, value in credentials(user).items():
            monkeypatch.setenv(key, value)
        return MlflowClient(self.mlflow_uri)


def start_databases(procs: Processes, root: Path) -> tuple[str | None, str, Postgres | None]:
    """Prefect's and MLflow's databases: on PostgreSQL, as in infra/, when Debian's server is installed (else
    Prefect's default SQLite file and an MLflow SQLite file). Returns Prefect's URL, MLflow's and the cluster."""
    pg_bin = postgres_bin()
    if pg_bin is None:
        print("rehearsal: PostgreSQL is not installed here; Prefect and MLflow use SQLite")
        return None, f"sqlite:///{root}/mlflow.db", None
    postgres = start_postgres(procs, pg_bin)
    print(f"rehearsal: Prefect and MLflow use PostgreSQL ({pg_bin})")
    return postgres.create_database("prefect", "asyncpg"), postgres.create_database("mlflow", "psycopg2"), postgres


def start_mlflow(procs: Processes, root: Path, env: dict[str, str], backend: str, port: int | None = None) -> str:
    """The basic-auth MLflow server with its artifacts in S3, ready; returns its URL."""
    uri, proc = start_locked_mlflow(procs, root / "mlflow", env, port, backend, ARTIFACTS)
    wait_mlflow(procs, uri, proc)
    return uri


def make_clones(root: Path, params: dict[str, Any], s3: str) -> tuple[Path, Path, dict[str, str]]:
    """The project's repo with its DVC remote on S3 (endpoint committed, keys not), and a clone per worker."""
    origin, env = make_workspace(root, params)
    run([PY, "-m", "dvc", "remote", "add", "--default", "s3", f"s3://{DVC_BUCKET}/store"], origin, env)
    run([PY, "-m", "dvc", "remote", "modify", "s3", "endpointurl", s3], origin, env)
    run(["git", "commit", "-qam", "DVC remote on S3"], origin, env)
    keys = (("access_key_id", S3_KEYS["AWS_ACCESS_KEY_ID"]), ("secret_access_key", S3_KEYS["AWS_SECRET_ACCESS_KEY"]))
    for name in ("orchestrator", "gpu"):
        run(["git", "clone", "-q", str(origin), str(root / name)], root, env)
        for key, value in keys:  # each machine keeps the bucket's keys in its own git-ignored config.local
            run([PY, "-m", "dvc", "remote", "modify", "--local", "s3", key, value], root / name, env)
    return root / "orchestrator", root / "gpu", env


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    root = tmp_path_factory.mktemp("production")
    procs, postgres = Processes(root / "logs"), None
    try:
        server_env = tool_env(root / "servers")
        prefect_db, backend, postgres = start_databases(procs, root)
        prefect_server_env = {**server_env, **prefect_auth_env(server=True)}
        api_url, prefect_proc = start_server(procs, root / "prefect", prefect_server_env, prefect_db)
        s3 = start_moto(procs, root, server_env, buckets=(MLFLOW_BUCKET, DVC_BUCKET))
        mlflow_env = {**server_env, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3}
        mlflow_uri = start_mlflow(procs, root, mlflow_env, backend)

        write_toy_corpus(root / "mirror")
        params = tiny_params(root / "mirror")
        params["mlflow"]["tracking_uri"] = mlflow_uri
        orchestrator, gpu, env = make_clones(root, params, s3)
        create_mlflow_users(mlflow_uri, env, [params["mlflow"]["experiment"]], [MODEL_NAME])

        wait_prefect(procs, api_url, prefect_proc)
        # the workers: Prefect's auth string and the trainer account; nothing of the admin's, no S3 keys
        worker_env = {**prefect_env(env, root / "prefect", api_url), **prefect_auth_env(server=False)}
        worker_env.update(credentials("trainer"))
        deploy_with_two_workers(procs, root, worker_env, orchestrator, gpu)
        prefect = PrefectApi(api_url, PREFECT_AUTH_STRING)
        yield Topology(root, procs, prefect, mlflow_uri, mlflow_env, backend, s3, orchestrator, gpu)
    finally:
        procs.stop_all()
        if postgres is not None:
            postgres.remove()


@dataclass
class Rehearsal:
    flow_run: dict[str, Any]
    train_run: dict[str, Any]
    result: dict[str, Any]  # the train flow run's result artifact
    export: dict[str, Any]  # the orchestrator's models/export.json
    seconds: float


@pytest.fixture(scope="module")
def rehearsal(topology: Topology) -> Rehearsal:
    """The `pipeline` deployment, run once through the topology: trigger to COMPLETED."""
    t0 = time.monotonic()
    flow_run = topology.run_pipeline({})
    seconds = time.monotonic() - t0
    assert flow_run["state_type"] == "COMPLETED", topology.explain(flow_run)
    print(f"rehearsal: pipeline deployment run {seconds:.1f}s")
    [train_run] = topology.prefect.runs_of("train/train")
    export = json.loads((topology.orchestrator / "models/export.json").read_text())
    return Rehearsal(flow_run, train_run, train_result(topology.prefect, train_run["id"]), export, seconds)


def test_the_pipeline_deployment_completes_and_trains_on_the_gpu_worker(
    topology: Topology, rehearsal: Rehearsal
) -> None:
    assert rehearsal.train_run["state_type"] == "COMPLETED" and rehearsal.train_run["work_pool_name"] == "gpu"
    assert rehearsal.result["worker"] == "gpu-worker" and rehearsal.result["workdir"] == str(topology.gpu)
    assert not list(topology.orchestrator.glob("checkpoints/*/*.pt"))  # the orchestrator never trained
    # the model came back through the DVC remote on S3
    model_md5 = rehearsal.result["hashes"]["models/model.pt"]
    assert f"store/files/md5/{model_md5[:2]}/{model_md5[2:]}" in s3_objects(topology.s3, DVC_BUCKET)
    assert rehearsal.export["run_id"] == rehearsal.result["mlflow_run_id"]


def lock_md5s(workdir: Path) -> dict[str, str]:
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if "md5" in o}


def test_the_registered_version_is_in_s3_with_its_lineage_and_nothing_on_local_disk(
    topology: Topology, rehearsal: Rehearsal, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = topology.client("reader", monkeypatch)
    version = client.get_model_version(MODEL_NAME, rehearsal.export["version"])
    weights = topology.orchestrator / "models/model.pt"
    commit = run(["git", "rev-parse", "HEAD"], topology.orchestrator, dict(os.environ)).stdout.strip()
    md5s = lock_md5s(topology.orchestrator)
    expected = {
        "git_commit": commit,
        "weights_sha256": file_sha256(weights),
        **{f"dvc.md5.{p}": md5s[p] for p in ("data/raw", "data/clean", "data/tokenized", "models/model.pt")},
    }
    assert {k: version.tags.get(k) for k in expected} == expected
    assert len(version.tags["params_sha256"]) == 64 and "bleu.toy_test" in version.tags
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == version.version

    # the weights and the MLmodel are objects in the bucket; no artifact store on any local disk
    objects = s3_objects(topology.s3, MLFLOW_BUCKET)
    stored = [k for k in objects if k.endswith("model.pt")]
    assert stored and any(k.endswith("/MLmodel") for k in objects), sorted(objects)
    body = s3_client(topology.s3).get_object(Bucket=MLFLOW_BUCKET, Key=stored[0])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == expected["weights_sha256"], sorted(objects)
    local = [p for name in ("MLmodel", "mlruns", "mlartifacts", "artifacts") for p in topology.root.rglob(name)]
    assert local == [], local


def test_no_secret_reaches_a_log_a_run_param_or_a_tag(
    topology: Topology, rehearsal: Rehearsal, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = {f"log {p.name}": p.read_text(errors="replace") for p in topology.procs.logs.glob("*.log")}
    for flow_run in (rehearsal.flow_run, rehearsal.train_run):
        texts[f"Prefect log of {flow_run['name']}"] = topology.prefect.logs(flow_run["id"])
    run = topology.client("reader", monkeypatch).get_run(rehearsal.result["mlflow_run_id"])
    texts["MLflow params and tags"] = json.dumps({**run.data.params, **run.data.tags})
    leaks = [(where, secret) for where, text in texts.items() for secret in SECRETS if secret in text]
    assert leaks == []
    print(f"rehearsal: MLflow run {run.info.run_id} created as user {run.info.user_id!r}")


def test_prefect_and_mlflow_answer_401_without_credentials(topology: Topology) -> None:
    api = topology.prefect.url
    assert requests.post(f"{api}/deployments/filter", json={}, timeout=30).status_code == 401
    assert requests.post(f"{api}/deployments/filter", json={}, auth=("nmt", "wrong"), timeout=30).status_code == 401
    assert requests.post(f"{api}/deployments/filter", json={}, auth=topology.prefect.auth, timeout=30).ok
    search = f"{topology.mlflow_uri}/api/2.0/mlflow/registered-models/get?name={MODEL_NAME}"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=("trainer", "wrong"), timeout=30).status_code == 401


def test_the_trainer_cannot_delete_or_grant_and_the_reader_cannot_create_runs(
    topology: Topology, rehearsal: Rehearsal, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, auth = topology.client("trainer", monkeypatch), AuthServiceClient(topology.mlflow_uri)
    assert refused(lambda: trainer.delete_registered_model(MODEL_NAME)) == 403
    assert refused(lambda: trainer.delete_model_version(MODEL_NAME, rehearsal.export["version"])) == 403
    assert refused(lambda: auth.grant_user_permission("reader", "registered_model", MODEL_NAME, "MANAGE")) == 403
    assert refused(lambda: auth.update_user_admin("trainer", True)) == 403

    reader = topology.client("reader", monkeypatch)
    experiment_id = reader.get_run(rehearsal.result["mlflow_run_id"]).info.experiment_id
    assert refused(lambda: reader.create_run(experiment_id)) == 403
    assert refused(lambda: reader.set_registered_model_alias(MODEL_NAME, "champion", "1")) == 403
    assert reader.get_registered_model(MODEL_NAME).name == MODEL_NAME  # it can read


# ---- faults: these change the registry (a second version, then a tampered object), so they come last ----


def trainer_pid(workdir: Path) -> int | None:
    """The `python -m stages.train` process working in `workdir`, if one runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if b"stages.train" in cmdline and cwd == str(workdir):
            return int(entry.name)
    return None


def journal_lines(workdir: Path, since: float) -> int:
    """Records in the metrics journals (checkpoints/<run key>/metrics.jsonl) written after `since`."""
    journals = [p for p in workdir.glob("checkpoints/*/metrics.jsonl") if p.stat().st_mtime > since]
    return sum(len(p.read_text().splitlines()) for p in journals)


def pause_training_once_it_logs(topology: Topology, flow_run_id: str, since: float) -> int:
    """Wait until the gpu worker's trainer has journaled metrics, then SIGSTOP it; returns its pid."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pid = trainer_pid(topology.gpu)
        if pid is not None and journal_lines(topology.gpu, since) > 0:
            os.kill(pid, signal.SIGSTOP)
            return pid
        if topology.prefect.flow_run(flow_run_id)["state_type"] in FINAL_STATES:
            break
        time.sleep(0.1)
    raise AssertionError(f"training did not start logging:\n{topology.explain(topology.prefect.flow_run(flow_run_id))}")


def test_mlflow_down_when_training_starts_and_back_mid_run_gets_every_step_once(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow is stopped before the run is triggered (nothing before training needs it) and restarted while
    the trainer is paused mid-run (the restart takes longer than this toy run): training starts anyway, and
    the run in MLflow gets every logged step exactly once, from the worker's journal."""
    max_steps, log_every = 300, 10
    topology.stop_mlflow()
    since = time.time()
    flow_run_id = topology.prefect.trigger("pipeline/pipeline", {"overrides": {"train.max_steps": max_steps}})
    pid = pause_training_once_it_logs(topology, flow_run_id, since)
    try:
        topology.restart_mlflow()
    finally:
        os.kill(pid, signal.SIGCONT)
    flow_run = topology.prefect.wait(flow_run_id, 600)
    assert flow_run["state_type"] == "COMPLETED", topology.explain(flow_run)

    [train_run, _] = topology.prefect.runs_of("train/train")
    assert "is not answering" in topology.prefect.logs(train_run["id"], wait_for="is not answering")
    result = train_result(topology.prefect, train_run["id"])
    client = topology.client("reader", monkeypatch)
    history = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "loss")]
    assert sorted(history) == list(range(log_every, max_steps + 1, log_every))  # none missing, none twice
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    export = json.loads((topology.orchestrator / "models/export.json").read_text())
    assert export["run_id"] == result["mlflow_run_id"] and export["version"] == "2"


def test_weights_replaced_in_the_bucket_are_refused_naming_both_digests(
    topology: Topology, rehearsal: Rehearsal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone with write access to the bucket puts another model's weights in version 1's place."""
    from seq2seq.tracking import mlflow

    reader = topology.client("reader", monkeypatch)
    recorded = reader.get_model_version(MODEL_NAME, rehearsal.export["version"]).tags["weights_sha256"]
    s3, objects = s3_client(topology.s3), s3_objects(topology.s3, MLFLOW_BUCKET)
    weights = {k: s3.get_object(Bucket=MLFLOW_BUCKET, Key=k)["Body"].read() for k in objects if k.endswith(".pt")}
    [key] = [k for k, body in weights.items() if hashlib.sha256(body).hexdigest() == recorded and "/models/" in k]
    other = next(body for body in weights.values() if hashlib.sha256(body).hexdigest() != recorded)
    s3.put_object(Bucket=MLFLOW_BUCKET, Key=key, Body=other)
    replaced, uri = hashlib.sha256(other).hexdigest(), f"models:/{MODEL_NAME}/{rehearsal.export['version']}"

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(topology.mlflow_uri)
    try:  # (evaluate-champion loads with seq2seq.registry.load_registered, as nmt-translate -m does below)
        with pytest.raises(Exception, match=f"sha256 {replaced} differs from {recorded}"):
            mlflow.pyfunc.load_model(uri)  # serving: the model's own code checks the digest
    finally:
        mlflow.set_tracking_uri(previous)

    env = {**tool_env(topology.root / "reader"), **credentials("reader"), "MLFLOW_TRACKING_URI": topology.mlflow_uri}
    cmd = [str(Path(PY).parent / "nmt-translate"), "-m", uri]
    proc = subprocess.run(cmd, input="a dog .\n", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and recorded in proc.stderr and replaced in proc.stderr, proc.stderr
