"""stages/download.py against a local HTTP server laid out like statmt.org's WMT'14 files (no internet)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import random
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from seq2seq.config import MIRROR_ENV, Params, parse_params
from seq2seq.textio import TextFormatError
from stages.download import DownloadError, NotFoundError, _Limits, _sgml_segments, download
from tests.pipeline_fixtures import committed_params, committed_params_text

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UPSTREAM = "https://www.statmt.org"
CUT = 150_000  # bytes after which the server cuts a transfer short

NC_EN = ["The economy grew by 2% in 2013.", "“Quoted” text — with dashes…", "Zürich & Genève"]
NC_FR = ["L'économie a progressé de 2 % en 2013.", "« Texte cité » — avec des tirets…", "Zurich et Genève"]
DEV_EN = ["Spectacular Wingsuit Jump Over Bogota", "Sportsman Jhonathan Florez jumped from a helicopter."]
DEV_FR = ["Spectaculaire saut en wingsuit au-dessus de Bogota", "Le sportif Jhonathan Florez a sauté d'un hélicoptère."]
TEST_EN = ["Gutach: Increased safety for pedestrians", 'They are "not even 100 metres apart" & more', "Spaces <kept>"]
TEST_FR = ["Gutach : plus de sécurité pour les piétons", "Ils sont à «\xa0100 mètres\xa0» & plus", "Espaces <gardés>"]
GIGA_EN = ["Giga line one", "Ligne deux? No: line two"]
GIGA_FR = ["Giga ligne un", "Ligne deux"]

SRC_SGM = """<srcset setid="newstest2014" srclang="any">
<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">
<p>
<seg id="1">Gutach: Increased safety for pedestrians</seg>
<seg id="2">They are &quot;not even 100 metres apart&quot; &amp; more</seg>
</p>
<seg id="3"> Spaces &lt;kept&gt; </seg>
</doc>
</srcset>
"""
REF_SGM = """<refset setid="newstest2014" srclang="any" trglang="fr">
<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">
<seg id="1">Gutach : plus de sécurité pour les piétons</seg>
<seg id="2">Ils sont à «&#160;100 mètres&#160;» &amp; plus</seg>
<seg id="3">Espaces &#x3C;gardés&#x3E;</seg>
</doc>
</refset>
"""


def _text(lines: list[str], end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode("utf-8")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if path.name.endswith((".tgz", ".gz")) else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_statmt(root: Path, nc_en: list[str] = NC_EN) -> None:
    """The WMT'14 files this repo's params.yaml names, in statmt.org's layout, with a few lines each."""
    _tar(
        root / "wmt14/training-parallel-nc-v9.tgz",
        {
            "training/news-commentary-v9.fr-en.en": _text(nc_en, end="\r\n"),  # CRLF: written back as LF
            "training/news-commentary-v9.fr-en.fr": _text(NC_FR)[:-1],  # no final newline, like Europarl
            "training/news-commentary-v9.de-en.de": b"nicht gewollt\n",
            # incompressible padding, so that a transfer cut at CUT bytes has already written whole chunks
            "training/padding.bin": random.Random(0).randbytes(4 * CUT),
        },
    )
    _tar(
        root / "wmt14/dev.tgz",
        {  # French before English: extraction must not depend on member order
            "dev/newstest2013.fr": _text(DEV_FR),
            "dev/newstest2013.de": b"nicht gewollt\n",
            "dev/newstest2013.en": _text(DEV_EN),
        },
    )
    _tar(
        root / "wmt14/test-full.tgz",
        {
            "test-full/newstest2014-fren-src.en.sgm": SRC_SGM.encode(),
            "test-full/newstest2014-fren-ref.fr.sgm": REF_SGM.encode(),
        },
    )
    _tar(
        root / "wmt10/training-giga-fren.tar",
        {
            "giga-fren.release2.fixed.en.gz": gzip.compress(_text(GIGA_EN)),
            "giga-fren.release2.fixed.fr.gz": gzip.compress(_text(GIGA_FR)),
        },
    )


