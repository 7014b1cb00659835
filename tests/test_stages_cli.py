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
