"""Real servers for the tests (Prefect, MLflow, moto): free ports on 127.0.0.1, one readiness deadline, clean stops.

Every server a test starts waits on readiness with the same generous deadline, `SERVER_DEADLINE` seconds
(env NMT_TEST_SERVER_DEADLINE, default 300): a 2-core machine without AVX-512, busy with the rest of the
suite, can need minutes where ours needs seconds. Only after that does a test fail, naming the server and
showing the end of its log. Prefect's ephemeral server (no PREFECT_API_URL) gets the same deadline through
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (see `prefect_fixtures.prefect_env`).

Every process started here runs in its own process group and is stopped (SIGINT, then SIGKILL after a
grace period) by `Processes.stop`, which the fixtures call in a `finally`. Where the test process dies without
running its finalizers (SIGKILL, SIGTERM), a watchdog (`tests/reaper.py`) stops the groups it left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.reaper import GRACE_S

SERVER_DEADLINE = float(os.environ.get("NMT_TEST_SERVER_DEADLINE", "300"))
REAPER = Path(__file__).with_name("reaper.py")
_reaper: subprocess.Popen | None = None  # this test process's watchdog, started with its first server


def reaper_says(line: str) -> None:
    """Tell the watchdog that a process group started ("+PGID") or was stopped ("-PGID")."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        # Its own session: a Ctrl-C or a signal to the tests' process group does not reach it.
        _reaper = subprocess.Popen([sys.executable, str(REAPER)], stdin=subprocess.PIPE, start_new_session=True)
    _reaper.stdin.write(f"{line}\n".encode())
    _reaper.stdin.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, proc: subprocess.Popen | None = None, log: Path | None = None, deadline: float = SERVER_DEADLINE
) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits, or after `deadline` seconds, showing its log."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: {proc.args[0]} exited ({proc.returncode}) before it was ready:\n{tail(log)}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"{url}: not ready after {deadline:.0f}s (raise NMT_TEST_SERVER_DEADLINE on a slow machine):\n{tail(log)}"
    )


def tail(log: Path | None, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.exists() else ""


@dataclass
class Processes:
    """Background processes, each in its own session (process group), with their logs in files."""

    logs: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        reaper_says(f"+{proc.pid}")
        self.procs.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, name: str, proc: subprocess.Popen, url: str) -> None:
        wait_http(url, proc, self.log_path(name))

    def stop(self, proc: subprocess.Popen, grace: float = GRACE_S) -> None:
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(grace)
        # the group may still hold children (flow-run processes, server workers) after the leader exits
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reaper_says(f"-{proc.pid}")
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def mlflow_server_cmd(
    mlflow: str, root: Path, port: int, backend_store_uri: str | None = None, artifacts_destination: str | None = None
) -> list[str]:
    """`mlflow server`, one worker (~0.7 GB instead of ~2 GB); by default SQLite and local artifacts under `root`."""
    return [
        *(mlflow, "server", "--backend-store-uri", backend_store_uri or f"sqlite:///{root}/mlflow.db"),
        *("--artifacts-destination", artifacts_destination or str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
