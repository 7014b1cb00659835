"""Reading aligned text files with errors that name the file and line; atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class TextFormatError(ValueError):
    """A corpus file is misaligned or not valid UTF-8; the message names the file and line."""


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it; on error nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_lines(path: Path) -> Iterator[str]:
    """Yield lines without their newline, decoding strictly as UTF-8 (error names file:line)."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TextFormatError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            yield line.rstrip("\n").rstrip("\r")


def read_aligned(src: Path, tgt: Path) -> Iterator[tuple[str, str]]:
    """Yield (source, target) line pairs; raise naming both files if their line counts differ."""
    n = 0
    src_it, tgt_it = read_lines(src), read_lines(tgt)
    while True:
        s = next(src_it, None)
        t = next(tgt_it, None)
        if s is None and t is None:
            return
        if s is None or t is None:
            short, long_ = (src, tgt) if s is None else (tgt, src)
            raise TextFormatError(f"misaligned corpus: {short} ends after {n} lines but {long_} has a line {n + 1}")
        n += 1
        yield s, t


def count_lines(path: Path) -> int:
    """Number of lines, counting a last line without a newline."""
    n = 0
    last = b"\n"
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
