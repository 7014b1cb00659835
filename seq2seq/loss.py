"""The training loss: label-smoothed cross-entropy of the output layer, summed over the real target tokens.

    loss = sum over target tokens t of  (1 - eps) * -log p(y_t) + eps * mean over the vocabulary v of -log p(v)

(Szegedy et al. 2016, section 7; Vaswani et al. section 5.4), where p = softmax(h_t W^T) for the decoder's
last hidden state h_t and the output matrix W (the generator). This is exactly what
`F.cross_entropy(logits, y, ignore_index=PAD_ID, label_smoothing=eps, reduction="sum")` computes.

On the CPU in fp32, `output_loss` gets there without the [tokens, vocabulary] logits of the whole batch: it
takes the real target rows only (no padding) in chunks, and for each chunk computes the logits, the loss
and, right away, the gradients with respect to h and W (softmax - target distribution, times W and h); the
backward pass only scales them. The products are the same three a plain forward + backward does, but the
logits, their log-softmax and its gradient never exist at full size, which saves their memory traffic:
about a third of the output layer's time on a 4,000-token batch with a 4,000-word vocabulary. Everywhere
else (CUDA, autocast, half precision) it is the plain F.cross_entropy of F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seq2seq import cpu
from seq2seq.tokenizer import PAD_ID

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32): big enough for efficient products, cache-friendly


def output_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy of `hidden` [..., D] @ `weight`.T [V, D] against `targets` [...] (PAD_ID
    ignored), summed over the real targets."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if not cpu.eager_fp32_cpu(hidden, weight):
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, ignore_index=PAD_ID, label_smoothing=smoothing, reduction="sum")
    real = targets != PAD_ID
    rows = max(1, CHUNK_ELEMENTS // weight.size(0))
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedOutputLoss.apply(hidden[real], weight, targets[real], smoothing, rows, want_grads)


class ChunkedOutputLoss(torch.autograd.Function):
    """The loss of `output_loss` over real rows, chunk by chunk, with its gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        smoothing: float,
        rows: int,
        want_grads: bool,
    ) -> torch.Tensor:
        vocab = weight.size(0)
        total = hidden.new_zeros(())
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros_like(weight) if want_grads else None
        mean_weight = weight.mean(dim=0)  # h @ mean_weight is the mean over v of the logits h @ W^T
        for start in range(0, hidden.size(0), rows):
            h, y = hidden[start : start + rows], targets[start : start + rows]
            logits = cpu.product(h, weight)  # h @ W^T: [n, V]
            top = logits.amax(dim=1)
            picked = logits.gather(1, y[:, None]).squeeze(1)
            e = logits.sub_(top[:, None]).exp_()  # exp(logits - top), in place: the only [n, V] tensor
            s = e.sum(dim=1)
            log_z = top + s.log()
            # -log p(y) = log_z - logit(y); the mean over v of -log p(v) = log_z - mean over v of the logits
            total += ((1 - smoothing) * (log_z - picked) + smoothing * (log_z - h @ mean_weight)).sum()
            if want_grads:
                # d loss / d logits = softmax - target distribution, which puts 1 - eps on y and eps / V on
                # every word: e / s - (1 - eps) onehot(y) - eps / V = (e - (1 - eps) s onehot(y)) / s - eps / V.
                # The 1 / s scales rows of the small operands, and the constant eps / V comes off after the
                # loop, once, instead of two more passes over the [n, V] logits.
                e.scatter_add_(1, y[:, None], ((smoothing - 1) * s)[:, None])
                inv_s = s.reciprocal()[:, None]
                grad_hidden[start : start + rows] = cpu.product(e, weight.T).mul_(inv_s)  # (e @ W) / s
                grad_weight += cpu.product((h * inv_s).T, e.T).T  # e^T @ (h / s), the small operand transposed
        if want_grads:  # the eps / V term: (eps / V) 1 @ W = eps mean(W) for every row, (eps / V) 1^T @ h per word
            grad_hidden.sub_(mean_weight, alpha=smoothing)
            grad_weight.sub_(hidden.sum(dim=0), alpha=smoothing / vocab)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None, None, None
