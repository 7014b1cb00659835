"""The test servers' watchdog (`tests/reaper.py`): a test process that dies without its finalizers leaves no
server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.reaper import alive, stop

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0

# A "server" that starts a child of its own (as Prefect's and MLflow's servers do), both in the server's group.
SLEEPER = "import time; time.sleep(600)"
SERVER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(600)"

# A test process: it starts the server through Processes, says the server's and the watchdog's pids, then waits.
TEST_PROCESS = f"""
import sys, time
from pathlib import Path
from tests import servers
procs = servers.Processes(Path(sys.argv[1]))
proc = procs.start("server", [sys.executable, "-c", {SERVER!r}], Path(sys.argv[1]), {{}})
print(proc.pid, servers._reaper.pid, flush=True)
time.sleep(600)
"""


def wait_until(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < end, f"{what} after {DEADLINE_S:.0f}s"
        time.sleep(0.2)


def group_size(pgid: int) -> int:
    """How many processes are in group `pgid` (from /proc)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        count += int(fields[2]) == pgid  # fields after the command: state, ppid, pgrp, ...
    return count


def test_a_test_process_killed_with_sigkill_leaves_no_server(tmp_path: Path) -> None:
    test_process = subprocess.Popen(
        [sys.executable, "-c", TEST_PROCESS, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        server, reaper = map(int, test_process.stdout.readline().split())
        wait_until(lambda: group_size(server) == 2, "the server and its child are not both running")
    finally:
        test_process.kill()  # no finalizer runs: only the watchdog can stop the server now
        test_process.wait()
    wait_until(lambda: not alive(server), "the server's group is still running")
    wait_until(lambda: not Path(f"/proc/{reaper}").exists(), "the watchdog did not exit")


def test_a_group_that_ignores_sigint_is_killed_after_the_grace_period() -> None:
    ignores = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", ignores], start_new_session=True)
    try:
        wait_until(lambda: _ignores_sigint(proc.pid), "the process did not set SIGINT to be ignored")
        start = time.monotonic()
        stop({proc.pid}, grace=1.0)
        assert proc.wait(DEADLINE_S) == -signal.SIGKILL
        assert time.monotonic() - start >= 1.0  # SIGINT first, and the grace period waited out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _ignores_sigint(pid: int) -> bool:
    """Whether the process has set SIGINT to be ignored yet (its SigIgn mask in /proc)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
