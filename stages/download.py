"""download: fetch every dataset the run names and write it as aligned plain text.

For each dataset in data.train + data.dev + data.test this writes `<out_dir>/<name>.<lang>` for the
source and target language (UTF-8, one segment per line, every line newline-terminated) and
`<out_dir>/manifest.json` (per output file: lines, bytes, sha256, origin). Downloads are cached in
`<cache_dir>` and checked against download.checksums (size, sha256, md5). A file with no published checksum
gets its size and sha256 recorded when its download completes, and a cached file is reused only when it
still matches what is known of it, never on trust. An interrupted download resumes with HTTP Range plus
If-Range (the ETag or Last-Modified of the response that started it), so bytes of a file that changed
upstream are never spliced onto the old ones: the server then sends the whole new file. A mirror
(download.mirror, or env NMT_MIRROR) replaces the upstream URLs entirely: machines that use one have
no internet, so a file missing from the mirror is an error rather than a reason to go upstream.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import html
import io
import itertools
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit
from urllib.request import url2pathname

import requests

from seq2seq import cli, paths
from seq2seq.config import MIRROR_ENV, Checksum, DatasetSource, DownloadParams, Params, ParamsError, load_params
from seq2seq.progress import Progress
from seq2seq.redact import redact
from seq2seq.textio import TextFormatError, atomic_write, file_sha256, write_json

log = logging.getLogger("download")

CHUNK_BYTES = 1 << 16  # a transfer cut short loses the chunk being read: keep chunks small
HASH_CHUNK_BYTES = 1 << 20
LINES_PER_WRITE = 10_000
RETRY_STATUS = {408, 429}  # 4xx codes that mean "try again later", unlike 404 or 403
LOG_STEPS_ABOVE_BYTES = 64 << 20  # without a terminal, log every 10% only for transfers this large


class DownloadError(RuntimeError):
    """A file could not be fetched, found, verified or extracted; the message names it."""


class NotFoundError(DownloadError):
    """The server or the mirror has no such file."""


class _TransientError(Exception):
    """A failure worth retrying: 5xx, a connection cut short."""


def download(params: Params, out_dir: Path = paths.RAW, cache_dir: Path = paths.DOWNLOADS) -> dict[str, dict[str, Any]]:
    """Write `<out_dir>/<dataset>.<lang>` for every dataset of the run plus manifest.json; return the manifest."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    langs = params.data.langs
    names = list(dict.fromkeys([*params.data.train, params.data.dev, *params.data.test]))
    manifest: dict[str, dict[str, Any]] = {}
    with _Fetcher(params.download, cache_dir, langs) as fetcher, contextlib.ExitStack() as outputs:
        # Every output stays a temp file until all datasets are done, so an error leaves out_dir as it was.
        for name in names:
            sinks = {
                lang: _Sink(outputs.enter_context(atomic_write(out_dir / f"{name}.{lang}", "wb"))) for lang in langs
            }
            try:
                parts = fetcher.locate(params.source_for(name), langs)
                _extract(parts, sinks, _Limits.of(params.download))
            except DownloadError as err:
                raise type(err)(f"dataset {name!r} ({params.data.pair}): {err}") from None
            _check_aligned(name, out_dir, parts, sinks)
            for lang in langs:
                manifest[f"{name}.{lang}"] = sinks[lang].summary(parts[lang])
            log.info("%s: %d lines per side", name, sinks[langs[0]].lines)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass(frozen=True)
class _Part:
    """Where one language side of a dataset lies locally: a whole file, or a member of an archive file."""

    path: Path
    origin: str  # the URL or mirror path it came from
    member: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


def _check_aligned(name: str, out_dir: Path, parts: dict[str, _Part], sinks: dict[str, _Sink]) -> None:
    """Raise naming the dataset and both files unless both sides have the same number of lines."""
    (a, sa), (b, sb) = sinks.items()
    if sa.lines != sb.lines:
        raise TextFormatError(
            f"dataset {name!r} is misaligned: {parts[a].label} has {sa.lines} lines but {parts[b].label} has "
            f"{sb.lines} (outputs {out_dir / f'{name}.{a}'} and {out_dir / f'{name}.{b}'} not written)"
        )


# --- Bringing files to local paths: mirror, cache, HTTP -----------------------------------------------


