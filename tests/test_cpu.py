"""The CPU fast paths (seq2seq/cpu.py) compute what nn.Dropout and nn.Linear compute, and `accelerate`
puts them into a built model without changing its weights."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq import cpu
from seq2seq.config import TransformerConfig
from seq2seq.cpu import ONEDNN, Dropout, Linear, accelerate, keep_scale
from seq2seq.transformer import Transformer


def test_keep_scale_rate_values_and_replay() -> None:
    torch.manual_seed(0)
    scale = keep_scale(torch.Size([400, 1000]), 0.1)
    assert scale.dtype == torch.float32
    mask = scale == 0
    assert torch.equal(scale[~mask], torch.full_like(scale[~mask], 1 / 0.9))
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.003)
    # no structure across the four elements cut from one 64-bit draw
    for lane in range(4):
        assert mask.view(-1, 4)[:, lane].float().mean().item() == pytest.approx(0.1, abs=0.005)
    torch.manual_seed(0)
    assert torch.equal(keep_scale(torch.Size([400, 1000]), 0.1), scale)  # the default generator replays it
    assert not torch.equal(keep_scale(torch.Size([400, 1000]), 0.1), scale)
    assert keep_scale(torch.Size([3, 5]), 0.5, torch.bfloat16).dtype == torch.bfloat16


def test_dropout_scales_kept_values_and_gradients() -> None:
    dropout = Dropout(0.25)
    x = torch.randn(64, 300, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.02)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    dropout.eval()
    assert torch.equal(dropout(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("masked,causal", [(True, False), (False, True), (True, True)])
def test_attention_with_dropout_is_torchs_attention_times_the_multiplier(masked, causal, monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = mask[2, ..., 5:] = False  # padded keys
    mask = mask if masked else None
    # every weight kept and scaled by 1 / (1 - p): torch's attention without dropout, times that
    monkeypatch.setattr(cpu, "keep_scale", lambda shape, p: torch.full(shape, 1 / (1 - p)))
    results = []
    for attention, p in ((cpu.scaled_dot_product_attention, 0.2), (F.scaled_dot_product_attention, 0.0)):
        out = attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = out / 0.8 if p == 0.0 else out
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads))
    for ours, torchs in zip(*results, strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-5)


def test_attention_drops_weights_at_rate_p() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 8, 64, 16), torch.randn(1, 8, 64, 16)
    v = torch.eye(64).expand(1, 8, 64, 64)  # the output is the attention weights themselves
    weights = cpu.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    dropped = weights == 0
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.01)
    kept_sum = (weights * 0.75).sum(-1)  # undo the scaling: the kept share of each row's softmax
    assert kept_sum.mean().item() == pytest.approx(0.75, abs=0.02)


@pytest.mark.skipif(not ONEDNN, reason="torch has no oneDNN linear op here; Linear is nn.Linear")
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 1, 48)])
@pytest.mark.parametrize("out_features,bias", [(96, True), (16, True), (200, False)])
def test_linear_matches_f_linear_forward_and_backward(shape, out_features, bias) -> None:
    torch.manual_seed(0)
    layer = Linear(48, out_features, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], out_features)
    y = layer(x)
    assert y.grad_fn is not None and "OneDNN" in type(y.grad_fn).__name__  # the fast path did run
    y.backward(grad_out)
    ours = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad if bias else None)

    x.grad, layer.weight.grad = None, None
    if bias:
        layer.bias.grad = None
    reference = F.linear(x, layer.weight, layer.bias)
    reference.backward(grad_out)
    expected = (reference.detach(), x.grad, layer.weight.grad, layer.bias.grad if bias else None)
    for got, want in zip(ours, expected, strict=True):
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not ONEDNN, reason="torch has no oneDNN linear op here; Linear is nn.Linear")
def test_linear_without_gradients_uses_a_packed_weight_that_follows_updates() -> None:
    torch.manual_seed(0)
    layer = Linear(48, 300)
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    packed = layer._packed[1]
    with torch.no_grad():
        assert layer(x[:, :3]) is not None and layer._packed[1] is packed  # reused across calls and shapes
        layer.weight.add_(0.5)  # as an optimizer step does
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        assert layer._packed[1] is not packed
    pickle.loads(pickle.dumps(layer))  # the packed copy is not part of the module's state
    assert torch.equal(copy.deepcopy(layer).weight, layer.weight)


def test_linear_falls_back_where_onednn_does_not_apply() -> None:
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    assert "OneDNN" not in type(layer.double()(x.double()).grad_fn).__name__
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # autocast still decides the precision


@torch.no_grad()
def test_accelerate_swaps_the_layers_in_place_keeping_weights_ties_and_outputs() -> None:
    cfg = TransformerConfig(
        d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.1, max_positions=16,
        share_embeddings=True, pre_norm=True, positions="sinusoidal",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size=40).eval()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    src, tgt_in = torch.randint(4, 40, (3, 7)), torch.randint(4, 40, (3, 5))
    expected = model(src, tgt_in)

    assert accelerate(model) is model
    kinds = {type(m) for m in model.modules()}
    assert Linear in kinds and Dropout in kinds and nn.Linear not in kinds and nn.Dropout not in kinds
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    assert model.generator.weight is model.tgt_embed.weight  # the shared embedding stays shared
    torch.testing.assert_close(model(src, tgt_in), expected, atol=1e-5, rtol=1e-5)
