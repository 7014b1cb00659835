"""The teacher-forced decoder loop of the Luong attention RNN, forward and backward written out (CPU, fp32).

AttentionRNN.forward steps through the target positions one by one: an LSTM step on [y_{t-1}; h~_{t-1}],
attention over the encoder states, h~_t = tanh(W_c [c_t; h_t]). Under autograd each step is a few dozen
small operations, its backward as many again, and the weight gradients are small products summed step by
step. On the demo model (about 60 sentences a batch) that bookkeeping, not arithmetic, took most of a
training step. Here the same loop is one autograd function for a one-layer LSTM with input feeding:

forward    the embeddings' share of the LSTM gates for every position in one product; then per step one
           product for the recurrent share ([h~_{t-1}; h_{t-1}] against [W_ih's feed columns, W_hh]), the
           gates, the attention (two row-times-matrix bmm's) and W_c; what backward needs is kept in
           time-major buffers.
backward   the derivatives of the gates and tanh's for all steps at once, then per step, from the last
           position back, only what the recurrence needs: dh~_t -> d[c_t; h_t] -> the attention's and the
           cell's gradients -> d[h~_{t-1}; h_{t-1}] and dc_{t-1}. The weight gradients (W_ih, W_hh, the
           biases, W_c) and those of the keys and encoder states are one product each over all steps.

The arithmetic is the same as nn.LSTM's and the attention's in attention_rnn.py, so results agree up to
float rounding (tests/test_models.py). Measured on the demo model (bench/train_throughput.py's demo line,
2 cores): about 30% more target tokens per second natively and under ONEDNN_MAX_CPU_ISA=AVX2.
"""

from __future__ import annotations

import torch
from torch import nn

from seq2seq import cpu
from seq2seq.rnn import RNNMemory


def decoder_outputs(
    embedded: torch.Tensor, keys: torch.Tensor, memory: RNNMemory, lstm: nn.LSTM, w_c: torch.Tensor
) -> torch.Tensor:
    """h~_t for every target position, [B, T, H], from the embedded targets [B, T, E], the attention keys
    W_a h_j [B, S, H] and the encoder's memory, whose final state starts the one-layer `lstm`."""
    lstm_weights = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
    h0, c0 = memory.h[:, 0], memory.c[:, 0]
    return LuongLoop.apply(embedded, keys, memory.states, memory.src_mask, h0, c0, *lstm_weights, w_c)


class LuongLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, keys, states, src_mask, h, c, w_ih, w_hh, b_ih, b_hh, w_c):
        (b, t_len, e), hid, s = emb.shape, h.size(1), keys.size(1)
        w_emb = w_ih[:, :e].contiguous()  # the gates' embedding columns; oneDNN wants dense operands
        w_rec = torch.cat([w_ih[:, e:], w_hh], dim=1)  # [4H, 2H]: against [h~_{t-1}; h_{t-1}]
        emb_rows = emb.transpose(0, 1).reshape(t_len * b, e)  # time-major, so each step's rows are contiguous
        emb_gates = cpu.product(emb_rows, w_emb, b_ih + b_hh).view(t_len, b, 4 * hid)
        pad_bias = torch.zeros(b, 1, s, dtype=emb.dtype).masked_fill_(~src_mask[:, None, :], float("-inf"))
        keys_t, states_t = keys.transpose(1, 2), states.transpose(1, 2)  # bmm reads them transposed, no copy

        new = emb.new_empty
        gates, cells, tanh_cells = new(t_len, b, 4 * hid), new(t_len + 1, b, hid), new(t_len, b, hid)
        inputs, ctx_h, out = new(t_len, b, 2 * hid), new(t_len, b, 2 * hid), new(t_len, b, hid)
        weights = []  # the attention weights a_t, [B, 1, S] each
        cells[0] = c
        feed = h.new_zeros(b, hid)
        for t in range(t_len):
            torch.cat([feed, h], dim=1, out=inputs[t])
            g = torch.add(cpu.product(inputs[t], w_rec), emb_gates[t], out=gates[t])
            g[:, : 2 * hid].sigmoid_()  # input and forget gates (nn.LSTM's order: i, f, g, o)
            g[:, 2 * hid : 3 * hid].tanh_()
            g[:, 3 * hid :].sigmoid_()
            i, f, g_cell, o = g.chunk(4, dim=1)
            c = torch.mul(f, cells[t], out=cells[t + 1]).addcmul_(i, g_cell)
            h = o * torch.tanh(c, out=tanh_cells[t])
            # scores h_t^T W_a h_j as a row times a matrix: 8x faster than bmm(keys, h[:, :, None]) here
            scores = torch.baddbmm(pad_bias, h[:, None, :], keys_t)
            weights.append(torch.softmax(scores, dim=2))
            context = torch.bmm(weights[t], states).squeeze(1)
            torch.cat([context, h], dim=1, out=ctx_h[t])
            feed = torch.tanh(cpu.product(ctx_h[t], w_c), out=out[t])
        weights = torch.cat(weights, dim=1)  # [B, T, S]
        steps = gates, cells, tanh_cells, inputs, ctx_h, weights, out
        ctx.save_for_backward(emb_rows, keys, states_t, w_emb, w_rec, w_c, *steps)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, d_out):
        emb_rows, keys, states_t, w_emb, w_rec, w_c, *steps = ctx.saved_tensors
        gates, cells, tanh_cells, inputs, ctx_h, weights, out = steps
        (t_len, b, hid), e = out.shape, emb_rows.size(1)
        # the derivatives of each step's nonlinearities, for all steps at once
        i, f, g_cell, o = gates.chunk(4, dim=2)
        d_gates_dc = torch.cat([g_cell * i * (1 - i), cells[:-1] * f * (1 - f), i * (1 - g_cell * g_cell)], dim=2)
        d_gate_o_dh = tanh_cells * o * (1 - o)
        d_cell_dh = o * (1 - tanh_cells * tanh_cells)
        d_tanh_out = 1 - out * out
        d_pre_out = d_out.transpose(0, 1) * d_tanh_out  # through h~_t = tanh(pre_t), from the loss

        d_pre, d_gates = torch.empty_like(out), torch.empty_like(gates)
        d_ctx_h, d_scores = [], []
        d_feed, d_h, d_c = (d_out.new_zeros(b, hid) for _ in range(3))  # what step t + 1 sends back
        for t in reversed(range(t_len)):
            dp = torch.addcmul(d_pre_out[t], d_feed, d_tanh_out[t], out=d_pre[t])
            d_ch = cpu.product(dp, w_c.T)  # d[c_t; h_t]
            d_ctx_h.append(d_ch)
            d_weights = torch.bmm(d_ch[:, None, :hid], states_t).squeeze(1)
            d_score = torch._softmax_backward_data(d_weights, weights[:, t], 1, d_weights.dtype)
            d_scores.append(d_score)
            d_h = torch.baddbmm((d_ch[:, hid:] + d_h)[:, None, :], d_score[:, None, :], keys).squeeze(1)
            d_c = torch.addcmul(d_c, d_h, d_cell_dh[t])
            dg = d_gates[t]
            torch.mul(d_gates_dc[t].view(b, 3, hid), d_c[:, None, :], out=dg[:, : 3 * hid].view(b, 3, hid))
            torch.mul(d_gate_o_dh[t], d_h, out=dg[:, 3 * hid :])
            d_c = d_c * f[t]
            d_inputs = cpu.product(dg, w_rec.T)
            d_feed, d_h = d_inputs[:, :hid], d_inputs[:, hid:]

        d_ctx_h, d_scores = torch.stack(d_ctx_h[::-1]), torch.stack(d_scores[::-1])  # [T, B, 2H], [T, B, S]
        dg_rows = d_gates.view(t_len * b, 4 * hid)
        d_emb = cpu.product(dg_rows, w_emb.T).view(t_len, b, e).transpose(0, 1)
        d_w_rec = cpu.product(dg_rows.T, inputs.view(t_len * b, 2 * hid).T)
        d_w_ih = torch.cat([cpu.product(dg_rows.T, emb_rows.T), d_w_rec[:, :hid]], dim=1)
        d_bias = dg_rows.sum(0)
        d_w_c = cpu.product(d_pre.view(t_len * b, hid).T, ctx_h.view(t_len * b, 2 * hid).T)
        d_keys = torch.bmm(d_scores.permute(1, 2, 0), ctx_h[:, :, hid:].transpose(0, 1))  # sum_t dscore_t h_t
        d_states = torch.bmm(weights.transpose(1, 2), d_ctx_h[:, :, :hid].transpose(0, 1))  # sum_t a_t dc_t
        return d_emb, d_keys, d_states, None, d_h, d_c, d_w_ih, d_w_rec[:, hid:], d_bias, d_bias, d_w_c
