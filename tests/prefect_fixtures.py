"""Real Prefect servers and workers on 127.0.0.1 for the flow tests, and a tiny REST client for them.

Processes, ports and the readiness deadline come from tests/servers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

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
        # the ephemeral server (no PREFECT_API_URL) gets the same patience as every server the tests start
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(int(SERVER_DEADLINE)),
    )
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_server(
    procs: Processes, home: Path, env: dict[str, str], database_url: str | None = None
) -> tuple[str, subprocess.Popen]:
    """`prefect server start` on a free port, its database SQLite under `home` unless `database_url` names
    another; returns the API URL (see `wait_server`)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(env, home, None)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url or f"sqlite+aiosqlite:///{home}/prefect.db"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return f"http://127.0.0.1:{port}/api", procs.start("server", cmd, home, env)


def wait_server(procs: Processes, api_url: str, proc: subprocess.Popen) -> None:
    procs.wait_ready("server", proc, f"{api_url}/health")


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
