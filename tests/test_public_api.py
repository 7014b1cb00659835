"""seq2seq/__init__.py declares the core package's public API: every module but the stages' plumbing."""

from __future__ import annotations

import importlib
from pathlib import Path

import seq2seq

PLUMBING = {"cli", "device", "parallel", "paths", "progress"}  # shared by stages/, not promised to anyone else


def test_the_public_api_is_every_module_but_the_plumbing_and_each_imports() -> None:
    modules = {path.stem for path in Path(seq2seq.__file__).parent.glob("*.py")} - {"__init__"}
    assert sorted(seq2seq.__all__) == sorted(modules - PLUMBING)
    for name in seq2seq.__all__:
        importlib.import_module(f"seq2seq.{name}")
