"""A WMT'14-shaped synthetic English-French corpus of any size, written in statmt.org's archive layout.

    python bench/synth_corpus.py OUT_DIR --pairs 1000000 [--seed 0] [--shared ../shared/data]

Every training pair joins two or three real sentence pairs side by side (Multi30k, the Europarl v7 slice and
newstest2013 from ../shared/data), so lengths and vocabulary look like real text; the base pairs are all
distinct. Mixed in, at fixed rates (`NOISE`), is what `clean` must drop: pairs with an empty side, over-long
pairs, pairs with a bad length ratio, exact duplicates of earlier pairs, and a few English-on-both-sides pairs
(kept unless clean.langid is on). The N pairs are shared out between the five WMT'14 en-fr training corpora in
their real proportions (`WMT14_ENFR_PAIRS`).

The archive and member names come from params.yaml's `download.datasets` (the same catalogue the download
stage reads), so OUT_DIR works as `download.mirror` as it is, or served over HTTP (`serve_directory`). Dev is
the real newstest2013 (dev.tgz); the test set is Multi30k's test_2016_flickr dressed as newstest2014 SGML.

These archives cannot match the published checksums in `download.checksums`: OUT_DIR/checksums.json holds
their own size and sha256, and `params_for_mirror` puts those in place of the real ones for the synthetic
archive names only, so the download stage still verifies every file it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import html
import json
import posixpath
import shutil
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages come from this checkout

from seq2seq.config import Params, load_params  # noqa: E402
from stages.clean import HashSet, first_occurrences, normalize, pair_hashes  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
# Lines per training corpus of WMT'14 en-fr (the statmt.org releases; 40.8M pairs in all) and en-de (4.5M).
WMT14_ENFR_PAIRS = {
    "europarl_v7": 2_007_723,
    "commoncrawl": 3_244_152,
    "un": 12_886_831,
    "news_commentary_v9": 183_251,
    "giga_fren": 22_520_376,
}
WMT14_ENDE_PAIRS = {"europarl_v7": 1_920_209, "commoncrawl": 2_399_123, "news_commentary_v9": 201_288}
# Share of each kind of pair `clean` must drop (langid only when clean.langid is on), per training corpus.
NOISE = {"empty": 0.01, "too_long": 0.002, "length_ratio": 0.01, "duplicate": 0.04, "wrong_language": 0.005}
MAX_TOKENS = 250  # the committed clean.max_tokens: an over-long pair has more
MAX_RATIO = 3.0  # the committed clean.max_length_ratio
CHUNK_PAIRS = 100_000
EMPTY_SIDES = ["", " ", "\u200b", "\t "]  # all empty once clean has normalised them


# --- The pool of real sentence pairs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Real, normalised sentence pairs to recombine; every pair has both sides and a sane length ratio."""

    en: list[str]
    fr: list[str]

    @classmethod
    def from_pairs(cls, en: list[str], fr: list[str]) -> Pool:
        src, tgt = pd.Series(normalize(en, "NFKC"), dtype="str"), pd.Series(normalize(fr, "NFKC"), dtype="str")
        n_src, n_tgt = src.str.count(" ") + 1, tgt.str.count(" ") + 1
        ok = (src != "") & (tgt != "") & (n_src <= 60) & (n_tgt <= 60)
        ok &= np.maximum(n_src, n_tgt) <= 2 * np.minimum(n_src, n_tgt)
        pairs = dict.fromkeys(zip(src[ok], tgt[ok], strict=True))  # distinct, in order
        return cls([e for e, _ in pairs], [f for _, f in pairs])

    def __len__(self) -> int:
        return len(self.en)


def shared_pool(shared: Path = SHARED_DATA) -> Pool:
    """The real sentence pairs of ../shared/data (Multi30k train+val, the Europarl slice, newstest2013)."""

    def lines(path: Path) -> list[str]:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8").splitlines()

    en: list[str] = []
    fr: list[str] = []
    for stem in ("multi30k/train.{}.gz", "multi30k/val.{}.gz", "wmt14/en-fr/europarl-v7.fr-en.{}"):
        en += lines(shared / stem.format("en"))
        fr += lines(shared / stem.format("fr"))
    return Pool.from_pairs(en, fr)


