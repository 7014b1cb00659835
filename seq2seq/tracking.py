"""MLflow set-up shared by the stages: tracking URI and experiment from params, and the run id file."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from seq2seq import paths
from seq2seq.config import MlflowParams
from seq2seq.textio import write_json

# This pipeline must run offline; MLflow's usage telemetry is off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow
from mlflow.entities import Metric


def setup_mlflow(p: MlflowParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(p.tracking_uri)
    experiment = mlflow.set_experiment(p.experiment)
    return experiment.experiment_id


def write_run_file(run_id: str, experiment_id: str, tracking_uri: str, path: Path = paths.RUN_FILE) -> None:
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri})


def read_run_id(path: Path = paths.RUN_FILE) -> str:
    """The MLflow run id that the train stage wrote, so later stages log to the same run."""
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (run the train stage first)") from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dvc_out_hash(out_path: str, lock: Path = Path("dvc.lock")) -> str | None:
    """The md5 that dvc.lock records for the output `out_path` (e.g. data/tokenized), if any."""
    try:
        stages = yaml.safe_load(Path(lock).read_text(encoding="utf-8")).get("stages", {})
    except (FileNotFoundError, AttributeError, yaml.YAMLError):
        return None
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == out_path:
                return out.get("md5") or out.get("hash")
    return None


class ResilientRun:
    """MLflow logging for a long run that must outlive the tracking server.

    Metrics are queued and sent in batches by a background thread, so logging never waits on the
    network. The first failed call prints a warning and turns tracking off for the rest of the run;
    training and its checkpoints carry on. (MLflow's own async logging only logs its failures.)

    A resumed run redoes the steps between its last checkpoint and the crash, with the same values
    (resume is exact), so `continued=True` reads how far each metric got and skips the steps already logged.
    """

    def __init__(self, run_id: str, continued: bool = False):
        self.run_id, self.alive = run_id, True
        self.client = mlflow.MlflowClient()
        self.logged_through: dict[str, int] = {}  # metric -> last step already in the run
        if continued:
            self.call("reading the metric history", self._read_logged_steps)
        self.queue: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send, name="mlflow-metrics", daemon=True)
        self.sender.start()

    def _fail(self, what: str, err: BaseException) -> None:
        if self.alive:
            self.alive = False
            print(f"WARNING: MLflow {what} failed; tracking is off for the rest of this run: {err}", file=sys.stderr)

    def _send(self) -> None:
        done = False
        while not done:
            items = [self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            done = items[-1] is None  # end() puts None last
            metrics = [
                Metric(k, float(v), ts, step)
                for values, step, ts in items[: len(items) - done]
                for k, v in values.items()
            ]
            try:
                for i in range(0, len(metrics) if self.alive else 0, 1000):  # MLflow's limit per log_batch
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)
            except Exception as err:  # MlflowException, requests/urllib3 errors, OSError: all mean "tracking is down"
                self._fail("log_batch", err)

    def call(self, what: str, fn, *args, **kwargs) -> None:
        """fn(*args, **kwargs) now, unless tracking is already off; a failure turns it off."""
        if self.alive:
            try:
                fn(*args, **kwargs)
            except Exception as err:  # as in _send
                self._fail(what, err)

    def _read_logged_steps(self) -> None:
        for key in self.client.get_run(self.run_id).data.metrics:
            self.logged_through[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        new = {k: v for k, v in metrics.items() if step > self.logged_through.get(k, -1)}
        if self.alive and new:
            self.queue.put((new, step, int(time.time() * 1000)))

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self.call("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, timeout: float = 60.0) -> None:
        """Send what is queued, then mark the run finished (or failed, when tracking went down)."""
        self.queue.put(None)
        self.sender.join(timeout)
        if self.sender.is_alive():
            self._fail("flush", TimeoutError(f"metrics not sent within {timeout:.0f}s"))
        self.call("end_run", mlflow.end_run)