# --- A local HTTP server with Range support and injectable faults ---------------------------------------


class Site:
    """What the test server serves (files under `root`), what it was asked, and the faults to inject.

    Every response carries a strong ETag (from the content) and Last-Modified; a Range request whose If-Range
    no longer matches the file gets all of it (200), as RFC 9110 says.
    """

    def __init__(self, root: Path):
        self.root = root
        self.base = ""
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.if_ranges: list[tuple[str, str | None]] = []  # (path, If-Range header)
        # path -> faults for its next requests, one per request: "500", "corrupt", "cut:N", "ignore-range",
        # "cut+change:N" (cut, then the file changes upstream: it becomes replacements[path]), "no-validators"
        # (cut at CUT, in a response without ETag or Last-Modified)
        self.faults: dict[str, list[str]] = {}
        self.replacements: dict[str, bytes] = {}

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def ranges(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        site = self.server.site
        path = self.path.lstrip("/")
        rng = self.headers.get("Range")
        site.requests.append((path, rng))
        site.if_ranges.append((path, self.headers.get("If-Range")))
        queued = site.faults.get(path)
        fault = queued.pop(0) if queued else ""
        if fault == "500":
            self.send_error(500)
            return
        file = site.root / path
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        last_modified = formatdate(file.stat().st_mtime, usegmt=True)
        if fault == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, other bytes: only sha256 can tell
        if self.headers.get("If-Range", etag) not in (etag, last_modified):
            rng = None  # the file changed since the client's copy began: it gets the whole new one
        start = 0
        if rng and fault != "ignore-range":
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if rng and fault != "ignore-range" else 200)
        if rng and fault != "ignore-range":
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if fault != "no-validators":
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
        self.end_headers()
        if fault.startswith(("cut:", "cut+change:")) or fault == "no-validators":
            body = body[: int(fault.split(":")[1]) if ":" in fault else CUT]  # HTTP/1.0 then closes: a short body
        self.wfile.write(body)
        if fault.startswith("cut+change:"):
            file.write_bytes(site.replacements[path])

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output quiet; Site.requests is the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, site: Site):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.site = site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A server on a free local port serving tmp_path/www, built like statmt.org."""
    site = Site(tmp_path / "www")
    build_statmt(site.root)
    server = _Server(site)
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield site
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def raw_params(site: Site, train: list[str], dev: str, test: list[str], **download: Any) -> dict[str, Any]:
    """The repo's params.yaml with its statmt URLs pointed at `site`, quick retries and no checksums."""
    text = committed_params_text().replace(UPSTREAM, site.base)
    raw = yaml.safe_load(text)
    raw["data"].update(src_lang="en", tgt_lang="fr", train=train, dev=dev, test=test)
    raw["download"].update(mirror=None, retries=2, backoff_seconds=0.01, timeout_seconds=5, checksums={})
    datasets = download.pop("datasets", {})
    raw["download"]["datasets"].update(datasets)
    raw["download"].update(download)
    return raw


def make_params(site: Site, train: list[str], dev: str, test: list[str], **download: Any) -> Params:
    return parse_params(raw_params(site, train, dev, test, **download))


def wmt(site: Site, **download: Any) -> Params:
    return make_params(site, ["news_commentary_v9"], "newstest2013", ["newstest2014"], **download)


def single(site: Site, name: str, **download: Any) -> Params:
    """Params whose train, dev and test are all the one dataset `name`."""
    return make_params(site, [name], name, [name], **download)


def checksum(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path} lacks a final newline"
    return text.split("\n")[:-1]


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


WMT_EXPECTED = {
    "news_commentary_v9.en": NC_EN,
    "news_commentary_v9.fr": NC_FR,
    "newstest2013.en": DEV_EN,
    "newstest2013.fr": DEV_FR,
    "newstest2014.en": TEST_EN,
    "newstest2014.fr": TEST_FR,
}


def assert_wmt_outputs(out: Path) -> None:
    for name, expected in WMT_EXPECTED.items():
        assert lines(out / name) == expected, name