# --- Pairs: distinct base pairs, then the noise clean must drop -------------------------------------------


class PairMaker:
    """Makes pairs from a pool: distinct joined pairs, and each kind of noise."""

    def __init__(self, pool: Pool, rng: np.random.Generator, seen: HashSet):
        self.pool, self.rng, self.seen = pool, rng, seen
        self.short = [i for i, e in enumerate(pool.en) if e.count(" ") < 8]  # at most 8 tokens

    def joined(self, idx: Any) -> tuple[str, str]:
        return " ".join(self.pool.en[i] for i in idx), " ".join(self.pool.fr[i] for i in idx)

    def distinct(self, n: int) -> tuple[list[str], list[str]]:
        """n pairs of two (80%) or three joined pool pairs, none seen before (in this corpus, by pair hash)."""
        en: list[str] = []
        fr: list[str] = []
        while len(en) < n:
            m = n - len(en) + 16
            k = np.where(self.rng.random(m) < 0.8, 2, 3)
            idx = self.rng.integers(0, len(self.pool), (m, 3))
            cand = [self.joined(row[:j]) for row, j in zip(idx.tolist(), k.tolist(), strict=True)]
            new_en, new_fr = self._unseen([e for e, _ in cand], [f for _, f in cand])
            en += new_en
            fr += new_fr
        return en[:n], fr[:n]

    def _unseen(self, en: list[str], fr: list[str]) -> tuple[list[str], list[str]]:
        hashes = pair_hashes([e.encode() for e in en], [f.encode() for f in fr])
        fresh = ~self.seen.contains(hashes) & first_occurrences(hashes)
        self.seen.add(hashes[fresh])
        keep = np.flatnonzero(fresh).tolist()
        return [en[i] for i in keep], [fr[i] for i in keep]

    def empty(self) -> tuple[str, str]:
        en, fr = self.joined(self.rng.integers(0, len(self.pool), 2).tolist())
        blank = EMPTY_SIDES[int(self.rng.integers(len(EMPTY_SIDES)))]
        return (blank, fr) if self.rng.random() < 0.5 else (en, blank)

    def too_long(self) -> tuple[str, str]:
        while True:
            en, fr = self.joined(self.rng.integers(0, len(self.pool), 40).tolist())
            if max(en.count(" "), fr.count(" ")) + 1 > MAX_TOKENS:
                return en, fr

    def length_ratio(self) -> tuple[str, str]:
        """A short sentence against a long one (more than MAX_RATIO times its tokens, at most MAX_TOKENS)."""
        short = self.short[int(self.rng.integers(len(self.short)))]
        en, fr = self.pool.en[short], self.pool.fr[short]
        idx = [short]
        while True:
            idx.append(int(self.rng.integers(len(self.pool))))
            long_en, long_fr = self.joined(idx)
            n_long_en, n_long_fr = long_en.count(" ") + 1, long_fr.count(" ") + 1
            if max(n_long_en, n_long_fr) > MAX_TOKENS:
                idx = [short]  # overshot: start again
            elif n_long_fr > MAX_RATIO * (en.count(" ") + 1) and n_long_en > MAX_RATIO * (fr.count(" ") + 1):
                return (en, long_fr) if self.rng.random() < 0.5 else (long_en, fr)

    def wrong_language(self) -> tuple[str, str]:
        """English on both sides (a distinct pair): passes every rule but langid."""
        while True:
            en, _ = self.joined(self.rng.integers(0, len(self.pool), 2).tolist())
            if self._unseen([en], [en])[0]:
                return en, en


def noise_counts(n: int) -> dict[str, int]:
    """How many pairs of each noise kind a corpus of n pairs holds (the rest are distinct base pairs)."""
    counts = {kind: round(share * n) for kind, share in NOISE.items()}
    while sum(counts.values()) >= n and any(counts.values()):  # tiny corpora: keep at least one base pair
        biggest = max(counts, key=lambda k: counts[k])
        counts[biggest] -= 1
    return counts


