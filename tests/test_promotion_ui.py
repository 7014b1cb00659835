"""A promotion in the MLflow UI drives delivery, for real: a person sets `champion` in the registry UI (headless
Chromium, driven by Playwright), MLflow's signed webhook reaches flows/mlflow_webhook.py, its Prefect event
triggers the deliver-champion deployment (prefect.yaml) on a process worker, and the champion server follows.

Started here, each on a free 127.0.0.1 port: `mlflow server` (SQLite, so webhooks work; private-network delivery
allowed), `prefect server`, a worker on pool `default` in its own clone, the webhook receiver, and
`python -m seq2seq.champion_server`. The registry holds three tiny Transformers trained on the toy corpus:
version 1 (medium, the champion delivered before the webhook existed), 2 (good) and 3 (bad).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch
import yaml

from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import parse_params
from seq2seq.promote import DELIVERED_TAG
from seq2seq.score import score_corpus
from seq2seq.tracking import mlflow, write_run_file
from seq2seq.translate import translate_texts
from stages.export import LINEAGE_OUTS, export
from tests.pipeline_fixtures import make_workspace, run, tiny_params
from tests.prefect_fixtures import BIN, PrefectApi, cli, prefect_env, start_server, start_worker, wait_server
from tests.servers import SERVER_DEADLINE, Processes, free_port, mlflow_server_cmd
from tests.tiny_models import tiny_transformer, toy_pairs, toy_tokenizer, train_tiny

pytestmark = [pytest.mark.integration, pytest.mark.browser]
NAME, TEST_SET, SECRET = "toy-en-fr", "toy_test", "test-secret-0123456789abcdef"
STEPS = {"1": 60, "2": 250, "3": 12}  # version -> training steps: medium, good, bad
CHROMIUM = "/usr/bin/chromium"
# as root, offline: no sandbox, and none of Chromium's calls home (refused here, and slow to fail)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROBE = ["the dog sees a red ball .", "a small cat likes the man ."]
DELIVERY_TIMEOUT = 300 + SERVER_DEADLINE  # a cold flow-run process imports torch, MLflow and Prefect first


def browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ModuleNotFoundError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module", autouse=True)
def browser() -> None:
    """CI installs Chromium and Playwright (.ci/run sets NMT_REQUIRE_BROWSER): there a missing one fails."""
    if reason := browser_missing():
        if os.environ.get("NMT_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Loop:
    root: Path
    mlflow_url: str
    serve_url: str
    api: PrefectApi
    procs: Processes
    bleu: dict[str, float]

    @property
    def client(self):
        return mlflow.MlflowClient(self.mlflow_url)

    def champion(self) -> str:
        return str(self.client.get_model_version_by_alias(NAME, "champion").version)

    def delivery_runs(self, version: str) -> list[dict]:
        return [
            r for r in self.api.runs_of("deliver-champion/deliver-champion") if r["parameters"]["version"] == version
        ]

    def wait_delivery(self, version: str, since: float) -> dict:
        """The first deliver-champion run for `version` created after `since` (Unix time), once it has finished."""
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            runs = [r for r in self.delivery_runs(version) if created(r) >= since - 1]
            if runs:
                return self.api.wait(runs[-1]["id"], deadline - time.monotonic())
            time.sleep(1.0)
        raise AssertionError(
            f"no deliver-champion run for version {version} within {DELIVERY_TIMEOUT}s\n"
            f"--- receiver\n{self.procs.log('receiver')[-3000:]}\n--- worker\n{self.procs.log('worker')[-3000:]}"
        )

    def ask(self) -> requests.Response:
        reply = requests.post(f"{self.serve_url}/invocations", json={"inputs": PROBE}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply

    def explain(self, run: dict) -> str:
        return (
            f"{run['state_type']}: {run['state']['message']}\n--- run log\n{self.api.logs(run['id'])}"
            f"\n--- worker\n{self.procs.log('worker')[-3000:]}"
        )


def created(run: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(run["created"]).timestamp()


def set_champion_in_ui(mlflow_url: str, version: str) -> float:
    """Open the version's page, add the alias `champion` in the alias editor and save; returns when Save was clicked
    (time.time())."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{mlflow_url}/#/models/{NAME}/versions/{version}")
            aliases = page.locator("[data-testid=descriptions-item]").filter(has_text="Aliases")
            aliases.get_by_role("button").last.click()  # "Add", or the pencil when the version has aliases
            dialog = page.get_by_role("dialog")
            dialog.get_by_role("combobox").click()
            page.keyboard.type("champion")
            page.keyboard.press("Enter")
            clicked = time.time()
            dialog.get_by_role("button", name="Save aliases").click()
            dialog.wait_for(state="hidden")
            return clicked
        finally:
            browser.close()


