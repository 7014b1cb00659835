"""A short end-to-end check of the CUDA path: train (AMP), train under torchrun (DDP, 1 process), evaluate.

Run from the repository root on a GPU machine, with tokenized demo data already in <data>/tokenized
(and <data>/clean/test, <data>/raw for evaluate):

    python bench/gpu_check.py --data .gpucheck/data --workdir /tmp/gpucheck --minutes 1.5

It copies the code into --workdir, writes a params.yaml from params.yaml + presets/demo.yaml with
train.device set, runs the stages as subprocesses and prints one JSON line with what it measured.
MLflow logs to a local file store there (MLFLOW_ALLOW_FILE_STORE=true), so only mlflow-skinny is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def set_dotted(raw: dict, key: str, value: object) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def stage(workdir: Path, args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    print(f"$ {' '.join(args)}", flush=True)
    proc = subprocess.run(args, cwd=workdir, env=env)
    if proc.returncode != 0:
        sys.exit(f"gpu_check: {' '.join(args)} exited with {proc.returncode}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a data/ directory with tokenized/, clean/test/, raw/")
    ap.add_argument("--workdir", type=Path, required=True, help="where to copy the code and run (emptied first)")
    ap.add_argument("--device", default="cuda", help="train.device for the runs (default: cuda)")
    ap.add_argument("--minutes", type=float, default=1.5, help="train.max_minutes of the first run")
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("stages", "seq2seq", "flows"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(args.data, work / "data")

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in yaml.safe_load((REPO / "presets/demo.yaml").read_text()).items():
        set_dotted(raw, key, value)
    set_dotted(raw, "train.device", args.device)
    set_dotted(raw, "train.max_minutes", args.minutes)
    set_dotted(raw, "mlflow.tracking_uri", f"file://{work / 'mlruns'}")
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work), env.get("PYTHONPATH")]))
    result: dict = {"device": args.device}

    result["train_wall_s"] = stage(work, [sys.executable, "-m", "stages.train"], env)
    result["train"] = json.loads((work / "metrics/train.json").read_text())

    result["evaluate_wall_s"] = stage(work, [sys.executable, "-m", "stages.evaluate"], env)
    result["eval"] = json.loads((work / "metrics/eval.json").read_text())

    # DDP with one process through torchrun: a fresh recipe (another seed) so it trains, not resumes.
    set_dotted(raw, "train.seed", 2)
    set_dotted(raw, "train.max_minutes", min(args.minutes, 0.5))
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    result["ddp_wall_s"] = stage(work, [*torchrun, "-m", "stages.train"], env)
    result["ddp_train"] = json.loads((work / "metrics/train.json").read_text())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
