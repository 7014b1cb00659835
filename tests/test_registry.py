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
from seq2seq.checkpoint import CheckpointError, save_checkpoint
from seq2seq.config import Params, parse_params
from seq2seq.promote import PromotionRefused, promote
from seq2seq.registry import load_registered
from seq2seq.score import score_corpus
from seq2seq.serving import WEIGHTS_SHA256
from seq2seq.textio import file_sha256
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
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLflow server's files: its database and, under artifacts/, its artifact store."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def server(server_root: Path) -> Iterator[str]:
    root = server_root
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
    return {"uri": server, "versions": exported, "expected": expected, "root": root, "params": params}


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
    assert tags[WEIGHTS_SHA256] == file_sha256(registry["root"] / "steps250" / "model.pt")
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
        # requests beyond the bounds of the decoding options or of the input are refused, not attempted
        too_wide = requests.post(url, json={"inputs": PROBE, "params": {"beam_size": 17}}, timeout=60)
        assert too_wide.status_code == 400 and "params.beam_size" in too_wide.text, too_wide.text
        too_many = requests.post(url, json={"inputs": PROBE, "params": {"batch_size": 1024}}, timeout=60)
        assert too_many.status_code == 400 and "batch_size x beam_size" in too_many.text, too_many.text
        too_long = requests.post(url, json={"inputs": ["a " * 3000]}, timeout=60)
        assert too_long.status_code == 400 and "at most 5000" in too_long.text, too_long.text
    finally:
        procs.stop_all()


# ---- the tests below change the registry (a third version, a replaced weights file): they come last ----


class Killed(BaseException):
    """Stands for the export process being killed: nothing after it runs."""


