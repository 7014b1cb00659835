"""`make demo` then `make test`, in either order: the demo runs its preset as a DVC experiment and leaves the
committed params.yaml as it was, and the tests never read the working tree's params.yaml, whatever a preset
or a user did to it."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from tests.pipeline_fixtures import committed_params_text, make_workspace, run, toy_pair

pytestmark = pytest.mark.integration
DEMO_FILES = {"train": 300, "val": 20, "test_2016_flickr": 20}  # the demo's Multi30k file names, toy content


def toy_multi30k_mirror(mirror: Path) -> None:
    """A mirror holding files named as the demo preset's Multi30k URLs name them, with a toy corpus inside."""
    import random

    rng = random.Random(0)
    mirror.mkdir(parents=True)
    for split, n in DEMO_FILES.items():
        pairs = [toy_pair(rng) for _ in range(n)]
        for i, lang in enumerate(("en", "fr")):
            with gzip.open(mirror / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(pair[i] + "\n" for pair in pairs)


def tracked_changes(ws: Path, env: dict[str, str]) -> list[str]:
    return run(["git", "status", "--porcelain", "--untracked-files=no"], ws, env).stdout.splitlines()


def without_checksums(params_text: str) -> str:
    """The params.yaml text, comments kept, with no published checksums (the toy files cannot match them)."""
    rt, buf = YAML(), io.StringIO()
    doc = rt.load(params_text)
    doc["download"]["checksums"] = {}
    rt.dump(doc, buf)
    return buf.getvalue()


def test_the_demo_runs_as_an_experiment_and_the_config_tests_pass_after_it(tmp_path: Path) -> None:
    committed = without_checksums(committed_params_text())
    ws, env = make_workspace(tmp_path, committed, extra_files=("tests", "presets", "pyproject.toml"))
    toy_multi30k_mirror(tmp_path / "mirror")
    env["NMT_MIRROR"] = str(tmp_path / "mirror")
    preset = [sys.executable, "-m", "seq2seq.preset", "presets/demo.yaml"]

    # what `make demo` runs, cut to the download stage
    run([*preset, "--exp-run", "--", "download"], ws, env, timeout=600)
    assert (ws / "params.yaml").read_text(encoding="utf-8") == committed
    assert tracked_changes(ws, env) == []
    manifest = json.loads((ws / "data/raw/manifest.json").read_text())
    assert manifest["multi30k_train.en"]["lines"] == DEMO_FILES["train"]  # the preset's datasets were used
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], ws, env).stdout)
    experiments = [
        exp["data"] for row in shown for group in row.get("experiments") or [] for exp in group.get("revs", [])
    ]
    demo = yaml.safe_load((ws / "presets/demo.yaml").read_text())
    recorded = [e["params"]["params.yaml"]["data"]["data"]["train"] for e in experiments]
    assert demo["data.train"] in recorded, shown

    # a run that fails midway (a changed param reruns download, and the mirror is empty) puts params.yaml back too
    env["NMT_MIRROR"] = str(tmp_path / "empty-mirror")
    (tmp_path / "empty-mirror").mkdir()
    failed = subprocess.run(
        [*preset, "--exp-run", "--", "-S", "download.retries=1", "download"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode != 0
    assert "mirror" in failed.stdout + failed.stderr
    assert (ws / "params.yaml").read_text(encoding="utf-8") == committed

    # the old `make demo` rewrote params.yaml in place: the tests must not care
    run([*preset], ws, env)
    assert tracked_changes(ws, env) == [" M params.yaml"]
    config_tests = run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_config.py"],
        ws,
        env,
        timeout=600,
    )
    assert " passed" in config_tests.stdout and "failed" not in config_tests.stdout
