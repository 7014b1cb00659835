"""CPU fast paths for training and decoding: dropout (also on attention weights) and the fp32 matrix product.

The model files use plain `nn.Linear` and `nn.Dropout`; `accelerate(model)` swaps those modules, in a built
model and in place, for `Linear` and `Dropout` below. They have the same parameters and state dict and give
the same results up to float rounding, and they are plain `nn.Linear` / `nn.Dropout` everywhere the fast
paths do not apply: on CUDA, under autocast, in half precision, and under torch.compile. So the training
recipe, evaluation, translation, serving and the benchmarks call `accelerate` on every model they build or
load, whatever the device.

Dropout. torch draws one Bernoulli sample per element from the Mersenne Twister; that took about 14% of a
Transformer training step on two cores (bench/train_throughput.py under torch.profiler). Here each element
gets 16 random bits instead, cut from full-range 64-bit draws (four elements per draw), and is kept when
they are at or above a threshold: the drop probability is p rounded to the nearest 1/65536, and the mask
costs a third as much. The mask is the multiplier itself (0 or 1 / (1 - p)), so forward and backward are one
product each. The bits come from torch's default generator, so `torch.manual_seed` and the generator state
saved in checkpoints replay them exactly.

Linear. torch sends fp32 matrix products to MKL, which on AMD processors runs its AVX2 kernels; oneDNN,
which torch also ships (it is torch.compile's CPU backend), runs AVX-512 and on the shapes of a small
Transformer is 2-2.5x faster forward and 1.3-2x faster for the two backward products (AMD EPYC, 2
threads). `Linear` calls oneDNN through `torch.ops.mkldnn._linear_pointwise`, the op torch.compile emits
for a CPU linear layer, in a small autograd function; without gradients it also keeps the weight packed
in oneDNN's layout (`_reorder_linear_weight`, as torch.compile's frozen inference graphs do). The ops are
private, so they are used only if they exist and give the same products as `F.linear` on a probe at
import; otherwise `Linear` is `nn.Linear`.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def eager_fp32_cpu(*tensors: torch.Tensor) -> bool:
    """Every tensor fp32 on the CPU, outside autocast and torch.compile: where the fast paths of this module and
    of seq2seq/loss.py apply."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def keep_scale(shape: torch.Size, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dropout as a multiplier: 0 where an element is dropped, with probability p (to the nearest 1/65536),
    else 1 / (1 - p)."""
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # every bit uniform
    halves = bits.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    kept = halves >= -32768 + round(p * 65536)
    return kept.to(dtype).mul_(1.0 / (1.0 - p))  # twice as fast as torch.where(kept, 1 / (1 - p), 0.0)


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu":
            return super().forward(x)
        # One product forward and one backward (autograd keeps the multiplier): a boolean mask took a fill
        # and a scaling each way, a third more time on a [2256, 1024] activation.
        return x * keep_scale(x.shape, self.p, x.dtype)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention, whose dropout on the attention weights is `keep_scale`'s on the CPU.

    With dropout, torch runs its math path there and draws the mask with bernoulli_ (a Mersenne Twister
    sample per weight), then divides and multiplies by it. The same path written out with keep_scale and
    bmm: about 2% faster Transformer training steps (bench model, ONEDNN_MAX_CPU_ISA=AVX2). q, k, v: [B, H, T or S,
    D or Dv]; attn_mask: True = attend.
    """
    fast = dropout_p > 0.0 and eager_fp32_cpu(q) and (attn_mask is None or attn_mask.dtype == torch.bool)
    if not fast:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    (b, h, t, d), s, dv = q.shape, k.size(2), v.size(3)
    # [B * H, T, D] batches for bmm, each made once; bmm reads k transposed without a copy
    q3, k3, v3 = (q * d**-0.5).reshape(b * h, t, d), k.reshape(b * h, s, d), v.reshape(b * h, s, dv)
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, t, s)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    if is_causal:  # position t sees keys 0..t, as torch's is_causal
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool).triu_(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    weights = weights * keep_scale(weights.shape, dropout_p)
    return torch.bmm(weights.view(b * h, t, s), v3).view(b, h, t, dv)


def onednn_matmul(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_t.T (+ bias) for 2-D fp32 CPU tensors, by oneDNN; either operand may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


# oneDNN caches one compiled product per shape, 1024 by default, and token batches have many shapes: on
# the demo model the cache grew training's memory by ~1 GB over a few hundred steps. A cache of 16 is as
# fast there (20 batches x 3 passes: 4,100-4,200 target tokens/s either way) and stops growing at +0.3 GB.
# oneDNN reads this when it builds its first product, which the probe below does.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def _onednn_works() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(33, n, generator=g) for n in (17, 17, 5))
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        # a plain product, one of two transposed views (the weight-gradient shape), one with a packed weight
        return (
            torch.allclose(onednn_matmul(a, b.T.contiguous().T), a @ b.T, atol=1e-4)
            and torch.allclose(onednn_matmul(a.T, c.T), a.T @ c, atol=1e-4)
            and torch.allclose(onednn_matmul(a, packed), a @ b.T, atol=1e-4)
        )
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_works()


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return ONEDNN and eager_fp32_cpu(x, weight)


def product(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_t.T (+ bias) for 2-D CPU tensors: by oneDNN in fp32 where it works, else F.linear (other dtypes, such
    as the float64 of gradient checks). For the hand-written gradients of seq2seq/loss.py and luong_loop.py."""
    if ONEDNN and a.dtype == torch.float32:
        return onednn_matmul(a, b_t, bias)
    return F.linear(a, b_t, bias)


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b, and its gradients, as three oneDNN products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return onednn_matmul(x2, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.size(-1))
        grad_x = onednn_matmul(g2, weight.T).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # oneDNN copies a transposed first operand: transpose the smaller one
            wide = weight.size(0) > weight.size(1)
            grad_w = onednn_matmul(x2.T, g2.T).T.contiguous() if wide else onednn_matmul(g2.T, x2.T)
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear on oneDNN on the CPU. Without gradients (decoding, validation) the weight is also kept
    in oneDNN's blocked layout, repacked only when it changes: 15-50% faster decoder products."""

    _packed: tuple[tuple[int, int], torch.Tensor] | None = None  # ((weight address, version), packed weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            return OneDNNLinear.apply(x, self.weight, self.bias)
        out = onednn_matmul(x.reshape(-1, x.size(-1)), self.packed_weight(), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def packed_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)  # an optimizer step or load_state_dict bumps it
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "_packed"}  # oneDNN tensors don't pickle


def accelerate(model: nn.Module) -> nn.Module:
    """Give every nn.Linear and nn.Dropout of `model` the CPU fast path, in place; returns `model`.

    Only each module's class changes: its parameters (shared ones stay shared), buffers, state-dict keys and
    hooks are the same objects, so this may come before or after loading weights, and draws no random numbers.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is nn.Dropout:
            module.__class__ = Dropout
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` for decoding on the CPU with int8 weights.

    torch's dynamic quantisation (fbgemm/oneDNN int8 kernels, with AVX2 or AVX-512 VNNI): the weights of every
    nn.Linear (per output channel) and nn.LSTM/nn.GRU are stored in int8, and activations are quantised
    per batch on the fly. Beam search on the demo-size models is about 1.5x faster and BLEU moves by a few
    tenths (bench/decode_speed.py, tests/test_beam.py). The model itself is left as it is.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model).eval()
    for module in model.modules():  # torch quantises exactly nn.Linear: undo `accelerate` on the copy
        if type(module) is Linear:
            module.__class__ = nn.Linear
            module.__dict__.pop("_packed", None)
    spec = {nn.Linear: per_channel_dynamic_qconfig, nn.LSTM: default_dynamic_qconfig, nn.GRU: default_dynamic_qconfig}
    with warnings.catch_warnings():  # torch announces the move of this API to torchao; it works in the pinned torch
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def for_decoding(model: nn.Module, quantize: str) -> nn.Module:
    """The model ready to decode: its int8 copy with quantize == "int8" on the CPU, else `accelerate(model)`."""
    if quantize == "int8" and next(model.parameters()).device.type == "cpu":
        return quantize_int8(model)
    return accelerate(model)
