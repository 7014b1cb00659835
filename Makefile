# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   set up, then run the whole pipeline (dvc repro) on the small CPU demo preset
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Use the workspace's data mirror when it is there (no internet needed); else download upstream.
SHARED_DATA := $(wildcard ../shared/data)
export NMT_MIRROR ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)

.PHONY: setup demo wmt14 test lint mlflow-ui clean-outputs

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo runs as a DVC experiment (`dvc exp show` lists it); the committed params.yaml is left as it is.
demo: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m seq2seq.preset presets/demo.yaml --exp-run
	@cat metrics/eval.json

wmt14: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
