"""Stops the servers that a test process leaves running when it dies without its finalizers.

`tests.servers.Processes` starts every server in a process group of its own (so that a test can stop a server
and its children together), which also means the servers outlive a test process killed by SIGKILL, by SIGTERM
(Python runs no finalizers then) or by a deleted checkout. This watchdog closes that gap. The test process
starts it once, with a pipe as its standard input, and writes a line per server: "+PGID" when the server
starts, "-PGID" once `Processes.stop` has stopped it. When the pipe ends (the test process is gone, however
it died: the kernel closes its end) every group still listed is stopped as `Processes.stop` would: SIGINT,
then SIGKILL after a grace period.

    python tests/reaper.py        # run by tests/servers.py, not by hand
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

GRACE_S = 10.0


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(groups: set[int], grace: float = GRACE_S) -> None:
    """SIGINT to every group, then SIGKILL to those still alive after `grace` seconds."""
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)
    end = time.monotonic() + grace
    while any(alive(pgid) for pgid in groups) and time.monotonic() < end:
        time.sleep(0.2)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        sign, pgid = line[0], int(line[1:])
        if sign == "+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    stop(groups)


if __name__ == "__main__":
    main()