class _Fetcher:
    """Brings each file a dataset needs to a local path: from the mirror when one is set, else upstream."""

    def __init__(self, params: DownloadParams, cache_dir: Path, langs: tuple[str, str]):
        self.params = params
        self.cache_dir = cache_dir
        self.pair_dirs = {f"{langs[0]}-{langs[1]}", f"{langs[1]}-{langs[0]}"}
        self.session = requests.Session()
        self.mirror = params.effective_mirror()
        self.mirror_url: str | None = None  # http(s) base URL
        self.mirror_dir: Path | None = None  # local directory
        self.mirror_recursive = True  # a file:// base URL means exactly <dir>/<name>, like an http one
        self._mirror_files: dict[str, list[Path]] | None = None
        if self.mirror is not None:
            self._parse_mirror(self.mirror)

    def __enter__(self) -> _Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def _parse_mirror(self, mirror: str) -> None:
        where = f"${MIRROR_ENV}" if os.environ.get(MIRROR_ENV) else "download.mirror"
        parts = urlsplit(mirror)
        if parts.scheme in ("http", "https"):
            self.mirror_url = mirror.rstrip("/")
        else:
            if parts.scheme == "file":
                self.mirror_dir, self.mirror_recursive = Path(url2pathname(parts.path)), False
            else:
                self.mirror_dir = Path(mirror)
            if not self.mirror_dir.is_dir():
                raise DownloadError(
                    f"mirror {redact(mirror)!r} (from {where}) is neither an http(s) URL nor a directory"
                )
        log.info("using the mirror %s (from %s); nothing is fetched upstream", redact(mirror), where)

    def locate(self, source: DatasetSource, langs: tuple[str, str]) -> dict[str, _Part]:
        """Local paths of both sides of one dataset, downloading (or finding in the mirror) as needed."""
        if self.mirror is None:
            if source.archive is None:
                return {lang: self._fetch(source.files[lang]) for lang in langs}
            archive = self._fetch(source.archive)
            return {lang: replace(archive, member=source.files[lang]) for lang in langs}
        if source.archive is not None:
            try:
                archive = self._from_mirror(_url_basename(source.archive))
            except NotFoundError:
                pass  # a mirror may hold the already-extracted files instead: look for those below
            else:
                return {lang: replace(archive, member=source.files[lang]) for lang in langs}
        # archive members are paths inside the archive, not URLs: no unquoting
        basename = posixpath.basename if source.archive is not None else _url_basename
        try:
            return {lang: self._from_mirror(basename(source.files[lang])) for lang in langs}
        except NotFoundError as err:
            also = f" (nor the archive {_url_basename(source.archive)!r})" if source.archive else ""
            raise NotFoundError(f"{err}{also}; with a mirror set nothing is fetched upstream") from None

    def _from_mirror(self, name: str) -> _Part:
        if self.mirror_url is not None:
            return self._fetch(f"{self.mirror_url}/{quote(name)}")
        assert self.mirror_dir is not None
        if self.mirror_recursive:
            candidates = self._mirror_index().get(name, [])
        else:
            candidates = [p] if (p := self.mirror_dir / name).is_file() else []
        if not candidates:
            raise NotFoundError(f"mirror {self.mirror} has no file named {name!r}")
        path = self._pick(name, candidates)
        problem = _checksum_problem(path, self.params.checksums.get(name))
        if problem:
            raise DownloadError(f"mirror file {path} fails its checksum (download.checksums.{name}): {problem}")
        return _Part(path, str(path))

    def _mirror_index(self) -> dict[str, list[Path]]:
        if self._mirror_files is None:
            assert self.mirror_dir is not None
            self._mirror_files = {}
            for root, dirs, files in os.walk(self.mirror_dir):
                dirs.sort()
                for f in sorted(files):
                    self._mirror_files.setdefault(f, []).append(Path(root) / f)
        return self._mirror_files

    def _pick(self, name: str, candidates: list[Path]) -> Path:
        """One of several mirror files named `name`: any if all are identical, else the one in a pair-named dir."""
        preferred = [p for p in candidates if p.parent.name in self.pair_dirs]
        if _same_content(candidates):
            return (preferred or candidates)[0]
        if preferred and _same_content(preferred):
            return preferred[0]
        listing = "\n  ".join(str(p) for p in candidates)
        raise DownloadError(
            f"mirror {self.mirror} has {len(candidates)} different files named {name!r} and no single one in a "
            f"directory named {' or '.join(sorted(self.pair_dirs))}:\n  {listing}"
        )

    def _fetch(self, url: str) -> _Part:
        """A local copy of `url`: the file itself for file://, else a verified file in the download cache."""
        scheme = urlsplit(url).scheme
        name = _url_basename(url)
        expected = self.params.checksums.get(name)
        if scheme == "file":
            path = Path(url2pathname(urlsplit(url).path))
            if not path.is_file():
                raise NotFoundError(f"{url}: no such file")
            if problem := _checksum_problem(path, expected):
                raise DownloadError(f"{url} fails its checksum (download.checksums.{name}): {problem}")
            return _Part(path, url)
        if scheme not in ("http", "https"):
            raise DownloadError(f"{url}: unsupported URL scheme {scheme!r} (use http, https or file)")

        dest = self.cache_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._forget_other_source(dest, url)
        if dest.exists() and self._cached_ok(dest, name):
            log.info("%s: using the cached %s", url, dest)
            return _Part(dest, url)
        dest.unlink(missing_ok=True)
        for attempt in (1, 2):  # a bad checksum is refetched once: a corrupt transfer is possible, twice unlikely
            self._download(url, dest)
            if expected is None:
                self._remember_checksum(dest, name)
                return _Part(dest, url)
            problem = _checksum_problem(dest, expected)
            if problem is None:
                return _Part(dest, url)
            dest.unlink()
            if attempt == 1:
                log.warning("%s: checksum mismatch (%s); fetching it once more", url, problem)
        raise DownloadError(f"{url}: checksum mismatch (download.checksums.{name}) after refetching: {problem}")

    def _cached_ok(self, dest: Path, name: str) -> bool:
        """Whether a cached download matches its published checksum or, lacking one, the size and sha256
        recorded when it was downloaded; a file with neither is not reused."""
        known = self.params.checksums.get(name)
        what = f"download.checksums.{name}"
        if known is None:
            record = _CacheRecord.read(_record_path(dest))
            known, what = (record.checksum(), "the size and sha256 recorded at download") if record else (None, "")
        if known is None:
            log.warning("%s: nothing to check the cached file against; fetching it again", dest)
            return False
        problem = _checksum_problem(dest, known)
        if problem is not None:
            log.warning("%s: the cached file does not match %s (%s); fetching it again", dest, what, problem)
        return problem is None

    def _remember_checksum(self, dest: Path, name: str) -> None:
        """Record the size and sha256 of a download that has no published checksum, to check it on reuse."""
        record = _CacheRecord.read(_record_path(dest)) or _CacheRecord(url="")
        record.size, record.sha256 = dest.stat().st_size, file_sha256(dest)
        record.write(_record_path(dest))
        log.info(
            "%s: no published checksum (download.checksums.%s); recorded size %d and sha256 %s, checked on reuse",
            dest,
            name,
            record.size,
            record.sha256,
        )

    def _forget_other_source(self, dest: Path, url: str) -> None:
        """Drop cached bytes that came from another URL of the same file name (a `<name>.url` file records it)."""
        path = _record_path(dest)
        record = _CacheRecord.read(path)
        if path.exists() and (record is None or record.url != url):
            log.info("%s: the cached copy came from another URL; fetching it again", dest)
            for stale in (dest, _part_path(dest), path):
                stale.unlink(missing_ok=True)

    def _download(self, url: str, dest: Path) -> None:
        """Fetch `url` to `dest` through `<dest>.part`, resuming it with Range and retrying transient failures."""
        part = _part_path(dest)
        failures = 0
        while True:
            before = _size(part)
            try:
                self._transfer(url, dest)
                break
            except (
                _TransientError,
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                # A try that moved the download forward resets the count: resuming makes it progress, not a loop.
                failures = 1 if _size(part) > before else failures + 1
                if failures > self.params.retries:
                    raise DownloadError(f"{url}: failed after {failures} tries in a row: {err}") from None
                delay = self.params.backoff_seconds * 2 ** (failures - 1)
                log.warning("%s: %s; retry %d of %d in %.1f s", url, err, failures, self.params.retries, delay)
                time.sleep(delay)
            except requests.RequestException as err:
                raise DownloadError(f"{url}: {err}") from None
        os.replace(part, dest)

    def _transfer(self, url: str, dest: Path) -> None:
        """One GET of `url` into `<dest>.part`: append on 206 Partial Content, start over on 200.

        A resumed request carries If-Range with the validator of the response that began the file, so a server
        whose file has changed since answers 200 with all of the new one instead of the rest of it.
        """
        part, record_path = _part_path(dest), _record_path(dest)
        offset = _size(part)
        record = _CacheRecord.read(record_path)
        headers = {"Accept-Encoding": "identity"}  # byte ranges and checksums refer to the file as stored
        if offset:
            validator = record.validator() if record is not None else None
            if validator is None:
                log.warning("%s: no ETag or Last-Modified for the partial download; starting over", url)
                part.unlink()
                offset = 0
            else:
                headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
        timeout = self.params.timeout_seconds
        with self.session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as r:
            status = r.status_code
            if offset and (status == 416 or (status == 206 and not _resumes(r, offset, record))):
                log.warning("%s: the server can't resume at byte %d (HTTP %d); starting over", url, offset, status)
                part.unlink()
                self._transfer(url, dest)
                return
            if status in (404, 410):
                raise NotFoundError(f"{url}: HTTP {status} {r.reason} (no such file)")
            if status >= 500 or status in RETRY_STATUS:
                raise _TransientError(f"HTTP {status} {r.reason}")
            if status not in (200, 206):
                raise DownloadError(f"{url}: HTTP {status} {r.reason}")
            if offset and status == 200:
                log.info("%s: the file changed upstream, or the server ignores Range; starting over", url)
                offset = 0
            if status == 200:
                # written before any byte, so a later run knows where a leftover .part came from and how to resume it
                _CacheRecord.of_response(url, r).write(record_path)
            length = r.headers.get("Content-Length", "")
            expect = int(length) if length.isdigit() else None
            log.info("%s: fetching%s", url, f" from byte {offset}" if offset else "")
            received = 0
            total = None if expect is None else offset + expect
            with (
                part.open("ab" if offset else "wb") as f,
                Progress(_url_basename(url), total, "bytes", offset, plain=(total or 0) > LOG_STEPS_ABOVE_BYTES) as bar,
            ):
                for chunk in r.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.advance(len(chunk))
            if expect is not None and received < expect:
                raise _TransientError(f"connection closed after {received} of {expect} bytes")


@dataclass
class _CacheRecord:
    """`<name>.url` beside a cached download: the URL its bytes came from, the validators (ETag, Last-Modified)
    of the response that began them, and, for a file with no published checksum, its size and sha256 once
    complete."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def of_response(cls, url: str, r: requests.Response) -> _CacheRecord:
        return cls(url, r.headers.get("ETag"), r.headers.get("Last-Modified"))

    @classmethod
    def read(cls, path: Path) -> _CacheRecord | None:
        """The record, or None if there is none; a record from before these were JSON holds just the URL."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError):
            return cls(url=text.strip())

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    def validator(self) -> str | None:
        """What If-Range may carry: a strong ETag, else Last-Modified (RFC 9110 section 13.1.5)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def checksum(self) -> Checksum | None:
        return Checksum(size=self.size, sha256=self.sha256) if self.sha256 else None


def _resumes(r: requests.Response, offset: int, record: _CacheRecord | None) -> bool:
    """Whether a 206 answer continues our partial file: it starts at `offset`, and is of the same version."""
    etag = r.headers.get("ETag")
    same_version = not (etag and record is not None and record.etag and etag != record.etag)
    return _range_start(r) == offset and same_version


def _url_path(url: str) -> str:
    return unquote(urlsplit(url).path)


def _url_basename(url: str) -> str:
    name = posixpath.basename(_url_path(url))
    if not name:
        raise DownloadError(f"{url}: the URL names no file")
    return name


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _record_path(dest: Path) -> Path:
    """The file recording which URL a cached download (and its .part) came from."""
    return dest.with_name(dest.name + ".url")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _range_start(r: requests.Response) -> int | None:
    m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _digests(path: Path, names: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of the file, one pass for all the hashlib algorithms named."""
    hashes = {name: hashlib.new(name) for name in names}
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _same_content(paths: list[Path]) -> bool:
    if len({p.stat().st_size for p in paths}) > 1:
        return False
    return len({file_sha256(p) for p in paths}) == 1


def _checksum_problem(path: Path, expected: Checksum | None) -> str | None:
    """None when `path` matches the known size, sha256 and md5 (or none is known), else "expected ... got ..."."""
    if expected is None:
        return None
    want = {"size": expected.size, "sha256": expected.sha256, "md5": expected.md5}
    digests = [k for k in ("sha256", "md5") if want[k] is not None]
    got: dict[str, Any] = {"size": path.stat().st_size, **_digests(path, digests)}
    keys = [k for k, v in want.items() if v is not None]
    if all(str(want[k]).lower() == str(got[k]) for k in keys):
        return None
    return f"expected {', '.join(f'{k} {want[k]}' for k in keys)}; got {', '.join(f'{k} {got[k]}' for k in keys)}"


# --- Reading files and archive members as lines --------------------------------------------------------


class _Sink:
    """An output file being written: counts its lines and bytes and hashes them on the way."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.digest = hashlib.sha256()
        self.lines = 0
        self.bytes = 0

    def write_lines(self, lines: Iterable[bytes]) -> None:
        batch: list[bytes] = []
        for line in lines:
            batch.append(line)
            if len(batch) == LINES_PER_WRITE:
                self._write(batch)
                batch = []
        self._write(batch)

    def _write(self, batch: list[bytes]) -> None:
        if batch:
            data = b"\n".join(batch) + b"\n"
            self.f.write(data)
            self.digest.update(data)
            self.lines += len(batch)
            self.bytes += len(data)

    def summary(self, part: _Part) -> dict[str, Any]:
        entry: dict[str, Any] = {"lines": self.lines, "bytes": self.bytes, "sha256": self.digest.hexdigest()}
        entry["origin"] = part.origin
        if part.member is not None:
            entry["member"] = part.member
        return entry


@dataclass(frozen=True)
class _Limits:
    """Upper bounds on what extraction reads (download.max_member_bytes, download.max_line_bytes)."""

    member_bytes: int
    line_bytes: int

    @classmethod
    def of(cls, p: DownloadParams) -> _Limits:
        return cls(p.max_member_bytes, p.max_line_bytes)


def _extract(parts: dict[str, _Part], sinks: dict[str, _Sink], limits: _Limits) -> None:
    """Write each side's lines to its sink, reading each archive once for all the members it holds."""
    members: dict[Path, dict[str, str]] = {}
    for lang, part in parts.items():
        if part.member is None:
            with _reading(part.path) as f:
                sinks[lang].write_lines(_lines(f, part.path.name, part.label, limits))
        else:
            members.setdefault(part.path, {})[posixpath.normpath(part.member)] = lang
    for archive, wanted in members.items():
        _extract_members(archive, wanted, sinks, limits)


def _extract_members(archive: Path, wanted: dict[str, str], sinks: dict[str, _Sink], limits: _Limits) -> None:
    """Stream once through `archive` (no seeking: it may be gigabytes of gzip), writing each wanted member."""
    remaining = dict(wanted)
    seen: list[str] = []
    try:
        with _reading(archive) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                name = posixpath.normpath(info.name)
                if not info.isfile():
                    continue
                seen.append(name)
                lang = remaining.pop(name, None)
                if lang is None:
                    continue
                member = tar.extractfile(info)
                assert member is not None  # a regular file always has a data stream
                sinks[lang].write_lines(_lines(member, name, f"{archive}:{name}", limits))
                if not remaining:
                    break
    except tarfile.TarError as err:
        raise DownloadError(f"{archive}: not a readable tar archive ({err})") from None
    if remaining:
        some = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
        raise DownloadError(
            f"archive {archive} has no member {', '.join(map(repr, sorted(remaining)))} "
            f"(it has {len(seen)} files: {some or 'none'})"
        )


class _Counted(io.RawIOBase):
    """A binary file that reports every byte read from it to a progress bar."""

    def __init__(self, f: IO[bytes], progress: Progress):
        self.f, self.progress = f, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.f.readinto(buffer) or 0  # type: ignore[attr-defined]
        self.progress.advance(n)
        return n


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[IO[bytes]]:
    """Open a local file or archive to read it once through, with progress in bytes (a line per 10% without a
    terminal, for large files only)."""
    size = path.stat().st_size
    with (
        path.open("rb", buffering=0) as raw,
        Progress(f"extract {path.name}", size, "bytes", plain=size > LOG_STEPS_ABOVE_BYTES) as progress,
    ):
        yield io.BufferedReader(_Counted(raw, progress), HASH_CHUNK_BYTES)  # type: ignore[arg-type]


def _lines(stream: IO[bytes], name: str, label: str, limits: _Limits) -> Iterator[bytes]:
    """Lines of a plain, .gz or .sgm file (decided by `name`) as UTF-8 bytes without their newline."""
    try:
        if name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
            name = name.removesuffix(".gz")
        if name.endswith(".sgm"):
            yield from _sgml_segments(stream, label, limits)
        else:
            yield from _checked_lines(stream, label, limits)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DownloadError(f"{label}: corrupt compressed data ({err})") from None


def _bounded_lines(stream: IO[bytes], label: str, limits: _Limits) -> Iterator[bytes]:
    """The raw lines of `stream`, refusing a line or a whole stream (decompressed) beyond `limits`: neither
    is ever held in memory beyond its bound."""
    total = 0
    for lineno in itertools.count(1):
        raw = stream.readline(limits.line_bytes + 1)
        if not raw:
            return
        total += len(raw)
        if len(raw.removesuffix(b"\n").removesuffix(b"\r")) > limits.line_bytes:
            raise TextFormatError(
                f"{label}:{lineno}: a line longer than {limits.line_bytes} bytes (download.max_line_bytes)"
            )
        if total > limits.member_bytes:
            raise DownloadError(
                f"{label}: more than {limits.member_bytes} bytes decompressed (download.max_member_bytes)"
            )
        yield raw


def _checked_lines(stream: IO[bytes], label: str, limits: _Limits) -> Iterator[bytes]:
    """Lines as bytes without "\\n" or "\\r\\n", after checking each is strict UTF-8 (errors name label:line)."""
    # Not textio.read_lines: that reads a path, and these bytes come from inside archives and gzip streams.
    for lineno, raw in enumerate(_bounded_lines(stream, label, limits), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TextFormatError(f"{label}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        yield raw.removesuffix(b"\n").removesuffix(b"\r")


_LINE_BREAK = re.compile(r"[\r\n]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _sgml_segments(stream: IO[bytes], label: str, limits: _Limits) -> Iterator[bytes]:
    """The text of each <seg> of a WMT SGML file, in order, with XML entities unescaped.

    One pass over the text with `str.find` (never a backtracking regex: an unclosed <seg> made that quadratic);
    an unclosed <seg> is an error naming its line.
    """
    text = "\n".join(line.decode("utf-8") for line in _checked_lines(stream, label, limits))
    lower = text.translate(_ASCII_LOWER)  # tags in any case, at the same offsets as in `text`
    found, at = False, 0
    while (start := lower.find("<seg", at)) >= 0:
        after = lower[start + 4 : start + 5]
        if after and not (after == ">" or after.isspace()):  # <segment ...>, not a <seg>
            at = start + 4
            continue
        open_end = lower.find(">", start)
        close = lower.find("</seg", open_end) if open_end >= 0 else -1
        close_end = lower.find(">", close) if close >= 0 else -1
        if close_end < 0:
            raise TextFormatError(f"{label}:{text.count(chr(10), 0, start) + 1}: a <seg> that is never closed")
        found, at = True, close_end + 1
        # one segment must stay one line, whatever an entity like &#10; decodes to
        yield _LINE_BREAK.sub(" ", html.unescape(text[open_end + 1 : close])).strip().encode("utf-8")
    if not found:
        raise TextFormatError(f"{label}: no <seg> elements; is it really a WMT .sgm file?")


# --- Entry point -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("download", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="download: %(message)s", stream=sys.stderr)
    try:
        download(load_params(args.params))
    except (ParamsError, DownloadError, TextFormatError) as err:
        cli.fail("download", err)


if __name__ == "__main__":
    main()
