"""A worker's DVC workspace: a git clone of the project where the flows run DVC.

Each worker (the orchestrator on the default pool, a trainer on the `gpu` pool) owns one clone, named by
the `NMT_WORKDIR` environment variable. Nothing else is shared between workers: code comes from git, data
from the DVC remote, and the few small records DVC does not cache (dvc.lock entries, metrics, the MLflow
run id) travel as flow parameters and results.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from seq2seq.config import Params, load_params
from seq2seq.preset import apply_preset
from seq2seq.redact import redact

STAGES = ("download", "clean", "tokenize", "train", "evaluate", "export")
WORKDIR_ENV = "NMT_WORKDIR"
LOCK_FILE = Path(".dvc/tmp/nmt-pipeline.lock")
# Files a run rewrites in its clone (and .gitignore files, where DVC lists its outputs); any other
# uncommitted change to a tracked file is refused, as the GPU worker would not see it.
RUN_FILES = {"params.yaml", "dvc.lock"}


class WorkspaceError(RuntimeError):
    """The workspace cannot be used as asked; the message says why and what to do."""


class CommandError(RuntimeError):
    """A git or DVC command failed; the message holds the command, directory and output tail."""


def log() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (so output shows in the UI), else a plain logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def resolve_workdir(workdir: str | None) -> Path:
    """`workdir`, else $NMT_WORKDIR, else the current directory; it must be a git+DVC clone."""
    path = Path(workdir or os.environ.get(WORKDIR_ENV) or os.getcwd()).resolve()
    if not (path / "dvc.yaml").is_file() or not (path / ".git").exists():
        raise WorkspaceError(f"{path}: not a git clone of the project (no dvc.yaml or .git); set {WORKDIR_ENV}")
    return path


def tool_env() -> dict[str, str]:
    """This interpreter's bin directory first on PATH, so DVC's `python -m stages.x` uses the same venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def run_command(cmd: list[str], cwd: Path, quiet: bool = False) -> str:
    """Run `cmd`, streaming its output to the run log; raise CommandError with the output's tail on failure.
    Credentials in URLs (a git remote with a token, an S3 or MLflow URI) are masked in what is logged."""
    logger = log()
    if not quiet:
        logger.info("$ %s", redact(" ".join(cmd)))
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(
        cmd, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            if not quiet and line.strip():
                logger.info("%s", redact(line))
    if proc.returncode != 0:
        output = redact("\n".join(tail))
        raise CommandError(f"`{redact(' '.join(cmd))}` failed in {cwd} (exit {proc.returncode}):\n{output}")
    return "\n".join(lines)


def dvc(workdir: Path, *args: str, quiet: bool = False) -> str:
    return run_command([sys.executable, "-m", "dvc", *args], workdir, quiet=quiet)


def git(workdir: Path, *args: str) -> str:
    return run_command(["git", *args], workdir, quiet=True).strip()


def remote_args(remote: str | None) -> list[str]:
    return ["--remote", remote] if remote else []


# --- the git revision and params.yaml --------------------------------------------------------------


def checkout(workdir: Path, revision: str | None) -> str:
    """Check out `revision` (fetched from `origin` first), keeping this clone's dvc.lock; returns the commit.

    dvc.lock records what the files on disk were built from, so it survives the checkout; DVC then
    rebuilds whatever the new code or params invalidate. Without a revision, HEAD is used as it is.
    """
    if revision:
        if "origin" in git(workdir, "remote").split():
            git(workdir, "fetch", "--quiet", "origin")
        commit = _resolve(workdir, revision)
        lock = workdir / "dvc.lock"
        saved = lock.read_text(encoding="utf-8") if lock.exists() else None
        git(workdir, "checkout", "--quiet", "--force", "--detach", commit)
        if saved is not None:
            lock.write_text(saved, encoding="utf-8")
    status = run_command(["git", "status", "--porcelain", "-z", "--untracked-files=no"], workdir, quiet=True)
    dirty = [
        entry[3:]
        for entry in status.split("\0")
        if entry[3:] and entry[3:] not in RUN_FILES and Path(entry[3:]).name != ".gitignore"
    ]
    if dirty:
        raise WorkspaceError(
            f"{workdir}: uncommitted changes to {', '.join(dirty)}; commit and push them "
            "(the GPU worker builds from git, not from this directory)"
        )
    return git(workdir, "rev-parse", "HEAD")


def _resolve(workdir: Path, revision: str) -> str:
    for candidate in (f"origin/{revision}", revision):
        try:
            return git(workdir, "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}")
        except CommandError:
            continue
    raise WorkspaceError(f"{workdir}: git revision {revision!r} not found (is it pushed to origin?)")


def write_params(workdir: Path, commit: str, preset: str | None, overrides: dict[str, Any] | None) -> Params:
    """params.yaml = the committed file at `commit`, then `preset` (a file in the repo), then `overrides`."""
    refuse_credentials(overrides or {})
    path = workdir / "params.yaml"
    path.write_text(git(workdir, "show", f"{commit}:params.yaml") + "\n", encoding="utf-8")
    if preset:
        apply_preset(workdir / preset, path)
    if overrides:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="overrides-", delete=False) as f:
            yaml.safe_dump(dict(overrides), f)
        try:
            apply_preset(Path(f.name), path)
        finally:
            os.unlink(f.name)
    return load_params(path)


