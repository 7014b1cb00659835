"""Presets: YAML files of dotted keys -> values, applied to params.yaml (presets/demo.yaml, ...).

    python -m seq2seq.preset presets/demo.yaml --exp-run   # the pipeline as a DVC experiment (what `make demo` does)
    python -m seq2seq.preset presets/demo.yaml             # edit params.yaml in place, keeping its comments

`--exp-run` runs `dvc exp run -S key=value ...` with the preset's values: DVC records the experiment
(`dvc exp show` lists its params and metrics) and leaves its outputs in the workspace. DVC writes the values
into params.yaml for the run; they are taken out again when it ends (also on failure or Ctrl-C), so the
committed recipe stays as it was and `git status` stays clean. Arguments after `--` go to `dvc exp run`
(e.g. `-- -S train.max_steps=200`, or a stage name). Either way the preset is validated against the
params schema before anything runs or is written.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from seq2seq.config import ParamsError, parse_params, set_dotted
from seq2seq.textio import atomic_write


def read_preset(preset: Path) -> dict[str, Any]:
    """The preset's dotted keys and values."""
    try:
        overrides = yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ParamsError(f"{preset}: cannot read the preset ({err})") from None
    if not isinstance(overrides, dict):
        raise ParamsError(f"{preset}: expected a mapping of dotted keys to values")
    return overrides


def preset_applied(preset: Path, params_path: Path) -> tuple[str, list[str]]:
    """params.yaml's text with the preset's values set (comments kept), validated; and the keys set."""
    overrides = read_preset(preset)
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
    return buf.getvalue(), list(overrides)


def apply_preset(preset: Path, params_path: Path = Path("params.yaml")) -> list[str]:
    """Set every dotted key of `preset` in `params_path`; returns the keys changed."""
    text, keys = preset_applied(preset, params_path)
    with atomic_write(Path(params_path)) as f:
        f.write(text)
    return keys


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`; JSON values are valid in DVC's (Hydra's) override grammar."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def exp_run(preset: Path, dvc_args: list[str], params_path: Path = Path("params.yaml"), dvc: str = "dvc") -> int:
    """`dvc exp run` with the preset's values; params.yaml is byte for byte as before when it returns."""
    preset_applied(preset, params_path)  # a bad preset fails here, before DVC touches anything
    before = Path(params_path).read_bytes()
    try:
        return subprocess.run([dvc, "exp", "run", *set_param_args(read_preset(preset)), *dvc_args]).returncode
    finally:
        if Path(params_path).read_bytes() != before:
            with atomic_write(Path(params_path), "wb") as f:
                f.write(before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.preset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preset", type=Path, help="a YAML file of dotted params keys -> values (presets/*.yaml)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (params.yaml)")
    parser.add_argument(
        "--exp-run",
        action="store_true",
        help="run `dvc exp run` with the preset's values instead of editing params.yaml",
    )
    parser.epilog = "With --exp-run, arguments after `--` are passed on to `dvc exp run`."
    argv = sys.argv[1:] if argv is None else argv
    dvc_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        if args.exp_run:
            sys.exit(exp_run(args.preset, dvc_args, args.params))
        if dvc_args:
            parser.error("arguments after `--` are for `dvc exp run`: add --exp-run")
        keys = apply_preset(args.preset, args.params)
    except (ParamsError, FileNotFoundError) as err:
        sys.exit(f"preset: {err}")
    print(f"preset: set {len(keys)} keys in {args.params} from {args.preset}")


if __name__ == "__main__":
    main()
