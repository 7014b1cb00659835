"""The MLflow model registry for real: a `mlflow server` on 127.0.0.1 (SQLite + local artifacts), two
exported versions scored the way the evaluate stage scores them, promotion by BLEU with a UI-style
manual alias change, a fresh-process load of models:/<name>@champion and `mlflow models serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient

from seq2seq import promote as promote_cli
from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import Params, parse_params
from seq2seq.promote import PromotionRefused, promote
from seq2seq.score import score_corpus
from seq2seq.tracking import mlflow, write_run_file
from seq2seq.translate import translate_texts
from stages.export import export
from tests.pipeline_fixtures import tiny_params, tool_env
from tests.servers import Processes, free_port, mlflow_server_cmd
from tests.tiny_models import tiny_transformer, toy_pairs, toy_tokenizer, train_tiny

pytestmark = pytest.mark.integration
MLFLOW = str(Path(sys.executable).parent / "mlflow")
NAME, TEST_SET = "toy-en-fr", "toy_test"
PROBE = ["the dog sees a red ball .", "a small cat likes the man ."]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    procs, port = Processes(root / "logs"), free_port()
    try:
        proc = procs.start("mlflow", mlflow_server_cmd(MLFLOW, root, port), root, tool_env(root))
        procs.wait_ready("mlflow", proc, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def registry(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Versions 1 (trained 250 steps) and 2 (30 steps) of toy-en-fr, each with evaluate-style scores."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    raw = tiny_params(root / "mirror")
    raw["mlflow"] = {"tracking_uri": server, "experiment": "registry-test"}
    params: Params = parse_params(raw)
    pairs = toy_pairs(600, seed=0)
    tokenizer = toy_tokenizer(root / "spm", pairs)
    src, tgt = tokenizer.encode([e for e, _ in pairs]), tokenizer.encode([f for _, f in pairs])
    test = toy_pairs(40, seed=1)
    decoding = params.evaluate.decoding()
    exported, good_model = [], None
    for steps in (250, 30):
        model = train_tiny(tiny_transformer(tokenizer.vocab_size, seed=0), src, tgt, steps=steps)
        good_model = good_model or model
        d = root / f"steps{steps}"
        save_checkpoint(d / "model.pt", model, "transformer", steps)
        hyps = [
            n[0].text for n in translate_texts(model, tokenizer, [e for e, _ in test], decoding, torch.device("cpu"))
        ]
        scores = score_corpus(hyps, [[f for _, f in test]], params.evaluate.chrf_word_order, 0)
        (d / "eval.json").write_text(json.dumps({TEST_SET: {**scores, "decode_seconds": 0.0}}))
        mlflow.set_tracking_uri(server)
        mlflow.set_experiment("registry-test")
        with mlflow.start_run() as run:
            write_run_file(run.info.run_id, run.info.experiment_id, server, d / "train_run.json")
        result = export(
            params,
            model_path=d / "model.pt",
            tokenizer_path=root / "spm" / "spm.model",
            eval_path=d / "eval.json",
            run_file=d / "train_run.json",
            out_path=d / "export.json",
            lock_path=d / "dvc.lock",
        )
        exported.append({**result, "bleu": scores["bleu"]})
    expected = [n[0].text for n in translate_texts(good_model, tokenizer, PROBE, decoding, torch.device("cpu"))]
    return {"uri": server, "versions": exported, "expected": expected, "root": root}


def champion(client: MlflowClient) -> str:
    return client.get_model_version_by_alias(NAME, "champion").version


def test_export_registers_tagged_versions_and_the_newest_is_challenger(registry: dict) -> None:
    good, worse = registry["versions"]
    assert (good["version"], worse["version"]) == ("1", "2")
    assert good["bleu"] > worse["bleu"] + 5, "the longer-trained model should be clearly better"
    client = MlflowClient(registry["uri"])
    tags = client.get_model_version(NAME, "1").tags
    assert tags[f"bleu.{TEST_SET}"] == str(good["bleu"])
    assert tags[f"bleu_signature.{TEST_SET}"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert len(tags["params_sha256"]) == 64 and tags["git_commit"]
    assert tags["decoding.beam_size"] == "5" and f"ter.{TEST_SET}" in tags
    assert client.get_model_version_by_alias(NAME, "challenger").version == "2"


def test_promotion_compares_bleu_and_respects_manual_alias_changes(registry: dict, capsys) -> None:
    client = MlflowClient(registry["uri"])
    good, worse = registry["versions"]
    assert "no champion yet" in promote(client, NAME, "1", TEST_SET, margin=0.0)
    assert champion(client) == "1"

    # the worse challenger is refused, with both numbers shown; the command line says the same
    with pytest.raises(PromotionRefused) as refused:
        promote(client, NAME, "2", TEST_SET, margin=0.0)
    assert f"{worse['bleu']:.2f}" in str(refused.value) and f"{good['bleu']:.2f}" in str(refused.value)
    argv = ["--tracking-uri", registry["uri"], "--name", NAME, "--test-set", TEST_SET]
    with pytest.raises(SystemExit, match="not promoted"):
        promote_cli.main(argv)  # version: the challenger alias, i.e. 2
    assert champion(client) == "1"

    # a person moves the alias by hand, as in the UI; promotion compares with what the registry says now
    client.set_registered_model_alias(NAME, "champion", "2")
    with pytest.raises(PromotionRefused, match=r"margin 1000\.00"):
        promote(client, NAME, "1", TEST_SET, margin=1000.0)
    promote_cli.main([*argv, "--version", "1", "--margin", "0.5"])
    assert "champion -> version 1" in capsys.readouterr().out
    assert champion(client) == "1"
    assert client.get_model_version(NAME, "1").tags["promotion.previous_champion"] == "2"

    # --force promotes anyway and records who did it
    promote(client, NAME, "2", TEST_SET, margin=0.0, force=True, user="alice")
    assert champion(client) == "2"
    assert client.get_model_version(NAME, "2").tags["promotion.forced_by"] == "alice"
    promote(client, NAME, "1", TEST_SET, margin=0.0)
    assert champion(client) == "1"


def test_champion_loads_and_translates_in_a_fresh_process(registry: dict) -> None:
    code = (
        "import json, mlflow.pyfunc; "
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion'); "
        f"print(json.dumps(m.predict({PROBE!r})))"
    )
    env = {**tool_env(registry["root"]), "MLFLOW_TRACKING_URI": registry["uri"]}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == registry["expected"]


def test_served_champion_answers_invocations(registry: dict) -> None:
    root, port = registry["root"], free_port()
    procs = Processes(root / "logs")
    env = {**tool_env(root), "MLFLOW_TRACKING_URI": registry["uri"]}
    cmd = [MLFLOW, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local"]
    try:
        proc = procs.start("serve", [*cmd, "--host", "127.0.0.1", "--port", str(port)], root, env)
        procs.wait_ready("serve", proc, f"http://127.0.0.1:{port}/ping")
        url = f"http://127.0.0.1:{port}/invocations"
        reply = requests.post(url, json={"inputs": PROBE}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == registry["expected"]
        greedy = requests.post(url, json={"inputs": ["", PROBE[0]], "params": {"beam_size": 1}}, timeout=60)
        assert greedy.status_code == 200, greedy.text
        assert greedy.json()["predictions"][0] == "" and "chien" in greedy.json()["predictions"][1]
    finally:
        procs.stop_all()
