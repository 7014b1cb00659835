"""MLflow set-up shared by the stages: tracking URI and experiment from params, and the run id file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from seq2seq import paths
from seq2seq.config import MlflowParams
from seq2seq.redact import redact
from seq2seq.textio import atomic_write, write_json

# This pipeline must run offline; MLflow's usage telemetry is off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow
from mlflow.entities import Metric, Param

RETRY_SECONDS = 5.0  # while MLflow is down, ResilientRun tries again this often


def setup_mlflow(p: MlflowParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(p.tracking_uri)
    experiment = mlflow.set_experiment(p.experiment)
    return experiment.experiment_id


def write_run_file(run_id: str, experiment_id: str, tracking_uri: str, path: Path = paths.RUN_FILE) -> None:
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": redact(tracking_uri)})


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
    """MLflow logging for a long run that must outlive the tracking server, whether it is down at the start,
    goes away in the middle or comes back later.

    Every metric is first appended to a local journal (`metrics.jsonl` in the checkpoint directory); a
    background thread sends MLflow what it lacks, so logging never waits on the network. The thread creates
    the run (with `params` and `tags`) or continues `run_id`, reads how far each metric already got, and sends
    the rest in batches; when MLflow does not answer it says so once and tries again every `retry_seconds`,
    re-reading what arrived before the failure so that nothing is sent twice. The run id is written beside the
    journal as soon as the run exists, so a process killed before its next checkpoint continues the same run.

    A resumed run redoes the steps between its last checkpoint and the crash with the same values (resume is
    exact): the journal is cut back to the checkpoint's step, like losses.tsv, and a (metric, step) pair
    already journaled or in MLflow is never logged again. What MLflow still lacks when `end` gives up stays in
    the journal, and the next run of the stage sends it.
    """

    def __init__(
        self,
        journal: Path,
        through_step: int,
        tracking_uri: str,
        experiment: str,
        run_id: str | None = None,
        run_name: str = "",
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ):
        self.journal, self.run_file = journal, journal.with_name("mlflow_run.json")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params, self.tags = params or {}, tags or {}
        self.retry_seconds = retry_seconds
        self.run_id = self._saved_run_id() or run_id  # the file is written as soon as the run exists
        # This thread retries on its own, forever; MLflow's retries (minutes of back-off per request) would
        # only delay noticing that the server is back. An explicit setting is kept.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        self.experiment_id: str | None = None
        self.records = self._read_journal(through_step)  # [(step, timestamp ms, {metric: value})], in log order
        self.journaled_through: dict[str, int] = {}
        for step, _, values in self.records:
            for key in values:
                self.journaled_through[key] = max(step, self.journaled_through.get(key, -1))
        journal.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(journal) as f:
            f.writelines(json.dumps({"step": s, "ts": ts, "metrics": v}) + "\n" for s, ts, v in self.records)
        self.file = journal.open("a", encoding="utf-8")
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.connected = False  # the run exists and logged_through is what MLflow has
        self.logged_through: dict[str, int] = {}  # metric -> last step MLflow has
        self.sent = 0  # records[:sent] are in MLflow
        self.artifacts: list[tuple[Path, str]] = []
        self.finished = False  # MLflow has everything and the run is marked FINISHED
        self.warned = False
        self.last_error = ""
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self.sender.start()

    # ---- the journal ----------------------------------------------------------------------------------

    def _saved_run_id(self) -> str | None:
        try:
            return json.loads(self.run_file.read_text(encoding="utf-8"))["run_id"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def _read_journal(self, through_step: int) -> list[tuple[int, int, dict[str, float]]]:
        if not through_step or not self.journal.exists():
            return []
        records = []
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                continue
            if entry["step"] <= through_step:
                records.append((entry["step"], entry["ts"], entry["metrics"]))
        return records

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Journal the metrics of `step` that are not journaled yet, and let the sender know."""
        new = {k: float(v) for k, v in metrics.items() if step > self.journaled_through.get(k, -1)}
        if not new:
            return
        record = (step, int(time.time() * 1000), new)
        self.file.write(json.dumps({"step": step, "ts": record[1], "metrics": new}) + "\n")
        self.file.flush()
        with self.lock:
            self.records.append(record)
        for key in new:
            self.journaled_through[key] = step
        self.wake.set()

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        """Upload `path` once the metrics are in (at `end`)."""
        self.artifacts.append((Path(path), artifact_path))

    # ---- the sender -----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            stopping = self.stopping.is_set()
            try:
                self._sync(final=stopping)
            except Exception as err:  # MlflowException, requests/urllib3 errors, OSError: all mean "MLflow is down"
                self.connected = False
                self.last_error = redact(str(err))[:300]
                if not self.warned:
                    self.warned = True
                    print(
                        f"WARNING: MLflow at {redact(self.tracking_uri)} is not answering ({redact(str(err))[:300]}); "
                        f"training goes on, metrics are kept in {self.journal} and sent when it is back",
                        file=sys.stderr,
                        flush=True,
                    )
                if stopping:
                    return
                self.wake.wait(self.retry_seconds)
                self.wake.clear()
                continue
            if stopping:
                return
            if self.warned:
                print(f"MLflow at {redact(self.tracking_uri)} is back: run {self.run_id} is up to date", flush=True)
                self.warned = False
            self.wake.wait()
            self.wake.clear()

    def _connect(self) -> None:
        """Create or continue the run, and learn how far each of its metrics got."""
        if self.experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
            )
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
            except mlflow.exceptions.MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                print(f"WARNING: cannot continue MLflow run {self.run_id} ({err.message}); starting a new one")
                self.run_id = None
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
            items = [Param(k, str(v)) for k, v in self.params.items()]
            for i in range(0, len(items), 100):  # MLflow's limit of params per log_batch
                self.client.log_batch(run.info.run_id, params=items[i : i + 100], synchronous=True)
            self.run_id = run.info.run_id
            write_json(self.run_file, {"run_id": self.run_id, "tracking_uri": redact(self.tracking_uri)})
        self.logged_through = {
            key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in run.data.metrics
        }
        with self.lock:
            self.sent = 0
        self.connected = True

    def _sync(self, final: bool) -> None:
        if not self.connected:
            self._connect()
        with self.lock:
            pending = self.records[self.sent :]
        metrics = [
            Metric(key, value, ts, step)
            for step, ts, values in pending
            for key, value in values.items()
            if step > self.logged_through.get(key, -1)
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per log_batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)
        for m in metrics:
            self.logged_through[m.key] = max(m.step, self.logged_through.get(m.key, -1))
        with self.lock:
            self.sent += len(pending)
        if final:
            while self.artifacts:
                path, artifact_path = self.artifacts[0]
                self.client.log_artifact(self.run_id, str(path), artifact_path)
                self.artifacts.pop(0)
            self.client.set_terminated(self.run_id, "FINISHED")
            self.finished = True

    def end(self, timeout: float = 120.0) -> None:
        """Send what MLflow lacks, upload the artifacts and finish the run, for up to `timeout` seconds; what is
        still unsent then stays in the journal (a warning says so)."""
        self.stopping.set()
        self.wake.set()
        self.sender.join(timeout)
        self.file.close()
        if not self.finished:
            with self.lock:
                unsent = len(self.records) - self.sent
            print(
                f"WARNING: MLflow at {redact(self.tracking_uri)} did not take the run's last {unsent} metric records "
                f"and {len(self.artifacts)} artifacts ({self.last_error or 'no answer in time'}); they are kept in "
                f"{self.journal.parent} and sent by the next run of the stage",
                file=sys.stderr,
                flush=True,
            )