def train_versions(root: Path) -> tuple[dict[str, Path], Path, dict[str, dict]]:
    """Checkpoints of the three versions, their SentencePiece model, and each one's evaluate-style scores."""
    torch.set_num_threads(1)
    pairs = toy_pairs(600, seed=0)
    tokenizer = toy_tokenizer(root / "spm", pairs)
    src, tgt = tokenizer.encode([e for e, _ in pairs]), tokenizer.encode([f for _, f in pairs])
    test = toy_pairs(40, seed=1)
    decoding = parse_params(tiny_params(root / "mirror")).evaluate.decoding()
    checkpoints, scores = {}, {}
    for version, steps in STEPS.items():
        model = train_tiny(tiny_transformer(tokenizer.vocab_size, seed=0), src, tgt, steps=steps)
        checkpoints[version] = root / f"v{version}" / "model.pt"
        save_checkpoint(checkpoints[version], model, "transformer", steps)
        hyps = [
            n[0].text for n in translate_texts(model, tokenizer, [e for e, _ in test], decoding, torch.device("cpu"))
        ]
        scores[version] = score_corpus(hyps, [[f for _, f in test]], 2, 0)
    return checkpoints, root / "spm" / "spm.model", scores


def register_versions(root: Path, raw_params: dict, checkpoints: dict[str, Path], spm: Path, scores: dict) -> None:
    """Export each checkpoint as the export stage does, with the lineage tags a dvc.lock gives."""
    params = parse_params(raw_params)
    for version, checkpoint in checkpoints.items():
        d = checkpoint.parent
        (d / "eval.json").write_text(json.dumps({TEST_SET: scores[version]}))
        lock = {
            "schema": "2.0",
            "stages": {"s": {"outs": [{"path": p, "md5": f"{version}{i:031x}"} for i, p in enumerate(LINEAGE_OUTS)]}},
        }
        (d / "dvc.lock").write_text(yaml.safe_dump(lock))
        mlflow.set_tracking_uri(params.mlflow.tracking_uri)
        mlflow.set_experiment(params.mlflow.experiment)
        with mlflow.start_run() as run:
            write_run_file(run.info.run_id, run.info.experiment_id, params.mlflow.tracking_uri, d / "train_run.json")
        result = export(
            params, checkpoint, spm, d / "eval.json", d / "train_run.json", d / "export.json", d / "dvc.lock"
        )
        assert result["version"] == version


