"""Progress of a long loop on stderr: a rich bar on a terminal, plain log lines otherwise (CI, files, DVC).

    with Progress("clean", total=n_pairs, unit="pairs") as progress:
        for chunk in chunks:
            ...
            progress.advance(len(chunk))

Without a terminal, a line is printed each time another ~10% is done, or on every advance when the total
is not known (callers advance per chunk, so that stays a few lines). stdout is left alone: it may be the
data stream (nmt-translate writes translations there).
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None, unit: str = "", completed: int = 0, plain: bool = True):
        """`plain=False`: no lines without a terminal (for a caller that logs its own, as training does)."""
        self.label, self.total, self.unit, self.done = label, total, unit, completed
        self.plain, self.started = plain, time.perf_counter()
        self.next_tenth = self._tenths(completed) + 1
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{unit} {{task.fields[status]}}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                redirect_stdout=sys.stdout.isatty(),  # print() lines then show above the bar, unless stdout is data
                redirect_stderr=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=completed, status="")
            self.bar.start()

    def _tenths(self, done: int) -> int:
        return 10 * done // self.total if self.total else 0

    def update(self, completed: int, status: str = "") -> None:
        """Set how much is done (and a short status shown beside the bar)."""
        self.done = completed
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, status=status)
        elif self.plain and (not self.total or self._tenths(completed) >= self.next_tenth):
            self.next_tenth = self._tenths(completed) + 1
            share = f"{100 * completed // self.total}% ({completed}/{self.total} {self.unit})" if self.total else ""
            done = share or f"{completed} {self.unit}"
            print(
                f"{self.label}: {done} in {time.perf_counter() - self.started:.0f}s {status}".rstrip(), file=sys.stderr
            )

    def advance(self, n: int = 1, status: str = "") -> None:
        self.update(self.done + n, status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
