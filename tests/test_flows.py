"""The flows without a server: their pure parts, and the pipeline flow in Prefect's ephemeral mode."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.report import metrics_markdown, run_link
from flows.train import parse_result_markdown, result_markdown
from flows.workspace import (
    CommandError,
    WorkspaceError,
    merge_lock_entries,
    read_lock,
    refuse_credentials,
    run_command,
    uncached_outs,
    workspace_lock,
    write_params,
    write_stage_outputs,
)
from seq2seq.redact import redact
from tests.pipeline_fixtures import REPO, make_workspace, tiny_params, write_toy_corpus
from tests.prefect_fixtures import prefect_env

SCORES = {"newstest2014": {"bleu": 30.5, "chrf": 58.0, "signature": "nrefs:1|..."}}


def test_report_compares_with_the_champion_when_there_is_one() -> None:
    md = metrics_markdown(SCORES, {"newstest2014": {"bleu": 29.0}}, "`models:/nmt-en-fr/3`", "models:/nmt-en-fr/4", "x")
    assert "| newstest2014 | BLEU | 30.50 | 29.00 | +1.50 |" in md
    assert "| newstest2014 | CHRF | 58.00 | – | – |" in md
    assert "none yet" in metrics_markdown(SCORES, None, "", None, "x")


def test_run_link_points_at_the_tracking_server() -> None:
    assert run_link("http://mlflow:5000/", "7", "abc") == "[abc](http://mlflow:5000/#/experiments/7/runs/abc)"
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in run_link("sqlite:///mlflow.db", "7", "abc")


def test_train_result_survives_the_markdown_artifact() -> None:
    result = {
        "lock": {"train": {"cmd": "python -m stages.train", "outs": [{"path": "models/model.pt", "md5": "ab"}]}},
        "files": {"plots/train_loss.csv": "step,loss\r\n10,2.5\r\n"},  # csv's \r\n must come back as it was
        "hashes": {"models/model.pt": "ab"},
        "mlflow_run_id": "r1",
        "git_commit": "c" * 40,
        "host": "gpu-1",
        "workdir": "/w",
    }
    assert parse_result_markdown(result_markdown(result)) == result


def test_a_second_holder_of_the_workspace_fails_naming_the_first(tmp_path: Path) -> None:
    with (
        workspace_lock(tmp_path, 0, "pipeline flow run A"),
        pytest.raises(WorkspaceError, match=r"is busy: pipeline flow run A holds"),
        workspace_lock(tmp_path, 0, "pipeline flow run B"),
    ):
        pass
    with workspace_lock(tmp_path, 0, "pipeline flow run C"):  # released on exit
        pass


def test_a_second_run_waits_for_the_first_to_release_the_workspace(tmp_path: Path) -> None:
    released = threading.Event()

    def first() -> None:
        with workspace_lock(tmp_path, 0, "pipeline flow run A"):
            held.set()
            time.sleep(1.5)
        released.set()

    held = threading.Event()
    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with workspace_lock(tmp_path, 30, "pipeline flow run B"):
        assert released.is_set()
    thread.join()


def test_lock_entries_from_a_worker_merge_in_stage_order(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  evaluate: {cmd: e}\n  tokenize: {cmd: t}\n")
    merge_lock_entries(tmp_path, {"train": {"cmd": "python -m stages.train"}})
    assert list(read_lock(tmp_path)["stages"]) == ["tokenize", "train", "evaluate"]


def test_train_outputs_dvc_does_not_push_are_known() -> None:
    assert set(uncached_outs(REPO, "train")) >= {"models/train_run.json", "metrics/train.json"}


def test_a_worker_result_writes_only_the_declared_uncached_outs_inside_the_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (tmp_path / "elsewhere").mkdir()
    (ws / "metrics").symlink_to(tmp_path / "elsewhere")  # a declared path that leads out of the workspace
    for path in ["../x", str(tmp_path / "abs"), "models/model.pt", "params.yaml", "metrics/train.json"]:
        with pytest.raises(WorkspaceError, match=f"refusing to write {re.escape(repr(path))} from the train result"):
            write_stage_outputs(ws, "train", {"models/train_run.json": "{}", path: "x"})
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (ws / "models/train_run.json").exists()
    write_stage_outputs(ws, "train", {"models/train_run.json": '{"run_id": "r"}\n'})
    assert (ws / "models/train_run.json").read_text() == '{"run_id": "r"}\n'


def test_credentials_in_urls_never_reach_the_run_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert (
        redact("git clone https://bot:ghp_s3cret@github.com/o/r.git") == "git clone https://bot:***@github.com/o/r.git"
    )
    assert (
        redact("s3://AKIA:key@minio:9000/dvc and https://tok3n@host/x")
        == "s3://AKIA:***@minio:9000/dvc and https://***@host/x"
    )
    with caplog.at_level(logging.INFO, logger="flows"), pytest.raises(CommandError) as failed:
        run_command(["sh", "-c", "echo remote http://trainer:pw123@mlflow:5000; exit 3", "https://u:pw456@h"], tmp_path)
    assert "trainer:***@mlflow" in caplog.text and "pw123" not in caplog.text and "pw456" not in caplog.text
    assert "pw123" not in str(failed.value) and "pw456" not in str(failed.value)


@pytest.mark.parametrize(
    "entry",
    ["import flows", "from seq2seq.cli import stage_parser; stage_parser('train', None)"],
    ids=["flow process", "stage"],
)
def test_every_log_record_of_a_flow_or_stage_process_is_redacted(entry: str) -> None:
    """Whoever logs (a library, here "mlflow") and whichever handler sends it on (added after the entry, as
    Prefect adds its API handler), the record carries no password."""
    code = (
        f"{entry}; import logging, sys; logging.basicConfig(stream=sys.stdout, format='%(message)s'); "
        "logging.getLogger('mlflow').warning('retrying %s', 'http://trainer:pw123@mlflow:5000/api')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "retrying http://trainer:***@mlflow:5000/api"


def test_overrides_carrying_credentials_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Prefect stores flow parameters and shows them in its UI: credentials do not belong there."""
    overrides = {"train.max_steps": 10, "download.mirror": "https://bot:ghp_s3cret@mirror.example/wmt"}
    with pytest.raises(WorkspaceError, match=r"overrides\['download.mirror'\]: a URL with credentials") as refused:
        write_params(tmp_path, "HEAD", None, overrides)
    assert "s3cret" not in str(refused.value) and list(tmp_path.iterdir()) == []
    refuse_credentials({"download.mirror": "https://mirror.example/wmt", "train.max_steps": 10})  # no credentials


