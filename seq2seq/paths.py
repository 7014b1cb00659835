"""Where the stages read and write, relative to the repository root: the deps and outs of dvc.yaml.

Each stage function takes its paths as arguments and uses these as the defaults, so every path is spelled
once in the code (dvc.yaml spells them again, for DVC to know what to track).
"""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")  # download: <dataset>.<lang> and manifest.json
DOWNLOADS = Path("data/downloads")  # download's cache of fetched files (not a DVC out)
CLEAN = Path("data/clean")  # clean: {train,dev}.<lang>, test/<name>.<lang>
TOKENIZED = Path("data/tokenized")  # tokenize: spm.model, <split>.<lang>.bin/.idx, meta.json
SPM_MODEL = TOKENIZED / "spm.model"
MODELS = Path("models")  # train: model.pt, train_run.json; export: export.json
MODEL = MODELS / "model.pt"
RUN_FILE = MODELS / "train_run.json"  # the MLflow run that evaluate and export log to
EXPORT = MODELS / "export.json"
EVAL = Path("eval")  # evaluate: the hypotheses
METRICS = Path("metrics")  # clean.json, train.json, eval.json
PLOTS = Path("plots")  # train_loss.csv, bleu_by_length/, evaluate.png
DVC_LOCK = Path("dvc.lock")
