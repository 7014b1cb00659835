"""MLflow set-up shared by the stages: tracking URI and experiment from params, and the run id file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from seq2seq.config import MlflowParams
from seq2seq.textio import write_json

# This pipeline must run offline; MLflow's usage telemetry is off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow

RUN_FILE = Path("models/train_run.json")


def setup_mlflow(p: MlflowParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(p.tracking_uri)
    experiment = mlflow.set_experiment(p.experiment)
    return experiment.experiment_id


def write_run_file(run_id: str, experiment_id: str, tracking_uri: str, path: Path = RUN_FILE) -> None:
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri})


def read_run_id(path: Path = RUN_FILE) -> str:
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
