"""The train recipe's parts that need no training: the state a checkpoint stores and the loss log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.train import LossLog, TrainState


def test_train_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    state = TrainState(step=40, epoch=3, batch_index=7, tokens_seen=12345, trained_seconds=61.5)
    state.record_validation({"dev_loss": 2.5, "dev_ppl": 12.2}, "dev_loss")
    state.mlflow_run_id = "abc123"
    torch.save({"train_state": state.to_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_state"]
    assert TrainState.from_dict(loaded) == state


@pytest.mark.parametrize(
    ("metric", "values", "best"), [("dev_loss", [3.0, 2.0, 2.5], 2.0), ("dev_bleu", [10, 12, 11], 12)]
)
def test_record_validation_keeps_the_best_and_counts_the_rest(metric: str, values: list[float], best: float) -> None:
    state = TrainState()
    improved = []
    for step, value in enumerate(values, start=1):
        state.step = step * 100
        improved.append(state.record_validation({metric: value}, metric))
    assert improved == [True, True, False]
    assert (state.best_value, state.best_step, state.evals_without_improvement) == (best, 200, 1)


def test_loss_log_is_cut_back_to_the_checkpoint_and_averages_by_tokens(tmp_path: Path) -> None:
    path = tmp_path / "losses.tsv"
    log = LossLog(path, through_step=0)
    for step, (loss, tokens) in enumerate([(4.0, 100), (2.0, 300), (9.0, 10)], start=1):
        log.add(step, torch.tensor(loss), 0.1, tokens)
    log.sync()
    log.close()
    resumed = LossLog(path, through_step=2)  # the checkpoint covers steps 1-2; step 3 will be redone
    assert [line.split("\t")[0] for line in path.read_text().splitlines()] == ["step", "1", "2"]
    resumed.add(3, torch.tensor(1.0), 0.1, 100, data_seconds=0.25)
    window = resumed.window()
    assert (window.loss, window.tokens, window.data_seconds) == (1.0, 100, 0.25)
    resumed.add(4, torch.tensor(1.0), 0.1, 100)
    assert resumed.window().data_seconds == 0.0  # each window counts its own steps' time
    resumed.close()
    assert resumed.history(log_every=2) == [(2, (4.0 * 100 + 2.0 * 300) / 400, 0.1), (4, 1.0, 0.1)]
