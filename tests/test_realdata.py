"""The demo on real data (Multi30k en-fr from ../shared/data), the way `make demo` runs it: the preset as a
DVC experiment (`python -m seq2seq.preset presets/demo.yaml --exp-run`) in a git clone of the project.

Skipped when ../shared/data is absent. By default training is cut to 300 of the preset's steps (a couple
of CPU minutes; steps, not minutes, so the result does not depend on machine load) and the bar is low: the
chain works on real text and the model learns (the dev loss far below a unigram model's 5.8 nats;
an attention RNN this young scores only a few BLEU: its attention is learnt between steps 400 and 1,000).
NMT_FULL_DEMO=1 runs the preset whole, as `make demo` does, and holds it to its promise of at least 40 BLEU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_fixtures import REPO, committed_params_text, make_workspace, run

SHARED_DATA = REPO.parent / "shared" / "data"
FULL = os.environ.get("NMT_FULL_DEMO") == "1"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "multi30k").is_dir(), reason=f"{SHARED_DATA} is absent"),
]


def test_the_demo_on_multi30k(tmp_path: Path) -> None:
    ws, env = make_workspace(tmp_path, committed_params_text(), extra_files=("presets",))
    env["NMT_MIRROR"] = str(SHARED_DATA)
    shorter = [] if FULL else ["--", "-S", "train.max_steps=300"]

    run([sys.executable, "-m", "seq2seq.preset", "presets/demo.yaml", "--exp-run", *shorter], ws, env, timeout=3600)

    assert (ws / "params.yaml").read_text(encoding="utf-8") == committed_params_text()
    manifest = json.loads((ws / "data/raw/manifest.json").read_text())
    assert manifest["multi30k_train.en"]["lines"] == 29000
    assert manifest["multi30k_test_2016.fr"]["lines"] == 1000
    clean = json.loads((ws / "metrics/clean.json").read_text())
    assert clean["kept_pairs"] > 28900
    train = json.loads((ws / "metrics/train.json").read_text())
    budget = yaml.safe_load((ws / "presets/demo.yaml").read_text())["train.max_steps"]
    assert train["steps"] == (budget if FULL else 300)
    scores = json.loads((ws / "metrics/eval.json").read_text())["multi30k_test_2016"]
    assert scores["n_sentences"] == 1000
    print(f"demo: {train['steps']} steps, dev loss {train['dev_loss']}, BLEU {scores['bleu']}")
    if FULL:
        assert scores["bleu"] >= 40.0
    else:
        assert train["dev_loss"] < 4.5
        assert scores["bleu"] >= 1.0
