"""Real Prefect servers and workers on 127.0.0.1 for the flow tests, and a tiny REST client for them.

Processes, ports and the readiness deadline come from tests/servers.py. `start_stack` builds the topology
the flow tests share: a server, pools `default` and `gpu`, a worker on each in its own clone of a toy
project, and the deployments of prefect.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.pipeline_fixtures import make_workspace, run, tiny_params, write_toy_corpus
from tests.servers import SERVER_DEADLINE, Processes, free_port

BIN = Path(sys.executable).parent
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PrefectApi:
    """The few REST calls the tests need (the test process never imports a configured Prefect client)."""

    def __init__(self, url: str, auth_string: str | None = None) -> None:
        """`auth_string`: the server's PREFECT_SERVER_API_AUTH_STRING ("user:password"), sent as HTTP basic auth."""
        self.url = url.rstrip("/")
        self.auth = tuple(auth_string.split(":", 1)) if auth_string else None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # A busy SQLite database answers 503; Prefect's own client retries those, so do we (for about a minute:
        # on a loaded 2-core machine the server can stay busy that long).
        for attempt in range(9):
            r = requests.request(method, f"{self.url}{path}", json=body, auth=self.auth, timeout=30)
            if r.status_code not in (502, 503) or attempt == 8:
                break
            time.sleep(min(0.5 * 2**attempt, 15.0))
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def deployment(self, name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{name}")

    def trigger(self, name: str, parameters: dict[str, Any]) -> str:
        dep = self.deployment(name)
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})["id"]

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in FINAL_STATES:
                return run
            time.sleep(1.0)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout}s: {run['state_type']}")

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        dep = self.deployment(deployment)
        body = {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"}
        return self.post("/flow_runs/filter", body)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def logs(self, run_id: str, wait_for: str | None = None, timeout: float = 30) -> str:
        """The run's log; with `wait_for`, polled until that text is in it (or `timeout` passes). A run's
        last lines reach the server in the logging batch after its final state, so they can lag behind it."""
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"}
        deadline = time.monotonic() + timeout
        while True:
            log = "\n".join(entry["message"] for entry in self.post("/logs/filter", body))
            if wait_for is None or wait_for in log or time.monotonic() > deadline:
                return log
            time.sleep(1.0)

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})


def prefect_env(base: dict[str, str], home: Path, api_url: str | None) -> dict[str, str]:
    env = dict(base)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        PREFECT_LOGGING_COLORS="false",
        # a busy SQLite database answers 503: on a loaded 2-core machine, 5 retries are not always enough
        PREFECT_CLIENT_MAX_RETRIES="10",
        # the ephemeral server (no PREFECT_API_URL) gets the same patience as every server the tests start
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(int(SERVER_DEADLINE)),
    )
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_server(
    procs: Processes,
    home: Path,
    env: dict[str, str],
    database_url: str | None = None,
    port: int | None = None,
    name: str = "server",
) -> tuple[str, subprocess.Popen]:
    """`prefect server start` on `port` (default: a free one), its database SQLite under `home` unless
    `database_url` names another; returns the API URL (see `wait_server`). The same `home` (or database)
    and `port` again restart a stopped server where it was."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = prefect_env(env, home, None)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url or f"sqlite+aiosqlite:///{home}/prefect.db"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return f"http://127.0.0.1:{port}/api", procs.start(name, cmd, home, env)


def wait_server(procs: Processes, api_url: str, proc: subprocess.Popen, name: str = "server") -> None:
    procs.wait_ready(name, proc, f"{api_url}/health")


def start_worker(procs: Processes, name: str, pool: str, workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process worker whose flow runs work in `workdir` (its own clone): $NMT_WORKDIR, and first on PYTHONPATH."""
    env = dict(env, NMT_WORKDIR=str(workdir), PYTHONPATH=str(workdir))
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
    return procs.start(name, cmd, workdir, env)


