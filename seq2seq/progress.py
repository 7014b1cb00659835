"""Progress of a long step on stderr: a rich bar on a terminal, a plain line every ~10% otherwise (CI, DVC, logs).

    with Progress("clean", total=n_pairs, unit="pairs") as progress:
        for chunk in chunks:
            ...
            progress.advance(len(chunk))

Without a terminal a line is printed each time another tenth is done, or every `PLAIN_EVERY_S` seconds when
the total is not known, and one when the step ends. unit="bytes" shows sizes in MB. stdout is left alone: it
may be the data stream (nmt-translate writes translations there).
"""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_EVERY_S = 30.0  # without a total, at most one plain line this often


class Progress:
    """One long step: advance() as work is done; close() (or leaving the `with`) when it ends."""

    def __init__(self, label: str, total: int | None, unit: str = "", completed: int = 0, plain: bool = True):
        """`plain=False`: no lines without a terminal (for small steps not worth a line, or a caller that logs its
        own, as training does)."""
        self.label, self.total, self.unit, self.done = label, total or None, unit, completed
        self.plain, self.started = plain, time.perf_counter()
        self.next_tenth = self._tenths(completed) + 1
        self.last_line = self.started
        self.bar: Any = None
        if sys.stderr.isatty():
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        counts = (DownloadColumn(), TransferSpeedColumn()) if self.unit == "bytes" else (MofNCompleteColumn(),)
        self.bar = RichProgress(
            TextColumn(self.label),
            BarColumn(),
            *counts,
            TextColumn(f"{'' if self.unit == 'bytes' else self.unit} {{task.fields[status]}}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            redirect_stdout=sys.stdout.isatty(),  # print() lines then show above the bar, unless stdout is data
            redirect_stderr=False,
        )
        self.task = self.bar.add_task(self.label, total=self.total, completed=self.done, status="")
        self.bar.start()

    def _tenths(self, done: int) -> int:
        return 10 * done // self.total if self.total else 0

    def _amount(self, n: int) -> str:
        if self.unit == "bytes":
            return f"{n / 1e6:,.1f} MB"
        return f"{n:,} {self.unit}" if self.unit or self.total else "running"

    def update(self, completed: int, status: str = "") -> None:
        """Set how much is done (and a short status shown beside it)."""
        self.done = completed
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, status=status)
            return
        if not self.plain:
            return
        now = time.perf_counter()
        if self.total and self._tenths(completed) >= self.next_tenth:
            self.next_tenth = self._tenths(completed) + 1
            self._line(f"{100 * completed // self.total}% ({self._amount(completed)} of {self._amount(self.total)})")
        elif not self.total and now - self.last_line >= PLAIN_EVERY_S:
            self._line(self._amount(completed), status)
            return
        else:
            return
        self.last_line = now

    def _line(self, done: str, status: str = "") -> None:
        elapsed = time.perf_counter() - self.started
        print(f"{self.label}: {done} in {elapsed:.0f}s {status}".rstrip(), file=sys.stderr, flush=True)
        self.last_line = time.perf_counter()

    def advance(self, n: int = 1, status: str = "") -> None:
        self.update(self.done + n, status)

    def close(self, finished: bool = True) -> None:
        """Stop the bar; without a terminal, say the step is done (unless the 100% line already did)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        elif finished and self.plain and (self.total is None or self.done < self.total):
            self._line("done" if self._amount(self.done) == "running" else f"done, {self._amount(self.done)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(finished=exc_type is None)