def corpus_chunks(maker: PairMaker, n: int) -> Iterator[tuple[list[str], list[str], dict[str, int]]]:
    """A corpus of n pairs in chunks: (en lines, fr lines, noise counts of this chunk), order shuffled,
    each duplicate placed after the pair it repeats."""
    done = 0
    while done < n:
        size = min(CHUNK_PAIRS, n - done)
        counts = noise_counts(size)
        n_base = size - sum(counts.values())
        en, fr = maker.distinct(n_base)
        for kind in ("empty", "too_long", "length_ratio", "wrong_language"):
            for _ in range(counts[kind]):
                e, f = getattr(maker, kind)()
                en.append(e)
                fr.append(f)
        keys = maker.rng.random(len(en))
        sources = maker.rng.integers(0, n_base, counts["duplicate"])
        en += [en[i] for i in sources.tolist()]
        fr += [fr[i] for i in sources.tolist()]
        keys = np.concatenate([keys, keys[sources] + maker.rng.random(len(sources)) * (1 - keys[sources])])
        order = np.argsort(keys, kind="stable").tolist()
        yield [en[i] for i in order], [fr[i] for i in order], counts
        done += size


# --- Writing the upstream layout -----------------------------------------------------------------------------


def split_pairs(n: int, sizes: dict[str, int]) -> dict[str, int]:
    """n shared out in proportion to `sizes` (largest remainder), at least one pair each."""
    total = sum(sizes.values())
    exact = {name: n * size / total for name, size in sizes.items()}
    share = {name: max(1, int(x)) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True)
    for name in by_remainder[: max(0, n - sum(share.values()))]:
        share[name] += 1
    return share


def _basename(url: str) -> str:
    return posixpath.basename(url)


def _sgml(lines: list[str], kind: str, lang: str) -> bytes:
    """A WMT SGML file (srcset or refset) with one document holding `lines` as <seg>s."""
    tag = "srcset" if kind == "src" else "refset"
    segs = "".join(f'<seg id="{i}">{html.escape(line, quote=False)}</seg>\n' for i, line in enumerate(lines, 1))
    text = (
        f'<{tag} setid="newstest2014" srclang="any" trglang="{lang}">\n<doc sysid="ref" docid="synthetic" '
        f'genre="news" origlang="en">\n{segs}</doc>\n</{tag}>\n'
    )
    return text.encode("utf-8")


