"""What every `python -m stages.<name>` entry point shares: its argument parser and the way it fails
(nmt-translate fails the same way)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m stages.<stage> [--params PATH]`; --help prints the stage's docstring."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="the parameters file (default: params.yaml)"
    )
    return parser


def fail(prog: str, err: BaseException | str) -> NoReturn:
    """Exit with status 1 and `<prog>: error: <message>` on stderr: the message names the file or key at
    fault, and a user needs no traceback to act on it."""
    sys.exit(f"{prog}: error: {err}")
