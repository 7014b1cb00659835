"""What every `python -m stages.<name>` entry point shares: its argument parser and the way it fails
(nmt-translate fails the same way)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from seq2seq.redact import redact, redact_all_logs


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m stages.<stage> [--params PATH]`; --help prints the stage's docstring.
    Every stage starts here, so this is also where its logs start masking credentials in URLs."""
    redact_all_logs()
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
    sys.exit(f"{prog}: error: {redact(str(err))}")