@contextlib.contextmanager
def _member_writer(path: Path) -> Iterator[IO[bytes]]:
    """A file being written for an archive member: gzip-compressed when the member's name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = functools.partial(gzip.open, compresslevel=1) if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        yield f


def _write_archive(archive: Path, members: dict[str, Path]) -> None:
    """A .tgz or plain .tar (by name) holding each file under its member name."""
    mode = "w:gz" if archive.name.endswith((".tgz", ".tar.gz")) else "w"
    kwargs = {"compresslevel": 1} if mode == "w:gz" else {}  # fast to write; reading speed barely depends on it
    with tarfile.open(archive, mode, **kwargs) as tar:  # type: ignore[call-overload]
        for name, path in members.items():
            tar.add(path, arcname=name, recursive=False)


def write_corpus(
    out_dir: Path, n_pairs: int, params: Params, pool: Pool, dev: Pool, test: Pool, seed: int = 0
) -> dict[str, Any]:
    """Write the archives of data.train/dev/test (en-fr) for n_pairs training pairs; return what was written."""
    out_dir = Path(out_dir)
    staging = out_dir / ".members"
    shutil.rmtree(staging, ignore_errors=True)
    langs = params.data.langs
    members: dict[str, dict[str, Path]] = {}  # archive name -> member name -> staged file

    def stage(dataset: str) -> dict[str, Path]:
        source = params.source_for(dataset)
        if source.archive is None:
            raise ValueError(f"dataset {dataset!r} is not an archive: the synthetic corpus writes archives only")
        files = members.setdefault(_basename(source.archive), {})
        for lang in langs:
            files[source.files[lang]] = staging / _basename(source.archive) / source.files[lang]
        return {lang: files[source.files[lang]] for lang in langs}

    sizes = split_pairs(n_pairs, {name: WMT14_ENFR_PAIRS.get(name, 0) or 1 for name in params.data.train})
    seen = HashSet(expected=n_pairs)  # base pairs are distinct across all training corpora
    report: dict[str, Any] = {"pairs": n_pairs, "datasets": {}, "noise": dict.fromkeys(NOISE, 0), "en_words": 0}
    for i, name in enumerate(params.data.train):
        maker = PairMaker(pool, np.random.default_rng([seed, i]), seen)
        paths = stage(name)
        with _member_writer(paths[langs[0]]) as f_src, _member_writer(paths[langs[1]]) as f_tgt:
            for en, fr, counts in corpus_chunks(maker, sizes[name]):
                f_src.write(("\n".join(en) + "\n").encode("utf-8"))
                f_tgt.write(("\n".join(fr) + "\n").encode("utf-8"))
                report["en_words"] += sum(line.count(" ") + 1 for line in en)
                for kind, count in counts.items():
                    report["noise"][kind] += count
        report["datasets"][name] = sizes[name]

    for dataset, lines in ((params.data.dev, dev), *((name, test) for name in params.data.test)):
        for lang, text in zip(langs, (lines.en, lines.fr), strict=True):
            path = stage(dataset)[lang]
            with _member_writer(path) as f:
                sgm = path.name.removesuffix(".gz").endswith(".sgm")
                f.write(_sgml(text, "src" if lang == langs[0] else "ref", lang) if sgm else _text(text))

    checksums = {}
    for archive, files in members.items():
        _write_archive(out_dir / archive, files)
        checksums[archive] = file_checksum(out_dir / archive)
    shutil.rmtree(staging)
    (out_dir / "checksums.json").write_text(json.dumps(checksums, indent=2, sort_keys=True) + "\n")
    report["checksums"] = checksums
    (out_dir / "synth.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def file_checksum(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def expected_drops(report: dict[str, Any], langid: bool = False) -> dict[str, int]:
    """What clean (committed rules; langid as given) must drop from this corpus, per rule."""
    noise = report["noise"]
    return {
        "empty": noise["empty"],
        "too_short": 0,
        "too_long": noise["too_long"],
        "length_ratio": noise["length_ratio"],
        "duplicate": noise["duplicate"],
        "langid": noise["wrong_language"] if langid else 0,
    }


# --- Using it: params pointed at the mirror, an HTTP server -------------------------------------------------


def params_for_mirror(raw: dict[str, Any], mirror: str, out_dir: Path) -> dict[str, Any]:
    """params.yaml (as a mapping) with download.mirror set and, for the synthetic archives only, their own
    checksums in place of the published ones; every other checksum is left as it is."""
    raw["download"]["mirror"] = mirror
    synthetic = json.loads((Path(out_dir) / "checksums.json").read_text())
    raw["download"]["checksums"] = {**raw["download"]["checksums"], **synthetic}
    return raw


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on a free 127.0.0.1 port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def shared_dev_test(shared: Path = SHARED_DATA) -> tuple[Pool, Pool]:
    """Dev: the real newstest2013 en-fr, line for line; test: Multi30k's test_2016_flickr."""

    def lines(path: Path) -> list[str]:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8").splitlines()

    dev = Pool(lines(shared / "wmt14/en-fr/newstest2013.en"), lines(shared / "wmt14/en-fr/newstest2013.fr"))
    test = Pool(lines(shared / "multi30k/test_2016_flickr.en.gz"), lines(shared / "multi30k/test_2016_flickr.fr.gz"))
    return dev, test


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--pairs", type=int, default=100_000, help="training pairs in all (noise included)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=SHARED_DATA, help="the real corpora to recombine")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="whose download.datasets to follow")
    args = ap.parse_args(argv)
    if not args.shared.is_dir():
        ap.error(f"--shared {args.shared}: no such directory (the real corpora to recombine)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dev, test = shared_dev_test(args.shared)
    report = write_corpus(args.out_dir, args.pairs, load_params(args.params), shared_pool(args.shared), dev, test)
    print(json.dumps({k: v for k, v in report.items() if k != "checksums"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