def test_an_export_killed_before_the_alias_is_completed_by_its_retry_without_a_second_version(
    registry: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(registry["uri"])
    d, spm = registry["root"] / "steps250", registry["root"] / "spm" / "spm.model"
    with mlflow.start_run() as run:  # a new training run of the same model
        write_run_file(run.info.run_id, run.info.experiment_id, registry["uri"], d / "retry_run.json")
    files = {"model_path": d / "model.pt", "tokenizer_path": spm, "eval_path": d / "eval.json"}
    files.update(run_file=d / "retry_run.json", out_path=d / "retry_export.json", lock_path=d / "dvc.lock")

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    with monkeypatch.context() as m:  # registered, then killed before the alias is set
        m.setattr(MlflowClient, "set_registered_model_alias", killed)
        with pytest.raises(Killed):
            export(registry["params"], **files)
    [half_done] = client.search_model_versions(f"name = '{NAME}' and run_id = '{run.info.run_id}'")
    assert half_done.tags[WEIGHTS_SHA256] == file_sha256(d / "model.pt")  # registered with all its tags at once
    assert not (d / "retry_export.json").exists()

    result = export(registry["params"], **files)  # the flow's retry
    versions = client.search_model_versions(f"name = '{NAME}' and run_id = '{run.info.run_id}'")
    assert [v.version for v in versions] == [half_done.version] == [result["version"]]
    assert client.get_model_version_by_alias(NAME, "challenger").version == result["version"]
    assert json.loads((d / "retry_export.json").read_text())["version"] == result["version"]


def test_weights_replaced_in_the_artifact_store_are_refused_by_every_loader(registry: dict, server_root: Path) -> None:
    """Someone with write access to the artifact store replaces version 2's weights with another checkpoint:
    the registry tag written at export no longer matches, and nothing loads them."""
    version = registry["versions"][1]["version"]
    exported, other = registry["root"] / "steps30" / "model.pt", registry["root"] / "steps250" / "model.pt"
    stored = [p for p in (server_root / "artifacts").rglob("*.pt") if p.read_bytes() == exported.read_bytes()]
    assert stored, "the exported weights are in the artifact store"
    for path in stored:
        path.write_bytes(other.read_bytes())
    recorded, replaced = file_sha256(exported), file_sha256(other)
    uri = f"models:/{NAME}/{version}"

    with pytest.raises(CheckpointError, match=f"sha256 {replaced} differs from {recorded} recorded in the registry"):
        load_registered(uri)  # nmt-translate -m models:/... and the evaluate-champion flow load this way
    with pytest.raises(Exception, match=f"sha256 {replaced} differs from {recorded}"):
        mlflow.pyfunc.load_model(uri)  # serving: the model's own code checks the digest it was exported with

    env = {**tool_env(registry["root"]), "MLFLOW_TRACKING_URI": registry["uri"]}
    cmd = [sys.executable, "-m", "seq2seq.translate", "-m", uri]
    proc = subprocess.run(cmd, input="a dog .\n", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and recorded in proc.stderr and replaced in proc.stderr, proc.stderr


def test_the_champion_server_runs_its_own_code_not_the_code_stored_with_the_version(
    registry: dict, server_root: Path, tmp_path: Path
) -> None:
    """Someone with write access to the artifact store replaces the version's models-from-code file: the
    champion server (and deliver-champion) load the version without running it."""
    from seq2seq.champion_server import load

    marker = tmp_path / "stored-code-ran"
    stored = [p for p in (server_root / "artifacts").rglob("translator_model.py")]
    assert stored, "the models-from-code file is in the artifact store"
    originals = {p: p.read_text() for p in stored}
    try:
        for path in stored:
            path.write_text(f"open({str(marker)!r}, 'w').close()\n" + originals[path])
        served = load(NAME, registry["versions"][0]["version"])
        assert served.backend == "pytorch" and not marker.exists()
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")  # a plain load does run it: this is what is avoided
        assert marker.exists()
    finally:
        for path, text in originals.items():
            path.write_text(text)


def test_ctranslate2_weights_delivered_to_a_version_are_checked_against_its_tag(
    registry: dict, server_root: Path, tmp_path: Path
) -> None:
    """deliver-champion's upload of CTranslate2 int8 weights records their digest beside them and as a tag; the
    champion server then serves them. Replaced in the artifact store, they are refused, naming both digests."""
    pytest.importorskip("ctranslate2")
    from flows.deliver_champion import upload_ctranslate2
    from seq2seq.champion_server import load
    from seq2seq.ctranslate2_export import export_ctranslate2
    from seq2seq.serving import CT2_INT8_DIR, CT2_INT8_SHA256, directory_sha256

    client, version = MlflowClient(registry["uri"]), registry["versions"][0]["version"]
    root = registry["root"]
    (tmp_path / "upload").mkdir()
    out = export_ctranslate2(
        root / "steps250" / "model.pt", root / "spm" / "spm.model", tmp_path / "upload" / CT2_INT8_DIR, "int8"
    )
    digest = directory_sha256(out)
    upload_ctranslate2(client, client.get_model_version(NAME, version), out, digest, Path("artifacts"))
    assert client.get_model_version(NAME, version).tags[CT2_INT8_SHA256] == digest

    served = load(NAME, version)
    assert served.backend == "ctranslate2-int8"

    uploaded = (out / "model.bin").read_bytes()
    stored = [p for p in (server_root / "artifacts").rglob("model.bin") if p.read_bytes() == uploaded]
    assert stored, "the uploaded CTranslate2 weights are in the artifact store"
    for path in stored:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"sha256 [0-9a-f]{{64}} differs from {digest} recorded"):
        load(NAME, version)  # the copy beside the files still matches the tag; the files do not
    with pytest.raises(Exception, match=f"differs from {digest}"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")

    for path in stored:  # whoever replaces the files also rewrites the digest beside them: the tag disagrees
        beside = path.parent.with_name(CT2_INT8_DIR + ".sha256")
        beside.write_text(directory_sha256(path.parent) + "\n", encoding="ascii")
    with pytest.raises(CheckpointError, match=f"registry tag {CT2_INT8_SHA256} is {digest}"):
        load(NAME, version)
