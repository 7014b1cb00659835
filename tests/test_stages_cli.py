"""Every stage has the same command line: `python -m stages.<name> [--params PATH]`, --help that does nothing
else, and one way to fail (a message naming the file at fault, exit status 1, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__")


def run_stage(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_every_dvc_stage_has_a_module_and_no_stage_imports_another() -> None:
    assert sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == STAGES
    for stage in STAGES:
        source = (REPO / "stages" / f"{stage}.py").read_text()
        assert "from stages" not in source and "import stages" not in source, stage


@pytest.mark.parametrize("stage", STAGES)
def test_help_prints_usage_and_does_nothing_else(stage: str, tmp_path: Path) -> None:
    proc = run_stage(stage, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m stages.{stage} [-h] [--params PARAMS]")
    assert "--params PARAMS  the parameters file (default: params.yaml)" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_missing_params_file_is_one_line_naming_it(stage: str, tmp_path: Path) -> None:
    proc = run_stage(stage, "--params", "elsewhere.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    # the last line: importing mlflow's pyfunc (export) prints a warning of its own before it
    assert proc.stderr.splitlines()[-1] == f"{stage}: error: elsewhere.yaml: not found (run from the repository root)"
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["not UTF-8", "a directory"])
def test_a_params_file_that_is_not_text_is_one_line_naming_it(kind: str, tmp_path: Path) -> None:
    if kind == "not UTF-8":
        (tmp_path / "p.yaml").write_bytes(b"data:\n  src_lang: en\n  name: caf\xe9\n")
        expected = "clean: error: p.yaml:3: not valid UTF-8 (invalid continuation byte at byte 32)"
    else:
        (tmp_path / "p.yaml").mkdir()
        expected = "clean: error: p.yaml: a directory, not a params file"
    proc = run_stage("clean", "--params", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == expected
    assert "Traceback" not in proc.stderr


def test_empty_hypotheses_and_an_empty_training_set_are_named_not_tracebacks(tmp_path: Path) -> None:
    from seq2seq.config import parse_params
    from seq2seq.textio import TextFormatError
    from stages.tokenize import tokenize
    from tests.pipeline_fixtures import tiny_params

    (tmp_path / "hyp").write_text("")
    (tmp_path / "ref").write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "seq2seq.score", "--hyp", "hyp", "--ref", "ref"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "score: no hypotheses to score (the hypothesis file is empty)"

    params = parse_params(tiny_params(tmp_path / "mirror"))
    clean = tmp_path / "clean"
    (clean / "test").mkdir(parents=True)
    for lang in params.data.langs:
        (clean / f"train.{lang}").write_text("")
        (clean / f"dev.{lang}").write_text("a\n")
        for name in params.data.test:
            (clean / "test" / f"{name}.{lang}").write_text("a\n")
    with pytest.raises(TextFormatError, match=r"train\.en.*: empty training text; nothing to train SentencePiece on"):
        tokenize(params, clean, tmp_path / "tokenized")
    assert not (tmp_path / "tokenized").exists()
