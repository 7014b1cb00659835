"""The train stage: schedules and data order (fast), then for real in subprocesses on the toy corpus:
exact resume after kill -9, DDP with 2 CPU processes (gloo), and an MLflow server that dies mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from seq2seq.config import parse_params
from stages.train import epoch_batches, learning_rate, rng_state, set_rng_state
from tests.pipeline_fixtures import REPO, committed_params, tiny_params, tool_env, write_toy_corpus
from tests.servers import Processes, free_port, mlflow_server_cmd

# ---- fast unit tests ------------------------------------------------------------------------------------


def test_learning_rate_schedules() -> None:
    p = parse_params(committed_params()).train.model_copy(
        update={"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr": 0.1}
    )
    assert learning_rate(5, p) == pytest.approx(0.5)
    assert learning_rate(10, p) == pytest.approx(1.0)
    assert learning_rate(40, p) == pytest.approx(0.5)  # sqrt(10 / 40)
    cosine = p.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate(10, cosine) == pytest.approx(1.0)
    assert learning_rate(60, cosine) == pytest.approx(0.55)
    assert learning_rate(110, cosine) == pytest.approx(0.1)


def test_epoch_batches_are_deterministic_and_sharded() -> None:
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 30, 500), rng.integers(1, 30, 500)
    whole = epoch_batches(src, tgt, 200, seed=1, epoch=3, rank=0, world=1)
    again = epoch_batches(src, tgt, 200, seed=1, epoch=3, rank=0, world=1)
    assert all(np.array_equal(a, b) for a, b in zip(whole, again, strict=True))
    other_epoch = epoch_batches(src, tgt, 200, seed=1, epoch=4, rank=0, world=1)
    assert not all(np.array_equal(a, b) for a, b in zip(whole, other_epoch, strict=False))
    shards = [epoch_batches(src, tgt, 200, seed=1, epoch=3, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) // 2
    seen = np.concatenate([b for shard in shards for b in shard])
    assert len(seen) == len(set(seen.tolist()))  # no sentence on both ranks


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    import random

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.random()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


# ---- subprocess training on the toy corpus --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """data/ of the toy corpus after download, clean and tokenize; and the tiny params that made it."""
    root = tmp_path_factory.mktemp("toy")
    write_toy_corpus(root / "mirror")
    raw = tiny_params(root / "mirror")
    ws = root / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = tool_env(root)
    for stage in ("download", "clean", "tokenize"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws, env=env, check=True, capture_output=True)
    return ws / "data", raw


def workspace(root: Path, tokenized: tuple[Path, dict[str, Any]], **train: Any) -> tuple[Path, dict[str, str]]:
    """A directory with the toy data/, params.yaml with `train` overrides, and a private MLflow store."""
    data, raw = tokenized
    raw = json.loads(json.dumps(raw))
    raw["train"].update(train)
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = tool_env(root)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return root, env


def train_cmd() -> list[str]:
    return [sys.executable, "-m", "stages.train"]


def losses(ws: Path) -> list[str]:
    paths = list(ws.glob("checkpoints/*/losses.tsv"))
    assert len(paths) <= 1
    return paths[0].read_text().splitlines() if paths else []


def mlflow_history(ws: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the workspace's one MLflow run, in step order."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def final_hashes(output: str) -> dict[int, str]:
    lines = [line.split() for line in output.splitlines() if "final parameters sha256" in line]
    return {int(w[2]): w[-1] for w in lines}


def test_the_batch_feed_runs_on_across_epochs_and_prefetching_changes_nothing(tokenized) -> None:
    """The loop's batches: epoch after epoch from a checkpoint's position, the same whether collated in the
    loop (CPU) or ahead by the prefetch thread (GPU)."""
    import stages.train as train_stage
    from seq2seq.data import Prefetched, collate

    data_dir, raw = tokenized
    params = parse_params(raw)
    procs = train_stage.setup_processes(params.train)
    data = train_stage.load_data(params, data_dir / "tokenized", procs)
    epochs = [data.batches(e, params.train, procs) for e in (0, 1, 2)]
    n0, n1 = len(epochs[0]), len(epochs[1])
    start = n0 - 3  # resume three batches before the end of epoch 0
    expected = [(0, i + 1, epochs[0][i]) for i in range(start, n0)]
    expected += [(1, i + 1, epochs[1][i]) for i in range(n1)] + [(2, 1, epochs[2][0])]

    for feed in (
        data.stream(0, start, params.train, procs, pin=False),
        Prefetched(data.stream(0, start, params.train, procs, pin=False), depth=4),
    ):
        got = [next(feed) for _ in expected]
        feed.close()
        for (epoch, index, batch), (want_epoch, want_index, indices) in zip(got, expected, strict=True):
            assert (epoch, index) == (want_epoch, want_index)
            assert all(torch.equal(a, b) for a, b in zip(batch, collate(data.src, data.tgt, indices), strict=True))


RESUMABLE = {
    "max_steps": 400,
    "save_every": 25,
    "log_every": 5,
    "eval_every": 1000,
    "eval_bleu_sentences": 0,
    "grad_accum": 2,
    "keep_last": 2,
}


@pytest.mark.integration
def test_kill_9_then_resume_gives_the_same_losses_step_for_step(tmp_path: Path, tokenized) -> None:
    ws_a, env = workspace(tmp_path / "a", tokenized, **RESUMABLE)
    uninterrupted = subprocess.run(train_cmd(), cwd=ws_a, env=env, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    ws_b, env = workspace(tmp_path / "b", tokenized, **RESUMABLE)
    proc = subprocess.Popen(train_cmd(), cwd=ws_b, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # kill it between checkpoints (step 25 saved, steps up to 35 logged), so the resumed run redoes logged steps
    while not (list(ws_b.glob("checkpoints/*/step-*.pt")) and len(losses(ws_b)) > 36):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    killed_at = len(losses(ws_b)) - 1
    resumed = subprocess.run(train_cmd(), cwd=ws_b, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    assert killed_at < RESUMABLE["max_steps"]
    assert losses(ws_b) == losses(ws_a)  # step, loss, lr and tokens of all 400 steps, exactly
    assert len(losses(ws_a)) == RESUMABLE["max_steps"] + 1
    assert final_hashes(resumed.stdout) == final_hashes(uninterrupted.stdout)
    assert len(list(ws_b.glob("checkpoints/*/step-*.pt"))) == RESUMABLE["keep_last"]
    # the MLflow run continued: its loss curve is the uninterrupted one, without the redone steps twice
    assert mlflow_history(ws_b, "loss") == mlflow_history(ws_a, "loss")
    waits = [share for _, share in mlflow_history(ws_a, "data_wait_share")]  # the time spent getting batches
    assert len(waits) == RESUMABLE["max_steps"] // RESUMABLE["log_every"] and all(0 < w < 1 for w in waits)

    # a corrupt checkpoint stops the stage with a clear error instead of a silent fresh start
    (last,) = sorted(ws_b.glob("checkpoints/*/step-*.pt"))[-1:]
    last.write_bytes(last.read_bytes()[:1000])
    broken = subprocess.run(train_cmd(), cwd=ws_b, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0
    assert "corrupt or unreadable checkpoint" in broken.stderr and last.name in broken.stderr


@pytest.mark.integration
def test_ddp_two_cpu_processes(tmp_path: Path, tokenized) -> None:
    ws, env = workspace(tmp_path / "ddp", tokenized, max_steps=30, save_every=10, log_every=10, eval_every=30)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stages.train"]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hashes = final_hashes(proc.stdout)
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]  # DDP kept the replicas identical
    saves = [line for line in proc.stdout.splitlines() if "saved checkpoint" in line]
    assert saves and all(line.startswith("train: rank 0 ") for line in saves)
    assert len(saves) == 3
    assert json.loads((ws / "metrics/train.json").read_text())["world_size"] == 2
    assert (ws / "models/model.pt").is_file()


@pytest.mark.integration
def test_training_survives_the_mlflow_server_going_away(tmp_path: Path, tokenized) -> None:
    port = free_port()
    ws, env = workspace(
        tmp_path / "ws", tokenized, max_steps=800, save_every=400, log_every=10, eval_every=1000, eval_bleu_sentences=0
    )
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{port}"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    procs = Processes(tmp_path / "logs")
    trainer = None
    try:
        server_cmd = mlflow_server_cmd(str(Path(sys.executable).parent / "mlflow"), tmp_path, port)
        server = procs.start("mlflow", server_cmd, tmp_path, env)
        procs.wait_ready("mlflow", server, f"http://127.0.0.1:{port}/health")

        trainer = subprocess.Popen(
            train_cmd(), cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for line in trainer.stdout:  # wait until the run logs metrics, then pull the plug
            if line.startswith("step 50 "):
                break
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _, err = trainer.communicate(timeout=300)
    finally:
        procs.stop_all()
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()

    assert trainer.returncode == 0, err
    assert "WARNING: MLflow" in err
    assert json.loads((ws / "metrics/train.json").read_text())["steps"] == 800
    assert (ws / "models/model.pt").is_file()
    assert json.loads((ws / "models/train_run.json").read_text())["run_id"]
    assert list(ws.glob("checkpoints/*/step-00000800.pt"))


@pytest.mark.integration
def test_training_starts_while_mlflow_is_down_and_every_step_reaches_it_once_it_is_back(
    tmp_path: Path, tokenized
) -> None:
    """MLflow is down when training starts and comes up mid-run: training does not wait, and the run gets
    every logged step exactly once, from the journal. (The trainer is paused while the server starts, which
    takes longer than this whole toy run.)"""
    port = free_port()
    steps = {"max_steps": 600, "save_every": 200, "log_every": 10, "eval_every": 200, "eval_bleu_sentences": 0}
    ws, env = workspace(tmp_path / "ws", tokenized, **steps)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{port}"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env.update(MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    procs = Processes(tmp_path / "logs")
    try:
        trainer = procs.start("train", train_cmd(), ws, env)
        deadline = time.monotonic() + 120
        while len(losses(ws)) < 50:  # training runs without MLflow
            assert trainer.poll() is None, procs.log("train")
            assert time.monotonic() < deadline, procs.log("train")
            time.sleep(0.2)
        os.kill(trainer.pid, signal.SIGSTOP)
        mlflow_cmd = mlflow_server_cmd(str(Path(sys.executable).parent / "mlflow"), tmp_path, port)
        server = procs.start("mlflow", mlflow_cmd, tmp_path, env)
        procs.wait_ready("mlflow", server, f"http://127.0.0.1:{port}/health")
        os.kill(trainer.pid, signal.SIGCONT)
        assert trainer.wait(300) == 0, procs.log("train")
        log = procs.log("train")
        assert "is not answering" in log and "training goes on" in log
        assert "Traceback" not in log

        run_id = json.loads((ws / "models/train_run.json").read_text())["run_id"]
        client = mlflow.MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
        history = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert history == list(range(10, 601, 10))  # every logged step, none twice
        assert sorted(m.step for m in client.get_metric_history(run_id, "dev_loss")) == [200, 400, 600]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "600"
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/model.pt"}
        [journal] = ws.glob("checkpoints/*/metrics.jsonl")  # the local record they came from
        assert [json.loads(line)["step"] for line in journal.read_text().splitlines()].count(600) >= 1
    finally:
        procs.stop_all()
