"""A throw-away git+DVC copy of the project with a tiny synthetic corpus, for integration tests."""

from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["stages", "seq2seq", "flows", "dvc.yaml", "prefect.yaml", ".dvc/config", ".dvcignore", ".gitignore"]

# A toy "language pair": each English word has one French word, and French puts adjectives after nouns.
LEXICON = {
    "the": "le",
    "a": "un",
    "dog": "chien",
    "cat": "chat",
    "man": "homme",
    "boy": "garçon",
    "sees": "voit",
    "eats": "mange",
    "likes": "aime",
    "big": "grand",
    "small": "petit",
    "red": "rouge",
    "ball": "ballon",
    "apple": "pomme",
    "runs": "court",
    "sleeps": "dort",
}
NOUNS = ["dog", "cat", "man", "boy", "ball", "apple"]
VERBS = ["sees", "eats", "likes"]
ADJS = ["big", "small", "red"]


def toy_pair(rng: random.Random) -> tuple[str, str]:
    def noun_phrase() -> tuple[list[str], list[str]]:
        det, noun = rng.choice(["the", "a"]), rng.choice(NOUNS)
        if rng.random() < 0.5:
            adj = rng.choice(ADJS)
            return [det, adj, noun], [LEXICON[det], LEXICON[noun], LEXICON[adj]]
        return [det, noun], [LEXICON[det], LEXICON[noun]]

    s_en, s_fr = noun_phrase()
    verb = rng.choice(VERBS)
    o_en, o_fr = noun_phrase()
    return " ".join([*s_en, verb, *o_en]) + " .", " ".join([*s_fr, LEXICON[verb], *o_fr]) + " ."


def write_toy_corpus(mirror: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> None:
    """Files toy-<split>.en/.fr in `mirror`, as a mirror of made-up upstream URLs would hold them."""
    sizes = sizes or {"train": 400, "dev": 30, "test": 40}
    rng = random.Random(seed)
    mirror.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        pairs = [toy_pair(rng) for _ in range(n)]
        (mirror / f"toy-{split}.en").write_text("".join(e + "\n" for e, _ in pairs), encoding="utf-8")
        (mirror / f"toy-{split}.fr").write_text("".join(f + "\n" for _, f in pairs), encoding="utf-8")


@functools.cache
def committed_params_text() -> str:
    """params.yaml as committed at HEAD. Tests never read the working tree's copy: `make demo`, `dvc exp run`
    or a user's local edits may have changed it, and the tests must not depend on that."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:params.yaml"], capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout
    return (REPO / "params.yaml").read_text(encoding="utf-8")  # not a git checkout (e.g. an unpacked sdist)


def committed_params() -> dict[str, Any]:
    """A fresh mapping of the committed params.yaml, for a test to change."""
    return yaml.safe_load(committed_params_text())


def tiny_params(mirror: Path) -> dict[str, Any]:
    """The repo's params.yaml, pointed at the toy corpus and shrunk to a model that trains in seconds."""
    raw = committed_params()
    for split in ("train", "dev", "test"):
        raw["download"]["datasets"][f"toy_{split}"] = {
            "en-fr": {"files": {lang: f"https://data.invalid/toy/toy-{split}.{lang}" for lang in ("en", "fr")}}
        }
    raw["data"].update(train=["toy_train"], dev="toy_dev", test=["toy_test"])
    raw["download"].update(mirror=str(mirror), retries=0)
    raw["tokenize"].update(vocab_size=120, input_sentence_size=0)
    raw["model"]["transformer"].update(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64)
    for family in ("transformer", "rnn", "attention_rnn"):
        raw["model"][family].update(d_model=32, max_positions=64)
    raw["train"].update(
        max_tokens=600, max_steps=40, max_minutes=5, lr=0.003, warmup_steps=10, log_every=10, max_len=60, threads=1
    )
    raw["evaluate"].update(batch_size=16)
    raw["export"]["registered_model_name"] = "toy-{src}-{tgt}"
    return raw


def tool_env(home: Path) -> dict[str, str]:
    """Environment for the real tools, offline and quiet."""
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_NO_UPDATE_CHECK="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        # `mlflow server` (3.17) otherwise starts a job runner and seven huey consumers, ~2 GB for GenAI jobs
        # the project never submits; without them a server is one ~0.3 GB process
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        DO_NOT_TRACK="true",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
        HOME=str(home),
        # stages run as `python -m stages.x`: the interpreter running the tests must come first
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("NMT_MIRROR", None)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workspace(
    root: Path, params: dict[str, Any] | str, extra_files: tuple[str, ...] = ()
) -> tuple[Path, dict[str, str]]:
    """Copy the project (and `extra_files`) into `root/ws`, write `params` (a mapping, or the text of a
    params.yaml), and commit it in a fresh git repo."""
    ws = root / "ws"
    ws.mkdir(parents=True)
    for name in (*PROJECT_FILES, *extra_files):
        src = REPO / name
        dst = ws / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    (ws / "params.yaml").write_text(text, encoding="utf-8")
    env = tool_env(root / "home")
    (root / "home").mkdir()
    run(["git", "init", "-q", "-b", "main"], ws, env)
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-q", "-m", "workspace"], ws, env)
    return ws, env