# --- Extraction ----------------------------------------------------------------------------------------------


def test_statmt_archives_and_sgml_give_the_exact_lines(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    manifest = download(wmt(site), out, tmp_path / "dl")

    assert_wmt_outputs(out)
    assert files_in(out) == sorted([*WMT_EXPECTED, "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for name, entry in manifest.items():
        data = (out / name).read_bytes()
        assert entry["lines"] == len(WMT_EXPECTED[name])
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["newstest2014.fr"]["origin"] == site.url("wmt14/test-full.tgz")
    assert manifest["newstest2014.fr"]["member"] == "test-full/newstest2014-fren-ref.fr.sgm"
    assert len(site.requests) == 3  # one GET per archive


def test_gz_members_of_a_tar_and_gz_files_are_decompressed(site: Site, tmp_path: Path) -> None:
    _write(site.root / "extra/captions.en.gz", gzip.compress(_text(["A dog runs.", "Ein Café"])))
    _write(site.root / "extra/captions.fr.gz", gzip.compress(_text(["Un chien court.", "Un café"])))
    captions = {"en-fr": {"files": {"en": site.url("extra/captions.en.gz"), "fr": site.url("extra/captions.fr.gz")}}}
    params = make_params(site, ["giga_fren"], "captions", ["captions"], datasets={"captions": captions})

    download(params, tmp_path / "raw", tmp_path / "dl")

    assert lines(tmp_path / "raw/giga_fren.en") == GIGA_EN
    assert lines(tmp_path / "raw/giga_fren.fr") == GIGA_FR
    assert lines(tmp_path / "raw/captions.fr") == ["Un chien court.", "Un café"]


def test_a_missing_archive_member_names_archive_and_member(site: Site, tmp_path: Path) -> None:
    archive = site.url("wmt14/training-parallel-nc-v9.tgz")
    nc = {
        "en-fr": {"archive": archive, "files": {"en": "training/nope.en", "fr": "training/news-commentary-v9.fr-en.fr"}}
    }
    with pytest.raises(DownloadError, match=r"training-parallel-nc-v9\.tgz has no member 'training/nope\.en'"):
        download(single(site, "nc", datasets={"nc": nc}), tmp_path / "raw", tmp_path / "dl")
    assert files_in(tmp_path / "raw") == []


def test_misaligned_dataset_names_both_files(site: Site, tmp_path: Path) -> None:
    _write(site.root / "extra/uneven.en", _text(["one", "two", "three"]))
    _write(site.root / "extra/uneven.fr", _text(["un", "deux"]))
    uneven = {"en-fr": {"files": {"en": site.url("extra/uneven.en"), "fr": site.url("extra/uneven.fr")}}}
    with pytest.raises(TextFormatError, match=r"'uneven' is misaligned: .*uneven\.en has 3 lines .*uneven\.fr has 2"):
        download(single(site, "uneven", datasets={"uneven": uneven}), tmp_path / "raw", tmp_path / "dl")
    assert files_in(tmp_path / "raw") == []


def test_invalid_utf8_names_file_and_line(site: Site, tmp_path: Path) -> None:
    _tar(site.root / "extra/bad.tgz", {"data/bad.en": b"ok\nfine\n", "data/bad.fr": b"bon\nmal \xff form\xe9\n"})
    bad = {"en-fr": {"archive": site.url("extra/bad.tgz"), "files": {"en": "data/bad.en", "fr": "data/bad.fr"}}}
    with pytest.raises(TextFormatError, match=r"bad\.tgz:data/bad\.fr:2: not valid UTF-8"):
        download(single(site, "bad", datasets={"bad": bad}), tmp_path / "raw", tmp_path / "dl")
    assert files_in(tmp_path / "raw") == []


def test_a_gzip_member_expanding_to_one_huge_line_is_refused_naming_it(site: Site, tmp_path: Path) -> None:
    """65 KB of gzip that expands to 64 MiB without a newline: refused after reading download.max_line_bytes."""
    bomb = gzip.compress(b"a" * (64 << 20), compresslevel=9)
    assert len(bomb) < 100_000
    _tar(site.root / "extra/bomb.tgz", {"data/bomb.en.gz": bomb, "data/bomb.fr": b"un\n"})
    files = {"en": "data/bomb.en.gz", "fr": "data/bomb.fr"}
    bad = {"en-fr": {"archive": site.url("extra/bomb.tgz"), "files": files}}
    with pytest.raises(TextFormatError, match=r"bomb\.tgz:data/bomb\.en\.gz:1: a line longer than 1048576 bytes"):
        download(single(site, "bomb", datasets={"bomb": bad}), tmp_path / "raw", tmp_path / "dl")
    assert files_in(tmp_path / "raw") == []


def test_a_member_larger_than_the_limit_is_refused_naming_it_and_the_key(site: Site, tmp_path: Path) -> None:
    _tar(site.root / "extra/big.tgz", {"data/big.en": b"one\ntwo\nthree\n", "data/big.fr": b"un\ndeux\ntrois\n"})
    big = {"en-fr": {"archive": site.url("extra/big.tgz"), "files": {"en": "data/big.en", "fr": "data/big.fr"}}}
    params = single(site, "big", datasets={"big": big}, max_member_bytes=10)
    with pytest.raises(DownloadError, match=r"big\.tgz:data/big\.en: more than 10 bytes .*download\.max_member_bytes"):
        download(params, tmp_path / "raw", tmp_path / "dl")
    assert files_in(tmp_path / "raw") == []


def test_sgml_is_read_in_linear_time_and_an_unclosed_seg_names_its_line() -> None:
    """4,000 unclosed <seg> took 7 s with the former regex (quadratic); 50,000 must take well under one."""
    limits = _Limits(1 << 30, 1 << 20)
    text = '<doc>\n<seg id="1">closed</seg>\n' + '<seg id="2">open\n' * 50_000 + "</doc>\n"
    start = time.perf_counter()
    with pytest.raises(TextFormatError, match=r"x\.sgm:3: a <seg> that is never closed"):
        list(_sgml_segments(io.BytesIO(text.encode()), "x.sgm", limits))
    assert time.perf_counter() - start < 1.0
    mixed = '<SEG id="1">Caf\u00e9 &amp; th\u00e9</Seg >\n<segment>no</segment>\n<seg>two\nlines</seg>\n'
    assert list(_sgml_segments(io.BytesIO(mixed.encode()), "y.sgm", limits)) == [
        "Caf\u00e9 & th\u00e9".encode(),
        b"two lines",
    ]


# --- HTTP: resume, retries, checksums, cache ---------------------------------------------------------------


NC_TGZ = "wmt14/training-parallel-nc-v9.tgz"


def test_an_interrupted_transfer_resumes_with_range(site: Site, tmp_path: Path) -> None:
    site.faults[NC_TGZ] = [f"cut:{CUT}"]
    known = checksum(site.root / NC_TGZ)

    download(wmt(site, checksums={"training-parallel-nc-v9.tgz": known}), tmp_path / "raw", tmp_path / "dl")

    first, resumed = site.ranges(NC_TGZ)
    assert first is None
    m = re.fullmatch(r"bytes=(\d+)-", resumed or "")
    assert m and 0 < int(m.group(1)) <= CUT, resumed
    assert checksum(tmp_path / "dl/training-parallel-nc-v9.tgz") == known
    assert not (tmp_path / "dl/training-parallel-nc-v9.tgz.part").exists()
    assert_wmt_outputs(tmp_path / "raw")


def test_a_server_ignoring_range_restarts_the_file(site: Site, tmp_path: Path) -> None:
    site.faults[NC_TGZ] = [f"cut:{CUT}", "ignore-range"]
    download(wmt(site), tmp_path / "raw", tmp_path / "dl")
    first, resumed = site.ranges(NC_TGZ)
    assert first is None and resumed and resumed.startswith("bytes=")
    assert checksum(tmp_path / "dl/training-parallel-nc-v9.tgz") == checksum(site.root / NC_TGZ)


def test_a_checksum_mismatch_is_refetched_once_then_fails(site: Site, tmp_path: Path) -> None:
    site.faults["wmt14/dev.tgz"] = ["corrupt"] * 3
    known = checksum(site.root / "wmt14/dev.tgz")
    corrupt = bytearray((site.root / "wmt14/dev.tgz").read_bytes())
    corrupt[0] ^= 0xFF
    actual = hashlib.sha256(corrupt).hexdigest()

    with pytest.raises(DownloadError) as err:
        download(wmt(site, checksums={"dev.tgz": known}), tmp_path / "raw", tmp_path / "dl")

    assert f"expected size {known['size']}, sha256 {known['sha256']}" in str(err.value)
    assert f"sha256 {actual}" in str(err.value)
    assert site.url("wmt14/dev.tgz") in str(err.value)
    assert len(site.ranges("wmt14/dev.tgz")) == 2
    # news_commentary_v9 came first and was complete, but nothing is written unless every dataset is
    assert files_in(tmp_path / "raw") == []
    assert not any(p.name.startswith("dev.tgz") and p.suffix != ".url" for p in (tmp_path / "dl").iterdir())


def test_one_corrupt_transfer_is_refetched(site: Site, tmp_path: Path) -> None:
    site.faults["wmt14/dev.tgz"] = ["corrupt"]
    download(wmt(site, checksums={"dev.tgz": checksum(site.root / "wmt14/dev.tgz")}), tmp_path / "raw", tmp_path / "dl")
    assert len(site.ranges("wmt14/dev.tgz")) == 2
    assert_wmt_outputs(tmp_path / "raw")


def test_a_404_names_the_url_without_retrying(site: Site, tmp_path: Path) -> None:
    gone = {"en-fr": {"files": {"en": site.url("extra/gone.en"), "fr": site.url("extra/gone.fr")}}}
    with pytest.raises(NotFoundError, match=re.escape(site.url("extra/gone.en")) + r": HTTP 404"):
        download(single(site, "gone", datasets={"gone": gone}), tmp_path / "raw", tmp_path / "dl")
    assert site.requests == [("extra/gone.en", None)]


def test_a_500_once_is_retried(site: Site, tmp_path: Path) -> None:
    site.faults["wmt14/test-full.tgz"] = ["500"]
    download(wmt(site), tmp_path / "raw", tmp_path / "dl")
    assert len(site.ranges("wmt14/test-full.tgz")) == 2
    assert_wmt_outputs(tmp_path / "raw")


def test_persistent_500s_give_up_after_the_retries(site: Site, tmp_path: Path) -> None:
    site.faults["wmt14/test-full.tgz"] = ["500"] * 10
    with pytest.raises(DownloadError, match=r"test-full\.tgz: failed after 3 tries in a row: HTTP 500"):
        download(wmt(site, retries=2), tmp_path / "raw", tmp_path / "dl")
    assert len(site.ranges("wmt14/test-full.tgz")) == 3


def test_cached_downloads_are_reused_unless_their_url_changed(site: Site, tmp_path: Path) -> None:
    known = {"dev.tgz": checksum(site.root / "wmt14/dev.tgz")}
    download(wmt(site, checksums=known), tmp_path / "raw", tmp_path / "dl")
    site.requests.clear()
    download(wmt(site, checksums=known), tmp_path / "raw2", tmp_path / "dl")
    assert site.requests == []
    assert_wmt_outputs(tmp_path / "raw2")

    # the same file name from another URL (say, a newer release) must not be served from the cache
    shutil.copytree(site.root / "wmt14", site.root / "wmt15")
    raw = raw_params(site, ["news_commentary_v9"], "newstest2013", ["newstest2014"])
    raw["download"]["datasets"]["newstest2013"]["en-fr"]["archive"] = site.url("wmt15/dev.tgz")
    download(parse_params(raw), tmp_path / "raw3", tmp_path / "dl")
    assert site.requests == [("wmt15/dev.tgz", None)]


def test_a_file_changed_upstream_mid_download_is_fetched_whole_not_spliced(site: Site, tmp_path: Path) -> None:
    """The transfer is cut, then the file changes upstream: the resumed request's If-Range (the old ETag) no
    longer matches, the server sends all of the new file, and the cache holds exactly that, not old + new."""
    old = (site.root / NC_TGZ).read_bytes()
    build_statmt(tmp_path / "v2", nc_en=["A newer release.", "Its lines differ.", "Three of them."])
    site.replacements[NC_TGZ] = new = (tmp_path / "v2" / NC_TGZ).read_bytes()
    site.faults[NC_TGZ] = [f"cut+change:{CUT}"]

    download(wmt(site), tmp_path / "raw", tmp_path / "dl")  # no published checksum: nothing else would notice

    (_, first), (_, resumed) = [r for r in site.if_ranges if r[0] == NC_TGZ]
    assert first is None and resumed == '"' + hashlib.sha256(old).hexdigest()[:16] + '"'
    assert (tmp_path / "dl/training-parallel-nc-v9.tgz").read_bytes() == new
    assert lines(tmp_path / "raw/news_commentary_v9.en") == ["A newer release.", "Its lines differ.", "Three of them."]


def test_a_partial_file_without_etag_or_last_modified_is_not_resumed(site: Site, tmp_path: Path) -> None:
    """Without a validator for If-Range nothing tells whether the file changed since: start over instead."""
    site.faults[NC_TGZ] = ["no-validators"]
    download(wmt(site), tmp_path / "raw", tmp_path / "dl")
    assert site.ranges(NC_TGZ) == [None, None]
    assert checksum(tmp_path / "dl/training-parallel-nc-v9.tgz") == checksum(site.root / NC_TGZ)


def test_without_a_published_checksum_the_first_download_is_recorded_and_reuse_checked(
    site: Site, tmp_path: Path
) -> None:
    download(wmt(site), tmp_path / "raw", tmp_path / "dl")
    cached = tmp_path / "dl/dev.tgz"
    record = json.loads((tmp_path / "dl/dev.tgz.url").read_text())
    assert {"size": record["size"], "sha256": record["sha256"]} == checksum(site.root / "wmt14/dev.tgz")

    site.requests.clear()
    download(wmt(site), tmp_path / "raw2", tmp_path / "dl")
    assert site.requests == []  # every cached file matched what was recorded

    data = bytearray(cached.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    cached.write_bytes(bytes(data))
    download(wmt(site), tmp_path / "raw3", tmp_path / "dl")
    assert site.requests == [("wmt14/dev.tgz", None)]
    assert checksum(cached) == checksum(site.root / "wmt14/dev.tgz")


def test_a_wmt_archive_failing_its_published_checksum_is_refused_naming_both_digests(
    site: Site, tmp_path: Path
) -> None:
    published = committed_params()["download"]["checksums"]
    nc = published["training-parallel-nc-v9.tgz"]
    actual = checksum(site.root / NC_TGZ)  # the test server's small stand-in, not the real 80 MB archive

    with pytest.raises(DownloadError) as err:
        download(wmt(site, checksums=published), tmp_path / "raw", tmp_path / "dl")
    message = str(err.value)
    assert "training-parallel-nc-v9.tgz" in message
    assert f"expected size {nc['size']}, sha256 {nc['sha256']}" in message
    assert f"got size {actual['size']}, sha256 {actual['sha256']}" in message
    assert files_in(tmp_path / "raw") == []

    mirror = tmp_path / "mirror"
    shutil.copytree(site.root / "wmt14", mirror)
    with pytest.raises(DownloadError, match=r"mirror file .*training-parallel-nc-v9\.tgz fails its checksum") as err:
        download(wmt(site, mirror=str(mirror), checksums=published), tmp_path / "raw", tmp_path / "dl")
    assert nc["sha256"] in str(err.value) and actual["sha256"] in str(err.value)


@pytest.mark.parametrize("tgt", ["fr", "de"])
def test_every_archive_of_the_default_recipes_has_a_published_checksum(tgt: str) -> None:
    raw = committed_params()
    raw["data"]["tgt_lang"] = tgt
    if tgt == "de":  # the en-de recipe of the README: no UN or Giga-FrEn
        raw["data"]["train"] = ["europarl_v7", "commoncrawl", "news_commentary_v9"]
    params = parse_params(raw)
    names = [params.data.dev, *params.data.train, *params.data.test]
    archives = {posixpath.basename(params.source_for(name).archive or "") for name in names}

    def published(archive: str) -> bool:
        known = params.download.checksums.get(archive)
        return known is not None and bool(known.sha256 or known.md5)

    # dev.tgz has none published: its first download is recorded and checked on reuse (test above)
    assert [archive for archive in sorted(archives) if archive != "dev.tgz" and not published(archive)] == []


# --- Mirrors -------------------------------------------------------------------------------------------------


def extracted_mirror(mirror: Path) -> None:
    """A mirror holding plain extracted files, as /work/shared/data does, not the upstream archives."""
    _write(mirror / "wmt14/en-fr/news-commentary-v9.fr-en.en", _text(NC_EN))
    _write(mirror / "wmt14/en-fr/news-commentary-v9.fr-en.fr", _text(NC_FR))
    _write(mirror / "wmt14/en-de/news-commentary-v9.fr-en.en", b"a different file of the same name\n")
    _write(mirror / "wmt14/en-fr/newstest2013.en", _text(DEV_EN))
    _write(mirror / "wmt14/en-de/newstest2013.en", _text(DEV_EN))  # identical copies are fine anywhere
    _write(mirror / "wmt14/en-fr/newstest2013.fr", _text(DEV_FR))
    _write(mirror / "sgm/newstest2014-fren-src.en.sgm", SRC_SGM.encode())
    _write(mirror / "sgm/newstest2014-fren-ref.fr.sgm", REF_SGM.encode())


def test_a_local_mirror_of_extracted_files_is_used_instead_of_upstream(site: Site, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    extracted_mirror(mirror)

    manifest = download(wmt(site, mirror=str(mirror)), tmp_path / "raw", tmp_path / "dl")

    assert_wmt_outputs(tmp_path / "raw")
    assert site.requests == []
    assert manifest["news_commentary_v9.en"]["origin"] == str(mirror / "wmt14/en-fr/news-commentary-v9.fr-en.en")
    assert "member" not in manifest["news_commentary_v9.en"]


def test_a_mirror_with_different_files_of_one_name_lists_them(site: Site, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    extracted_mirror(mirror)
    _write(mirror / "old/newstest2013.fr", b"une autre version\n")
    _write(mirror / "older/newstest2013.fr", b"encore une autre\n")
    (mirror / "wmt14/en-fr/newstest2013.fr").unlink()
    with pytest.raises(DownloadError, match=r"different files named 'newstest2013.fr'.*\n.*old/newstest2013.fr"):
        download(wmt(site, mirror=str(mirror)), tmp_path / "raw", tmp_path / "dl")


def test_a_file_missing_from_the_mirror_is_an_error_not_a_download(site: Site, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    extracted_mirror(mirror)
    (mirror / "sgm/newstest2014-fren-ref.fr.sgm").unlink()
    with pytest.raises(NotFoundError, match=r"'newstest2014'.*no file named 'newstest2014-fren-ref.fr.sgm'"):
        download(wmt(site, mirror=str(mirror)), tmp_path / "raw", tmp_path / "dl")
    assert site.requests == []


def test_env_mirror_of_archives_overrides_params(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "archives"
    shutil.copytree(site.root / "wmt14", mirror / "nested")
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    known = {"dev.tgz": checksum(mirror / "nested/dev.tgz")}

    manifest = download(wmt(site, mirror="/nonexistent", checksums=known), tmp_path / "raw", tmp_path / "dl")

    assert_wmt_outputs(tmp_path / "raw")
    assert site.requests == []
    assert manifest["newstest2013.en"]["origin"] == str(mirror / "nested/dev.tgz")
    assert manifest["newstest2013.en"]["member"] == "dev/newstest2013.en"


def test_a_local_mirror_file_failing_its_checksum_is_an_error(site: Site, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(site.root / "wmt14", mirror)
    wrong = {"dev.tgz": {"sha256": "0" * 64}}
    with pytest.raises(DownloadError, match=r"dev\.tgz fails its checksum .*expected sha256 0{64}; got sha256 "):
        download(wmt(site, mirror=str(mirror), checksums=wrong), tmp_path / "raw", tmp_path / "dl")


def test_a_url_mirror_serves_archives_or_extracted_files(site: Site, tmp_path: Path) -> None:
    extracted_mirror(site.root / "mirror-tree")
    _write(site.root / "mirror/dev.tgz", (site.root / "wmt14/dev.tgz").read_bytes())
    for path in (site.root / "mirror-tree").rglob("*"):
        if path.is_file() and path.parent.name != "en-de":
            _write(site.root / "mirror" / path.name, path.read_bytes())

    download(wmt(site, mirror=site.url("mirror/")), tmp_path / "raw", tmp_path / "dl")

    assert_wmt_outputs(tmp_path / "raw")
    assert [path for path, _ in site.requests] == [
        "mirror/training-parallel-nc-v9.tgz",  # 404: the mirror holds the extracted files instead
        "mirror/news-commentary-v9.fr-en.en",
        "mirror/news-commentary-v9.fr-en.fr",
        "mirror/dev.tgz",
        "mirror/test-full.tgz",
        "mirror/newstest2014-fren-src.en.sgm",
        "mirror/newstest2014-fren-ref.fr.sgm",
    ]


# --- The entry point -----------------------------------------------------------------------------------------


def run_stage(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(MIRROR_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "stages.download"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_entry_point_writes_data_raw(site: Site, tmp_path: Path) -> None:
    raw = raw_params(site, ["news_commentary_v9"], "newstest2013", ["newstest2014"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert_wmt_outputs(tmp_path / "data/raw")
    assert (tmp_path / "data/downloads/dev.tgz").exists()


def test_the_entry_point_with_bad_params_exits_naming_the_key(site: Site, tmp_path: Path) -> None:
    raw = raw_params(site, ["news_commentary_v9"], "newstest2013", ["newstest2014"], retries=-1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_stage(tmp_path)
    assert result.returncode != 0
    assert "download.retries" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_the_entry_point_reports_download_errors_without_a_traceback(site: Site, tmp_path: Path) -> None:
    raw = raw_params(site, ["news_commentary_v9"], "newstest2013", ["newstest2014"])
    (site.root / "wmt14/dev.tgz").unlink()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = run_stage(tmp_path)
    assert result.returncode == 1
    assert f"{site.url('wmt14/dev.tgz')}: HTTP 404" in result.stderr
    assert "Traceback" not in result.stderr


# --- Real data -----------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_the_shared_mirror_gives_the_real_line_counts(tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    raw = committed_params()
    raw["data"].update(
        src_lang="en",
        tgt_lang="fr",
        train=["multi30k_train", "europarl_v7"],
        dev="multi30k_val",
        test=["multi30k_test_2016", "newstest2013"],
    )
    raw["download"]["mirror"] = str(SHARED_DATA)

    manifest = download(parse_params(raw), tmp_path / "raw", tmp_path / "dl")

    counts = {name: entry["lines"] for name, entry in manifest.items()}
    assert counts == {
        "multi30k_train.en": 29000,
        "multi30k_train.fr": 29000,
        "europarl_v7.en": 3000,
        "europarl_v7.fr": 3000,
        "multi30k_val.en": 1014,
        "multi30k_val.fr": 1014,
        "multi30k_test_2016.en": 1000,
        "multi30k_test_2016.fr": 1000,
        "newstest2013.en": 3000,
        "newstest2013.fr": 3000,
    }
    # the README's sha256 of the decompressed Multi30k training text
    assert manifest["multi30k_train.en"]["sha256"] == "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"
    assert files_in(tmp_path / "dl") == []  # a local mirror is read in place
