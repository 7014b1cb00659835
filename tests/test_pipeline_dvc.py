"""`dvc repro` for real, in a throw-away git+DVC repo, through all six stages on a toy corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.pipeline_fixtures import make_workspace, run, tiny_params, write_toy_corpus

pytestmark = pytest.mark.integration
STAGES = ["download", "clean", "tokenize", "train", "evaluate", "export"]


def dvc(ws: Path, env: dict[str, str], *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], ws, env).stdout


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_dvc_repro_runs_all_stages_then_only_what_changed(tmp_path: Path) -> None:
    write_toy_corpus(tmp_path / "mirror")
    ws, env = make_workspace(tmp_path, tiny_params(tmp_path / "mirror"))

    out = dvc(ws, env, "repro")
    assert ran_stages(out) == STAGES

    # download: aligned plain text; clean: a per-rule report; tokenize: the SentencePiece model
    assert len((ws / "data/raw/toy_train.en").read_text().splitlines()) == 400
    clean = json.loads((ws / "metrics/clean.json").read_text())
    assert clean["input_pairs"] == 400
    assert clean["kept_pairs"] + sum(clean["dropped"].values()) == 400
    assert clean["dropped"]["duplicate"] > 0  # the toy grammar repeats some pairs
    assert (ws / "data/tokenized/spm.model").stat().st_size > 0
    meta = json.loads((ws / "data/tokenized/meta.json").read_text())
    assert meta["splits"]["train"]["en"]["sentences"] == clean["kept_pairs"]

    # train: a checkpoint, finite losses, the MLflow run id
    train = json.loads((ws / "metrics/train.json").read_text())
    assert train["steps"] == 40
    assert 0 < train["dev_loss"] < 10
    run_id = json.loads((ws / "models/train_run.json").read_text())["run_id"]

    # evaluate: one hypothesis per test line, scores in range, signatures recorded
    scores = json.loads((ws / "metrics/eval.json").read_text())["toy_test"]
    assert scores["n_sentences"] == 40
    assert len((ws / "eval/toy_test.fr").read_text().splitlines()) == 40
    assert 0.0 <= scores["bleu"] <= 100.0 and 0.0 <= scores["chrf"] <= 100.0
    assert scores["signature"].startswith("nrefs:1|") and scores["chrf_signature"].startswith("nrefs:1|")
    assert scores["ter"] >= 0.0 and "bleu_signature" not in scores  # BLEU's signature is "signature"
    assert scores["bleu_ci_low"] <= scores["bleu_ci_high"] and scores["decode_seconds"] >= 0
    # plots: BLEU by source length (a DVC plot) and a PNG that needs no browser
    plots = json.loads(dvc(ws, env, "plots", "show", "--json"))["data"]
    assert "plots/bleu_by_length/toy_test.csv" in plots and "plots/train_loss.csv" in plots
    assert (ws / "plots/evaluate.png").read_bytes()[:4] == b"\x89PNG"

    # export: a registered version, attached to the training run, tagged and made the challenger
    export = json.loads((ws / "models/export.json").read_text())
    assert export["registered_model_name"] == "toy-en-fr"
    assert export["version"] == "1" and export["run_id"] == run_id
    version = MlflowClient(f"sqlite:///{ws}/mlflow.db").get_model_version_by_alias("toy-en-fr", "challenger")
    assert str(version.version) == "1" and version.tags["bleu.toy_test"] == str(scores["bleu"])
    assert version.tags["dvc.md5.data/tokenized"].endswith(".dir")  # from dvc.lock, written before export ran

    # an unchanged workspace is a no-op
    model_mtime = (ws / "models/model.pt").stat().st_mtime_ns
    out = dvc(ws, env, "repro")
    assert ran_stages(out) == []
    assert (ws / "models/model.pt").stat().st_mtime_ns == model_mtime
    assert "Data and pipelines are up to date" in dvc(ws, env, "status")

    # one train param changed: train, evaluate and export run again, nothing upstream
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(ws, env, "repro")
    assert ran_stages(out) == ["train", "evaluate", "export"]
    assert json.loads((ws / "models/export.json").read_text())["version"] == "2"