def test_prefect_yaml_declares_every_deployment_of_a_flow_in_this_repository() -> None:
    import importlib

    from prefect import Flow

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"pipeline", "train", "evaluate-champion", "deliver-champion"}
    for name, d in deployments.items():
        path, _, attr = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        assert isinstance(flow, Flow) and flow.name == name  # `prefect deployment run <name>/<name>`
        assert set(d.get("parameters") or {}) <= set(flow.parameters.properties)
    assert deployments["train"]["work_pool"]["name"] == "gpu"
    assert {d["work_pool"]["name"] for n, d in deployments.items() if n != "train"} == {"default"}
    [trigger] = deployments["deliver-champion"]["triggers"]
    assert trigger["match"]["mlflow.alias"] == "champion"
    flow_params = importlib.import_module("flows.deliver_champion").deliver_champion.parameters
    assert set(trigger["parameters"]) <= set(flow_params.properties)


def test_prefect_yaml_pull_steps_resolve_the_workdir_on_the_worker_at_run_time(tmp_path: Path) -> None:
    """Prefect's own step functions and templating, as a worker applies them: the directory comes from the
    worker's $NMT_WORKDIR (a `{{ $NMT_WORKDIR }}` would have been filled in by `prefect deploy` instead)."""
    import asyncio
    import os

    from prefect.deployments.steps.pull import set_working_directory
    from prefect.deployments.steps.utility import run_shell_script
    from prefect.utilities.templating import apply_values

    (shell, first), (chdir, second) = (
        next(iter(step.items())) for step in yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    )
    assert shell.endswith(".run_shell_script") and chdir.endswith(".set_working_directory")
    assert "{{" not in first["script"]
    here = Path.cwd()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NMT_WORKDIR", str(tmp_path))
            options = {k: v for k, v in first.items() if k != "id"}
            outputs = {first["id"]: asyncio.run(run_shell_script(**options))}
            set_working_directory(**apply_values(second, outputs))
            assert Path.cwd() == tmp_path
    finally:
        os.chdir(here)


SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from mlflow import MlflowClient
    from flows.evaluate_champion import evaluate_champion
    from flows.pipeline import pipeline

    first = pipeline(train_deployment=None)          # training in this process: no gpu pool, no server
    t0 = time.perf_counter()
    second = pipeline(train_deployment=None)
    flow_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bare = subprocess.run([sys.executable, "-m", "dvc", "repro"], capture_output=True, text=True, check=True)
    dvc_s = time.perf_counter() - t0
    no_champion = evaluate_champion()
    MlflowClient(sys.argv[1]).set_registered_model_alias("toy-en-fr", "champion", "1")
    champion = evaluate_champion()
    print("RESULT " + json.dumps({"first": first, "second": second, "flow_s": flow_s, "dvc_s": dvc_s,
                                  "bare": bare.stdout, "no_champion": no_champion, "champion": champion}))
    """
)


@pytest.mark.integration
def test_pipeline_flow_in_ephemeral_mode_then_a_no_op(tmp_path: Path) -> None:
    write_toy_corpus(tmp_path / "mirror")
    params = tiny_params(tmp_path / "mirror")
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    params["mlflow"]["tracking_uri"] = tracking_uri
    ws, env = make_workspace(tmp_path, params)
    env = dict(prefect_env(env, tmp_path / "prefect", None), PYTHONPATH=str(ws), NMT_WORKDIR=str(ws))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tracking_uri], cwd=ws, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT ") :])
    assert all(v != "skipped" for v in out["first"].values()), out["first"]
    assert set(out["second"].values()) == {"skipped"}
    assert "Data and pipelines are up to date" in out["bare"]
    ratio = out["flow_s"] / out["dvc_s"]
    print(f"no-op: pipeline flow {out['flow_s']:.2f}s vs bare dvc repro {out['dvc_s']:.2f}s (x{ratio:.1f})")
    assert ratio < 5, out
    assert out["no_champion"] == {}
    assert out["champion"]["model_version"] == "1" and 0 <= out["champion"]["scores"]["toy_test"]["bleu"] <= 100


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"train_silence_s": 5}, "train_silence_s"),
        ({"lock_wait_s": -1}, "lock_wait_s"),
        ({"train_timeout_s": 0}, "train_timeout_s"),
    ],
)
def test_pipeline_parameters_out_of_range_are_refused_naming_them(bad: dict, named: str) -> None:
    """What Prefect checks before a pipeline run starts (a deployment's parameters arrive over the network)."""
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import pipeline

    with pytest.raises(ParameterTypeError, match=f"- {named}: Input should be greater"):
        pipeline.validate_parameters(bad)
    assert pipeline.validate_parameters({"train_silence_s": 45})["train_silence_s"] == 45
