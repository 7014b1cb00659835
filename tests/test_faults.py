"""Faults in the running topology, each checked for nothing lost and nothing duplicated (issue 12, item 2).

One module-scoped topology: a Prefect server, the `default` and `gpu` process workers in their own clones
(tests/prefect_fixtures.py's `start_stack`), and a real `mlflow server` that both clones log to. The tests
share it and run in file order:

1. the gpu worker is SIGKILLed (with its flow-run process and the training under it) after training wrote a
   checkpoint; a new gpu worker starts on the same clone. The pipeline notices the silent train run (no
   heartbeat), marks it crashed, dispatches training again, and the new run resumes from the checkpoint
   that stayed in the worker's clone (checkpoints/ is not a DVC out: it survives on the worker, it does
   not travel through the remote);
2. `python -m stages.export` is SIGKILLed after it registered the version and before the alias (an HTTP
   proxy in front of MLflow holds the alias request while the test kills the process), then rerun;
3. the Prefect server is stopped and started again on its port and database while the pipeline waits on
   the train deployment: the run finishes, training ran once. Nothing in the product handles this: the
   Prefect client retries a refused connection (PREFECT_CLIENT_MAX_RETRIES, 5 by default, backing off
   2, 4, 8, 16, 32 s), which carries the pipeline's wait, the train run and both workers across a restart
   of up to about a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient

from seq2seq.tracking import write_run_file
from tests.prefect_fixtures import (
    BIN,
    FINAL_STATES,
    Stack,
    start_server,
    start_stack,
    start_worker,
    train_result,
    wait_server,
)
from tests.servers import Processes, free_port, mlflow_server_cmd

pytestmark = pytest.mark.integration
PY = sys.executable
MODEL = "toy-en-fr"
# long enough to kill it between checkpoints: a few seconds of the toy model on one thread
TRAIN = {
    "train.max_steps": 600,
    "train.save_every": 100,
    "train.log_every": 10,
    "train.eval_every": 600,
    "train.eval_bleu_sentences": 0,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("faults")
    procs = Processes(root / "logs")
    try:
        port = free_port()
        mlflow_url = f"http://127.0.0.1:{port}"
        server = procs.start(
            "mlflow", mlflow_server_cmd(str(BIN / "mlflow"), root / "mlflow", port), root, dict(os.environ)
        )
        stack = start_stack(root, procs, mlflow_url)  # the Prefect side starts while MLflow does
        procs.wait_ready("mlflow", server, f"{mlflow_url}/health")
        yield stack
    finally:
        procs.stop_all()
        # A flow-run process runs in a session of its own, which stopping its worker does not reach. After the
        # Prefect server restart below, the pipeline's one completes its flow run but never exits: at exit,
        # Prefect drains a queue service whose websocket the restart broke, and waits forever (py-spy:
        # _QueueServiceBase._at_exit -> drain -> Future.result). So whatever still works in the clones goes too.
        kill_all_in(root)


def process(stack: Stack, name: str) -> subprocess.Popen:
    return dict(stack.procs.procs)[name]


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is inside `directory` (a worker's clone)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(directory):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def kill_all_in(directory: Path) -> None:
    """SIGKILL every process working in `directory` (a worker's clone), until none is left."""
    while pids := processes_in(directory):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)


def wait_until(condition: Callable[[], bool], what: str, timeout: float, alive: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive is None or alive.poll() is None, f"{alive.args} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s"
        time.sleep(0.2)


def loss_history(tracking_uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, "loss"))