def deploy_with_two_workers(procs: Processes, root: Path, env: dict[str, str], orchestrator: Path, gpu: Path) -> None:
    """Pools `default` and `gpu`, a process worker for each in its own clone, and prefect.yaml's deployments
    registered the documented way (`prefect deploy --all` from the clone's root) with their schedules paused,
    so that no run queues up. `env` is the workers' (PREFECT_API_URL and whatever else they hold)."""
    for pool in ("default", "gpu"):
        cli(["work-pool", "create", pool, "--type", "process"], root, env)
    start_worker(procs, "cpu-worker", "default", orchestrator, env)
    start_worker(procs, "gpu-worker", "gpu", gpu, env)
    deploy_env = dict(env, PYTHONPATH=str(orchestrator))
    cli(["--no-prompt", "deploy", "--all"], orchestrator, deploy_env, timeout=300)
    cli(["--no-prompt", "deployment", "schedule", "pause", "--all"], orchestrator, deploy_env)


def cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def train_result(api: PrefectApi, run_id: str) -> dict[str, Any]:
    """The JSON block of a train flow run's `train-result` artifact."""
    from flows.train import parse_result_markdown

    for artifact in api.artifacts(run_id):
        if artifact["key"] == "train-result":
            return parse_result_markdown(artifact["data"])
    raise AssertionError(f"train flow run {run_id} has no train-result artifact: {json.dumps(api.artifacts(run_id))}")


@dataclass
class Stack:
    """The flow tests' topology: a Prefect server, an orchestrator clone (pool `default`) and a GPU clone
    (pool `gpu`), each with its worker, a local DVC remote, and the MLflow tracking URI both clones use."""

    root: Path
    api: PrefectApi
    env: dict[str, str]  # for git and DVC in the clones
    prefect_env: dict[str, str]  # for Prefect clients and workers
    orchestrator: Path
    gpu: Path
    remote: Path
    tracking_uri: str
    procs: Processes

    def dvc(self, ws: Path, *args: str) -> str:
        return run([sys.executable, "-m", "dvc", *args], ws, self.env).stdout

    def run_pipeline(self, parameters: dict, timeout: float = 300) -> dict:
        return self.api.wait(self.api.trigger("pipeline/pipeline", parameters), timeout)

    def explain(self, flow_run: dict) -> str:
        """Everything needed to see why a run ended as it did."""
        workers = sorted(p.stem for p in self.procs.logs.glob("*worker*.log"))
        return (
            f"{flow_run['state_type']}: {flow_run['state']['message']}\n--- run log\n{self.api.logs(flow_run['id'])}"
            + "".join(f"\n--- {name}\n{self.procs.log(name)[-3000:]}" for name in workers)
        )

    def registry_versions(self, name: str = "toy-en-fr") -> list[str]:
        from mlflow import MlflowClient

        return sorted(str(v.version) for v in MlflowClient(self.tracking_uri).search_model_versions(f"name='{name}'"))


def start_stack(root: Path, procs: Processes, tracking_uri: str | None = None) -> Stack:
    """Server, pools, workers and deployments (`deploy_with_two_workers`) for a toy project under `root`, the
    DVC remote a local directory. MLflow is `tracking_uri` (default: a SQLite file under `root`)."""
    api_url, server = start_server(procs, root / "prefect", dict(os.environ))
    write_toy_corpus(root / "mirror")
    params = tiny_params(root / "mirror")
    tracking_uri = tracking_uri or f"sqlite:///{root}/mlflow.db"
    params["mlflow"]["tracking_uri"] = tracking_uri
    origin, env = make_workspace(root, params)
    remote = root / "dvc-remote"
    run([sys.executable, "-m", "dvc", "remote", "add", "--default", "local", str(remote)], origin, env)
    run(["git", "commit", "-qam", "DVC remote"], origin, env)
    clones = {}
    for name in ("orchestrator", "gpu"):
        clones[name] = root / name
        run(["git", "clone", "-q", str(origin), str(clones[name])], root, env)
    wait_server(procs, api_url, server)
    penv = prefect_env(env, root / "prefect", api_url)
    deploy_with_two_workers(procs, root, penv, clones["orchestrator"], clones["gpu"])
    api = PrefectApi(api_url)
    return Stack(root, api, env, penv, clones["orchestrator"], clones["gpu"], remote, tracking_uri, procs)
