"""Apply a preset (a YAML file of dotted keys -> values) to params.yaml, keeping its comments.

    python -m seq2seq.preset presets/demo.yaml          # edits params.yaml in place

Like `dvc exp run -S key=value`, this changes the workspace's params.yaml; `git checkout params.yaml`
returns to the committed recipe. The result is validated before anything is written.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from seq2seq.config import ParamsError, parse_params, set_dotted
from seq2seq.textio import atomic_write


def apply_preset(preset: Path, params_path: Path = Path("params.yaml")) -> list[str]:
    """Set every dotted key of `preset` in `params_path`; returns the keys changed."""
    overrides = yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {}
    if not isinstance(overrides, dict):
        raise ParamsError(f"{preset}: expected a mapping of dotted keys to values")
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(Path(params_path).read_text(encoding="utf-8"))
    for key, value in overrides.items():
        try:
            set_dotted(doc, key, value)
        except ParamsError as err:
            raise ParamsError(f"{preset}: {err}") from None
    buf = io.StringIO()
    rt.dump(doc, buf)
    parse_params(yaml.safe_load(buf.getvalue()), f"{params_path} with {preset}")
    with atomic_write(Path(params_path)) as f:
        f.write(buf.getvalue())
    return list(overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    try:
        keys = apply_preset(args.preset, args.params)
    except (ParamsError, FileNotFoundError) as err:
        sys.exit(f"preset: {err}")
    print(f"preset: set {len(keys)} keys in {args.params} from {args.preset}")


if __name__ == "__main__":
    main()
