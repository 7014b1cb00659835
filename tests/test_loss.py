"""The training loss without full-size logits: the same value and gradients as F.cross_entropy of F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seq2seq.loss import output_loss
from seq2seq.tokenizer import PAD_ID


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).flatten(0, 1)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=PAD_ID, label_smoothing=smoothing, reduction="sum")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows_per_chunk", [7, 1 << 20])  # several chunks, and one
def test_the_chunked_loss_and_its_gradients_equal_cross_entropy(
    smoothing: float, rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("seq2seq.loss.CHUNK_ELEMENTS", rows_per_chunk * 50)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    targets = torch.randint(1, 50, (3, 11), generator=g)
    targets[0, 8:] = PAD_ID  # padding contributes nothing, to the loss or the gradients
    targets[2, 3:] = PAD_ID

    results = []
    for loss_fn in (plain_loss, output_loss):
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, targets, smoothing)
        (0.37 * loss).backward()  # a scale, as the training loop's 1 / tokens
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (want, want_dh, want_dw), (got, got_dh, got_dw) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_dw, want_dw, rtol=1e-4, atol=1e-6)
    assert got_dh[0, 8:].abs().sum() == 0


def test_without_gradients_only_the_loss_is_computed() -> None:
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8)
    targets = torch.randint(1, 30, (20,))
    with torch.no_grad():
        torch.testing.assert_close(
            output_loss(hidden, weight, targets, 0.1), plain_loss(hidden[None], weight, targets[None], 0.1)
        )