def refuse_credentials(overrides: dict[str, Any]) -> None:
    """Flow parameters are stored by the Prefect server and shown in its UI in clear: an override whose value
    holds a URL with credentials is refused, naming the key (give credentials to the worker's environment)."""
    for key, value in overrides.items():
        if redact(str(value)) != str(value):
            raise WorkspaceError(
                f"overrides[{key!r}]: a URL with credentials in a flow parameter (Prefect stores and shows "
                "parameters in clear); put the credentials in the worker's environment (netrc, AWS_*, "
                "MLFLOW_TRACKING_USERNAME/PASSWORD) and pass the URL without them"
            )


# --- dvc.lock and DVC state -------------------------------------------------------------------------


def read_lock(workdir: Path) -> dict[str, Any]:
    path = workdir / "dvc.lock"
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    return lock or {"schema": "2.0", "stages": {}}


def lock_entries(workdir: Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    """The dvc.lock entries of `stages`; a stage never built is an error naming it."""
    recorded = read_lock(workdir)["stages"]
    missing = [s for s in stages if s not in recorded]
    if missing:
        raise WorkspaceError(f"{workdir}/dvc.lock: no entry for stage(s) {', '.join(missing)}")
    return {s: recorded[s] for s in stages}


def merge_lock_entries(workdir: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Record stages built elsewhere in this clone's dvc.lock (then `dvc pull` fetches their outputs)."""
    lock = read_lock(workdir)
    lock["stages"].update(entries)
    ordered = {s: lock["stages"][s] for s in STAGES if s in lock["stages"]}
    ordered.update({s: e for s, e in lock["stages"].items() if s not in ordered})
    lock["stages"] = ordered
    path = workdir / "dvc.lock"
    tmp = path.with_suffix(".lock.tmp")
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(path)


def stale_stages(workdir: Path, *targets: str) -> set[str]:
    """Stages whose deps, params or outs differ from dvc.lock (`dvc status`)."""
    status = json.loads(dvc(workdir, "status", "--json", *targets, quiet=True) or "{}")
    return {name.split(":")[-1] for name in status}


def uncached_outs(workdir: Path, stage: str) -> list[str]:
    """The outs/metrics/plots of `stage` with `cache: false`: DVC records but never pushes them."""
    spec = yaml.safe_load((workdir / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for item in spec.get(kind, []):
            if isinstance(item, dict):
                (path, opts), *_ = item.items()
                if (opts or {}).get("cache") is False:
                    paths.append(path)
    return paths


def write_stage_outputs(workdir: Path, stage: str, files: dict[str, str]) -> None:
    """Write `files` (path -> text), the uncached outputs of `stage` built on another machine, into `workdir`.

    They come from a worker's result, so they are checked before anything is written: each path must be one
    that dvc.yaml declares as an uncached out of `stage` and must resolve inside the workspace (no `..`, no
    absolute path, no symlink leading out). Anything else fails naming the path.
    """
    allowed, root = set(uncached_outs(workdir, stage)), workdir.resolve()
    targets = {}
    for path, text in files.items():
        target = (workdir / path).resolve()
        if path not in allowed or not target.is_relative_to(root) or not isinstance(text, str):
            raise WorkspaceError(
                f"{workdir}: refusing to write {path!r} from the {stage} result: only the uncached outs that "
                f"dvc.yaml declares for {stage} ({', '.join(sorted(allowed))}) may be written, inside the workspace"
            )
        targets[target] = text
    for target, text in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8", newline="") as f:  # byte for byte: DVC hashes these
            f.write(text)


def out_hashes(entry: dict[str, Any]) -> dict[str, str]:
    """{out path: md5} from one dvc.lock stage entry."""
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


# --- one run at a time per workspace ----------------------------------------------------------------


@contextmanager
def workspace_lock(workdir: Path, wait_s: float, holder: str) -> Iterator[None]:
    """Hold this clone for one flow run; wait up to `wait_s` for another run to finish, then fail naming it.

    DVC locks its repo only while one command runs; a pipeline is many commands plus edits to
    params.yaml and dvc.lock, so two runs interleaving in one clone would mix their inputs.
    """
    path = workdir / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+", encoding="utf-8")
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "another run"
            if time.monotonic() >= deadline:
                f.close()
                raise WorkspaceError(
                    f"{workdir} is busy: {other} holds {LOCK_FILE} (waited {wait_s:.0f}s). "
                    "Two pipeline runs cannot share a workspace; retry when it finishes or raise lock_wait_s."
                ) from None
            if not announced:
                log().info("waiting for %s to release %s", other, path)
                announced = True
            time.sleep(1.0)
    try:
        f.seek(0)
        f.truncate()
        f.write(holder)
        f.flush()
        yield
    finally:
        f.seek(0)
        f.truncate()
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