def mlflow_runs(stack: Stack) -> list[str]:
    client = MlflowClient(stack.tracking_uri)
    return [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def start_training(stack: Stack, parameters: dict) -> tuple[str, Path]:
    """Trigger the pipeline; return its flow run id once training wrote a checkpoint (a new recipe: a new
    checkpoint directory in the gpu clone), and that directory."""
    before = set(stack.gpu.glob("checkpoints/*"))
    flow_run_id = stack.api.trigger("pipeline/pipeline", parameters)

    def checkpoint_written() -> bool:
        assert stack.api.flow_run(flow_run_id)["state_type"] not in FINAL_STATES, "the pipeline ended before the kill"
        return any(d not in before and any(d.glob("step-*.pt")) for d in stack.gpu.glob("checkpoints/*"))

    wait_until(checkpoint_written, "checkpoint in the gpu worker's clone", 240)
    [ckpt_dir] = set(stack.gpu.glob("checkpoints/*")) - before
    return flow_run_id, ckpt_dir


def steps_logged(ckpt_dir: Path) -> list[int]:
    """The steps in the checkpoint directory's losses.tsv, the local record of every step."""
    return [int(line.split()[0]) for line in (ckpt_dir / "losses.tsv").read_text().splitlines()[1:]]


def replace_gpu_worker(stack: Stack, kill: Callable[[subprocess.Popen], None], name: str, ckpt_dir: Path) -> int:
    """Kill the gpu worker with `kill`, start worker `name` on the same clone; returns the last step logged."""
    worker = next(p for n, p in stack.procs.procs if n.startswith("gpu-worker"))
    kill(worker)
    worker.wait()
    stack.procs.procs = [(n, p) for n, p in stack.procs.procs if p is not worker]
    start_worker(stack.procs, name, "gpu", stack.gpu, stack.prefect_env)
    return max(steps_logged(ckpt_dir), default=0)


def assert_resumed_once(stack: Stack, flow_run_id: str, ckpt_dir: Path, max_steps: int) -> tuple[dict, int]:
    """The pipeline completed through a second train run that resumed from the checkpoint left in the gpu
    clone, with every step once in losses.tsv and in one MLflow run; returns the lost train run and the step
    the new one resumed from."""
    flow_run = stack.api.wait(flow_run_id, 400)
    assert flow_run["state_type"] == "COMPLETED", stack.explain(flow_run)
    resumed, lost = stack.api.runs_of("train/train")[:2]
    assert lost["state_type"] == "CRASHED" and resumed["state_type"] == "COMPLETED"
    log = stack.api.logs(resumed["id"], wait_for="resuming from")
    # the checkpoint survived in the worker's clone: the new run started from it, not from step 0
    resumed_from = int(re.search(rf"resuming from checkpoints/{ckpt_dir.name}/step-\d+\.pt \(step (\d+),", log)[1])
    assert 0 < resumed_from < max_steps
    result = train_result(stack.api, resumed["id"])
    assert result["workdir"] == str(stack.gpu)
    # nothing lost, nothing twice
    assert steps_logged(ckpt_dir) == list(range(1, max_steps + 1))
    assert loss_history(stack.tracking_uri, result["mlflow_run_id"]) == list(range(10, max_steps + 1, 10))
    return lost, resumed_from


def test_gpu_worker_and_its_runs_killed_mid_training_the_pipeline_crashes_the_silent_run_and_resumes(
    stack: Stack,
) -> None:
    """The machine dies: the worker, its flow-run process (a session of its own), dvc and the training, all
    SIGKILLed. The train run stays RUNNING in Prefect; the pipeline finds no heartbeat and trains again."""
    flow_run_id, ckpt_dir = start_training(stack, {"overrides": TRAIN, "train_silence_s": 45})
    killed_at = replace_gpu_worker(stack, lambda worker: kill_all_in(stack.gpu), "gpu-worker-2", ckpt_dir)

    lost, resumed_from = assert_resumed_once(stack, flow_run_id, ckpt_dir, TRAIN["train.max_steps"])
    assert resumed_from <= killed_at < TRAIN["train.max_steps"]  # killed mid-training, resumed at a checkpoint
    assert (
        "no heartbeat for" in lost["state"]["message"] and "marked crashed by the pipeline" in lost["state"]["message"]
    )
    assert train_result(stack.api, stack.api.runs_of("train/train")[0]["id"])["worker"] == "gpu-worker-2"
    assert len(mlflow_runs(stack)) == 1 and stack.registry_versions() == ["1"]  # resumed, not a new MLflow run


def test_gpu_worker_killed_alone_its_flow_run_crashes_and_the_pipeline_resumes(stack: Stack) -> None:
    """Only the worker's process group is SIGKILLed: its flow-run process loses its stdout and reports
    itself CRASHED; the pipeline trains again and the new run resumes from the checkpoint."""
    runs_before, versions_before = mlflow_runs(stack), stack.registry_versions()
    max_steps = 500  # another recipe: a checkpoint directory of its own
    flow_run_id, ckpt_dir = start_training(stack, {"overrides": {**TRAIN, "train.max_steps": max_steps}})
    killed_at = replace_gpu_worker(stack, kill_group, "gpu-worker-3", ckpt_dir)

    # the orphaned training may take a few more steps before its broken pipe stops it: no upper bound here
    lost, _ = assert_resumed_once(stack, flow_run_id, ckpt_dir, max_steps)
    assert killed_at < max_steps
    assert "no heartbeat" not in lost["state"]["message"]  # it reported its own crash
    assert len(mlflow_runs(stack)) == len(runs_before) + 1
    assert len(stack.registry_versions()) == len(versions_before) + 1


class HoldingProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of MLflow that forwards every request, except that it holds the first one
    whose path contains `hold` (never forwarding it) until `release` is set: the client is stuck there."""

    daemon_threads = True

    def __init__(self, upstream: str, hold: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.hold = upstream, hold
        self.held, self.release = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(BaseHTTPRequestHandler):
    server: HoldingProxy

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.hold in self.path and not self.server.held.is_set():
            self.server.held.set()
            self.server.release.wait()
            self.close_connection = True
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        r = requests.request(self.command, self.server.upstream + self.path, headers=headers, data=body, timeout=120)
        self.send_response(r.status_code)
        for key, value in r.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return


def export_workspace(stack: Stack, root: Path, tracking_uri: str) -> tuple[Path, str]:
    """The export stage's inputs from the orchestrator's clone, with a new MLflow run to export from (as a
    new training would make) and params pointing at `tracking_uri`; returns the directory and the run id."""
    for path in ("models/model.pt", "data/tokenized/spm.model", "metrics/eval.json"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stack.orchestrator / path, root / path)
    params = yaml.safe_load((stack.orchestrator / "params.yaml").read_text(encoding="utf-8"))
    params["mlflow"]["tracking_uri"] = tracking_uri
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    client = MlflowClient(stack.tracking_uri)
    experiment_id = client.get_experiment_by_name(params["mlflow"]["experiment"]).experiment_id
    run = client.create_run(experiment_id)
    write_run_file(run.info.run_id, experiment_id, stack.tracking_uri, root / "models/train_run.json")
    return root, run.info.run_id


def test_export_killed_between_registering_and_aliasing_is_completed_by_its_retry(stack: Stack, tmp_path: Path) -> None:
    proxy = HoldingProxy(stack.tracking_uri, hold="/registered-models/alias")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        ws, run_id = export_workspace(stack, tmp_path, proxy.url)
        env = dict(stack.env, PYTHONPATH=str(stack.orchestrator))
        export = subprocess.Popen([PY, "-m", "stages.export"], cwd=ws, env=env, stdout=subprocess.PIPE, text=True)
        wait_until(proxy.held.is_set, "alias request from the export stage", 300, alive=export)
        export.send_signal(signal.SIGKILL)  # registered, alias request in flight: killed there
        export.wait()
        proxy.release.set()

        client = MlflowClient(stack.tracking_uri)
        [half_done] = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
        assert "weights_sha256" in half_done.tags and not half_done.aliases
        assert not (ws / "models/export.json").exists()

        retry = subprocess.run([PY, "-m", "stages.export"], cwd=ws, env=env, capture_output=True, text=True)
        assert retry.returncode == 0, retry.stderr
        assert f"version {half_done.version} was registered from this run by an interrupted export" in retry.stdout
        [version] = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
        assert version.version == half_done.version and version.tags == half_done.tags
        assert client.get_model_version_by_alias(MODEL, "challenger").version == version.version
        assert json.loads((ws / "models/export.json").read_text())["version"] == version.version
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_prefect_server_restarted_while_the_pipeline_waits_on_training_the_run_finishes(stack: Stack) -> None:
    trained_before = len(stack.api.runs_of("train/train"))
    versions_before = stack.registry_versions()
    overrides = {**TRAIN, "train.max_steps": 1200}  # another recipe: trains from scratch, long enough to wait on
    flow_run_id = stack.api.trigger("pipeline/pipeline", {"overrides": overrides})

    def training() -> bool:
        runs = stack.api.runs_of("train/train")
        return len(runs) > trained_before and runs[0]["state_type"] == "RUNNING"

    wait_until(training, "running train flow run", 240)
    port = int(stack.api.url.rsplit(":", 1)[1].split("/")[0])
    stack.procs.stop(process(stack, "server"))
    t0 = time.monotonic()
    _, server = start_server(stack.procs, stack.root / "prefect", dict(os.environ), port=port, name="server-restarted")
    wait_server(stack.procs, stack.api.url, server, name="server-restarted")
    down_s = time.monotonic() - t0
    print(f"Prefect server down for {down_s:.0f}s")

    flow_run = stack.api.wait(flow_run_id, 400)
    assert flow_run["state_type"] == "COMPLETED", stack.explain(flow_run)
    runs = stack.api.runs_of("train/train")
    assert len(runs) == trained_before + 1 and runs[0]["state_type"] == "COMPLETED"  # trained once
    assert json.loads((stack.orchestrator / "metrics/train.json").read_text())["steps"] == 1200
    assert len(stack.registry_versions()) == len(versions_before) + 1