def mark_delivered(client, version: str, score: dict) -> None:
    """What an earlier deliver-champion run left on the champion it delivered (before the webhook existed)."""
    client.set_registered_model_alias(NAME, "champion", version)
    for key, value in {
        "delivery.status": "delivered",
        f"delivery.bleu.{TEST_SET}": f"{score['bleu']:.2f}",
        f"delivery.bleu_signature.{TEST_SET}": score["signature"],
    }.items():
        client.set_model_version_tag(NAME, version, key, value)
    client.set_registered_model_tag(NAME, DELIVERED_TAG, version)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory):
    from cryptography.fernet import Fernet

    root = tmp_path_factory.mktemp("promotion")
    procs = Processes(root / "logs")
    try:
        # the two servers boot (tens of seconds each) while the models train
        mlflow_port = free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        raw = tiny_params(root / "mirror")
        raw["mlflow"] = {"tracking_uri": mlflow_url, "experiment": "promotion-ui"}
        raw["export"]["promotion_margin"] = 1.0
        ws, env = make_workspace(root, raw)
        # CTranslate2 runs its int8 products on oneDNN on AMD CPUs and on MKL on Intel ones. Without VNNI (an
        # AVX2-only AMD EPYC) oneDNN's u8s8 products saturate: there version 2 lost 12 BLEU in int8, and the
        # delivery guard refused it, as it should. MKL's int8 keeps the BLEU on every x86 CPU, so this test of the
        # promotion loop gets the same int8 model everywhere (the worker and the champion server inherit env).
        env["CT2_USE_MKL"] = "1"
        mlflow_env = dict(
            env,
            MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",  # the receiver is plain HTTP on loopback here
            MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
            MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode(),
            MLFLOW_WEBHOOK_CACHE_TTL="1",  # the webhook is created after the first alias was set
        )
        mlflow_proc = procs.start("mlflow", mlflow_server_cmd(str(BIN / "mlflow"), root, mlflow_port), root, mlflow_env)
        api_url, prefect_proc = start_server(procs, root / "prefect", env)
        checkpoints, spm, scores = train_versions(root)
        procs.wait_ready("mlflow", mlflow_proc, f"{mlflow_url}/health")
        wait_server(procs, api_url, prefect_proc)

        register_versions(root, raw, checkpoints, spm, scores)
        mark_delivered(mlflow.MlflowClient(mlflow_url), "1", scores["1"])
        # the worker's clone has the test set where the flow looks for it (else it would `dvc pull` it)
        test = toy_pairs(40, seed=1)
        for path, lines in (
            ("data/clean/test/toy_test.en", [e for e, _ in test]),
            ("data/raw/toy_test.fr", [f for _, f in test]),
        ):
            (ws / path).parent.mkdir(parents=True, exist_ok=True)
            (ws / path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

        penv = prefect_env(env, root / "prefect", api_url)
        for pool in ("default", "gpu"):
            cli(["work-pool", "create", pool, "--type", "process"], root, penv)
        cli(["--no-prompt", "deploy", "--name", "deliver-champion"], ws, dict(penv, PYTHONPATH=str(ws)), timeout=300)
        start_worker(procs, "worker", "default", ws, penv)

        receiver_port = free_port()
        renv = dict(penv, NMT_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(ws))
        receiver = procs.start(
            "receiver",
            [sys.executable, "-m", "flows.mlflow_webhook", "serve", "--port", str(receiver_port)],
            ws,
            renv,
        )
        url = f"http://127.0.0.1:{receiver_port}/mlflow"
        register = [
            sys.executable,
            "-m",
            "flows.mlflow_webhook",
            "register",
            "--tracking-uri",
            mlflow_url,
            "--url",
            url,
        ]
        run(register, ws, renv)

        serve_port = free_port()
        serve_cmd = [sys.executable, "-m", "seq2seq.champion_server", "--name", NAME, "--poll-s", "1"]
        server = procs.start(
            "serve",
            [*serve_cmd, "--port", str(serve_port)],
            ws,
            dict(env, MLFLOW_TRACKING_URI=mlflow_url, PYTHONPATH=str(ws)),
        )
        procs.wait_ready("receiver", receiver, f"http://127.0.0.1:{receiver_port}/health")
        procs.wait_ready("serve", server, f"http://127.0.0.1:{serve_port}/champion")
        bleu = {v: s["bleu"] for v, s in scores.items()}
        assert bleu["2"] > bleu["1"] + 1.0 > bleu["3"] + 2.0, bleu
        yield Loop(root, mlflow_url, f"http://127.0.0.1:{serve_port}", PrefectApi(api_url), procs, bleu)
    finally:
        procs.stop_all()


def test_a_better_version_promoted_in_the_ui_is_delivered_and_served(loop: Loop) -> None:
    before = loop.ask()
    assert before.headers["x-model-version"] == "1" and before.headers["x-model-backend"] == "pytorch"

    clicked = set_champion_in_ui(loop.mlflow_url, "2")
    assert loop.champion() == "2"
    flow_run = loop.wait_delivery("2", clicked)
    assert flow_run["state_type"] == "COMPLETED", loop.explain(flow_run)

    # the server answers from version 1 until version 2 is loaded, then from version 2, with its CTranslate2 weights
    while (reply := loop.ask()).headers["x-model-version"] != "2":
        assert reply.headers["x-model-version"] == "1"
        assert time.time() - clicked < DELIVERY_TIMEOUT, "the champion server did not follow the delivery"
        time.sleep(0.2)
    served_s = time.time() - clicked
    assert reply.headers["x-model-backend"] == "ctranslate2-int8"
    first, second = reply.json()["predictions"]
    assert "chien" in first and "ballon" in first and "chat" in second

    client = loop.client
    tags = client.get_model_version(NAME, "2").tags
    assert tags["delivery.status"] == "delivered" and tags["delivery.backend"] == "ctranslate2-int8"
    pytorch_bleu, ct2_bleu = (
        float(tags[f"delivery.bleu.{TEST_SET}"]),
        float(tags[f"delivery.ctranslate2_int8.bleu.{TEST_SET}"]),
    )
    assert pytorch_bleu == pytest.approx(loop.bleu["2"], abs=0.01)  # re-scored: the same number as the evaluate stage's
    assert ct2_bleu >= pytorch_bleu - 0.5
    assert tags[f"delivery.bleu_signature.{TEST_SET}"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    speeds = {k: float(v) for k, v in tags.items() if ".sentences_per_s." in k}
    assert len(speeds) == 2 and all(s > 0 for s in speeds.values())
    model_id = client.get_model_version(NAME, "2").source.removeprefix("models:/")
    exported = {Path(f.path).name for f in client.list_logged_model_artifacts(model_id, "artifacts/ctranslate2-int8")}
    assert {"model.bin", "spm.model"} <= exported
    assert client.get_registered_model(NAME).tags[DELIVERED_TAG] == "2"
    # the run's markdown summary, linked from the version's description
    [report] = [a for a in loop.api.artifacts(flow_run["id"]) if a["key"] == "champion-delivery"]
    assert "delivered" in report["data"] and "| toy_test |" in report["data"]
    assert flow_run["id"] in client.get_model_version(NAME, "2").description
    pt_speed = speeds[f"delivery.pytorch.sentences_per_s.{TEST_SET}"]
    ct2_speed = speeds[f"delivery.ctranslate2_int8.sentences_per_s.{TEST_SET}"]
    print(
        f"UI click -> champion served: {served_s:.1f}s (delivery run {run_seconds(flow_run):.1f}s); "
        f"BLEU on {TEST_SET}: PyTorch {pytorch_bleu:.2f} at {pt_speed:.0f} sent/s, "
        f"CTranslate2 int8 {ct2_bleu:.2f} at {ct2_speed:.0f} sent/s"
    )


def test_a_worse_version_promoted_in_the_ui_is_moved_back_with_the_reason(loop: Loop) -> None:
    clicked = set_champion_in_ui(loop.mlflow_url, "3")
    flow_run = loop.wait_delivery("3", clicked)
    assert flow_run["state_type"] == "FAILED", loop.explain(flow_run)
    assert "below the previous champion" in flow_run["state"]["message"], loop.explain(flow_run)

    assert loop.champion() == "2"
    tags = loop.client.get_model_version(NAME, "3").tags
    assert tags["delivery.status"] == "rejected"
    assert "moved back to version 2" in tags["delivery.reason"] and f"{loop.bleu['3']:.2f}" in tags["delivery.reason"]
    assert tags["delivery.alias_set_by"].startswith("unknown: set in the MLflow UI")
    assert loop.client.get_registered_model(NAME).tags[DELIVERED_TAG] == "2"
    # moving the alias back is an alias change too: its delivery run finds version 2 delivered already
    restored = loop.wait_delivery("2", clicked)
    assert restored["state_type"] == "COMPLETED", loop.explain(restored)
    # the server never switched to the rejected version
    assert loop.ask().headers["x-model-version"] == "2"
    assert "-> 3 (" not in loop.procs.log("serve")


def run_seconds(flow_run: dict) -> float:
    return float(flow_run.get("total_run_time") or 0.0)
