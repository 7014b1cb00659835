"""Every model family: shapes, masking (padding, future positions), incremental decoding, checkpoints."""

from __future__ import annotations

import copy
import runpy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seq2seq import luong_loop
from seq2seq.checkpoint import CheckpointError, load_model, save_checkpoint
from seq2seq.config import ModelParams, parse_params
from seq2seq.models import FAMILIES, build_model
from seq2seq.tokenizer import PAD_ID
from tests.pipeline_fixtures import REPO, committed_params

VOCAB = 50
TINY = {
    "transformer": {"d_model": 16, "n_heads": 2, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 32},
    "rnn": {"d_model": 16, "hidden": 16, "layers": 2},
    "attention_rnn": {"d_model": 16, "hidden": 16, "layers": 2},
}
VARIANTS = {
    "transformer-prenorm-sinusoidal": ("transformer", {"pre_norm": True, "positions": "sinusoidal"}),
    "transformer-postnorm-learned": (
        "transformer",
        {"pre_norm": False, "positions": "learned", "share_embeddings": False},
    ),
    "rnn-lstm-bidirectional-reversed": ("rnn", {"cell": "lstm", "bidirectional": True, "reverse_source": True}),
    "rnn-gru": ("rnn", {"cell": "gru", "bidirectional": False, "share_embeddings": False}),
    "attention-bahdanau-gru": ("attention_rnn", {"attention": "bahdanau", "cell": "gru"}),
    "attention-luong-lstm-reversed": (
        "attention_rnn",
        {"attention": "luong", "cell": "lstm", "reverse_source": True},
    ),
    # the demo's shape: teacher forcing runs seq2seq/luong_loop.py
    "attention-luong-lstm-one-layer": ("attention_rnn", {"attention": "luong", "cell": "lstm", "layers": 1}),
}


@pytest.fixture(scope="module")
def base_params() -> ModelParams:
    return parse_params(committed_params()).model


def tiny(base: ModelParams, family: str, **changes: object) -> ModelParams:
    """`base` with `family` chosen and its section shrunk to a tiny model (max_positions 32), plus `changes`."""
    raw = base.model_dump()
    raw["family"] = family
    raw[family].update(TINY[family], max_positions=32, **changes)
    return ModelParams.model_validate(raw)


@pytest.fixture(params=list(VARIANTS), scope="module")
def model(request, base_params):
    torch.manual_seed(0)
    family, changes = VARIANTS[request.param]
    return build_model(tiny(base_params, family, **changes), VOCAB).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of lengths 7, 4 and 1 (padded), targets of length 6."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (3, 7), generator=g)
    src[1, 4:] = PAD_ID
    src[2, 1:] = PAD_ID
    return src, torch.randint(4, VOCAB, (3, 6), generator=g)


def incremental_log_probs(model, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    memory, cache = model.encode(src), model.init_cache()
    steps = []
    for t in range(tgt_in.size(1)):
        log_probs, cache = model.decode_step(tgt_in[:, t], memory, cache)
        steps.append(log_probs)
    return torch.stack(steps, dim=1)


def test_shapes_and_parameter_count(model) -> None:
    src, tgt_in = batch()
    assert model(src, tgt_in).shape == (3, 6, VOCAB)
    log_probs, _ = model.decode_step(tgt_in[:, 0], model.encode(src), model.init_cache())
    assert log_probs.shape == (3, VOCAB) and log_probs.dtype == torch.float32
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0
    assert model.cfg.max_positions == 32


@torch.no_grad()
def test_padding_is_ignored(model) -> None:
    src, tgt_in = batch()
    logits = model(src, tgt_in)
    # more padding columns change nothing
    wider = torch.cat([src, torch.full((3, 5), PAD_ID)], dim=1)
    torch.testing.assert_close(model(wider, tgt_in), logits, atol=1e-5, rtol=1e-5)
    # a short sentence alone, without padding, gives what it gives inside the padded batch
    torch.testing.assert_close(model(src[1:2, :4], tgt_in[1:2]), logits[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(src[2:3, :1], tgt_in[2:3]), logits[2:3], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decoder_does_not_see_future_positions(model) -> None:
    src, tgt_in = batch()
    logits = model(src, tgt_in)
    changed = tgt_in.clone()
    changed[:, 3:] = torch.randint(4, VOCAB, (3, 3), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(model(src, changed)[:, :3], logits[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(src, changed)[:, 3:], logits[:, 3:])


@torch.no_grad()
def test_incremental_decoding_equals_teacher_forcing(model) -> None:
    src, tgt_in = batch(1)
    expected = F.log_softmax(model(src, tgt_in).float(), dim=-1)
    torch.testing.assert_close(incremental_log_probs(model, src, tgt_in), expected, atol=1e-5, rtol=1e-5)


def test_the_written_out_luong_loop_gives_the_step_by_step_loss_and_gradients(base_params) -> None:
    """In fp32 on the CPU the one-layer Luong LSTM trains through seq2seq/luong_loop.py; in float64 it steps
    through AttentionRNN.step under autograd. Same weights, same batch: same loss and gradients."""
    torch.manual_seed(0)
    fast = build_model(tiny(base_params, "attention_rnn", layers=1, attention="luong", cell="lstm"), VOCAB).eval()
    reference = copy.deepcopy(fast).double()
    src, tgt_in = batch(3)
    tgt_out = torch.cat([tgt_in[:, 1:], torch.full((3, 1), PAD_ID)], dim=1)  # a padded target position too
    assert fast.loop_written_out(torch.zeros(1)) and not reference.loop_written_out(torch.zeros(1).double())
    losses = [m(src, tgt_in, tgt_out, 0.1) for m in (fast, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0].double(), losses[1].double(), rtol=1e-5, atol=1e-5)  # float32: F.cross_entropy
    for (name, p), q in zip(fast.named_parameters(), reference.parameters(), strict=True):
        error = float((p.grad.double() - q.grad).norm() / q.grad.norm())  # relative: some gradients are ~1e-7
        assert error < 1e-4, f"gradient of {name}: relative error {error:.1e}"


def test_the_written_out_luong_loop_passes_gradcheck() -> None:
    """Every gradient of LuongLoop (embeddings, keys, encoder states, initial state, weights) against finite
    differences in float64, with a padded source position."""
    g = torch.Generator().manual_seed(0)
    b, t, s, e, h = 2, 3, 4, 3, 2
    shapes = [(b, t, e), (b, s, h), (b, s, h), (b, h), (b, h)]  # embeddings, keys, states, h0, c0
    shapes += [(4 * h, e + h), (4 * h, h), (4 * h,), (4 * h,), (h, 2 * h)]  # W_ih, W_hh, b_ih, b_hh, W_c
    emb, keys, states, h0, c0, w_ih, w_hh, b_ih, b_hh, w_c = (
        torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in shapes
    )
    src_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    inputs = (emb, keys, states, src_mask, h0, c0, w_ih, w_hh, b_ih, b_hh, w_c)
    assert torch.autograd.gradcheck(luong_loop.LuongLoop.apply, inputs)


@torch.no_grad()
def test_reordering_the_cache_follows_the_rows(model) -> None:
    src, tgt_in = batch(2)
    memory, cache = model.encode(src), model.init_cache()
    for t in range(2):
        _, cache = model.decode_step(tgt_in[:, t], memory, cache)
    index = torch.tensor([2, 0])
    reordered, _ = model.decode_step(tgt_in[index, 2], memory.index_select(index), model.reorder_cache(cache, index))
    full, _ = model.decode_step(tgt_in[:, 2], memory, cache)
    torch.testing.assert_close(reordered, full[index], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_checkpoint_round_trip(model, tmp_path: Path) -> None:
    family = next(name for name, (_, cls) in FAMILIES.items() if isinstance(model, cls))
    save_checkpoint(tmp_path / "model.pt", model, family, step=3)
    loaded, state = load_model(tmp_path / "model.pt")
    assert state["step"] == 3 and loaded.cfg == model.cfg
    src, tgt_in = batch()
    torch.testing.assert_close(loaded(src, tgt_in), model(src, tgt_in))


def format_1(model, family: str) -> dict:
    """`model` as a checkpoint of format 1 would hold it: one flat config with vocab_size inside and the RNN
    fields prefixed rnn_; a Transformer's attention projections apart, an RNN's output layer at the top."""
    renamed = {"cell", "hidden", "layers", "bidirectional", "reverse_source"}
    config = {f"rnn_{k}" if k in renamed else k: v for k, v in model.cfg.model_dump().items()}
    weights = {}
    for name, tensor in model.state_dict().items():
        if ".qkv_proj." in name or ".kv_proj." in name:
            fused = "qkv_proj" if ".qkv_proj." in name else "kv_proj"
            parts = ("q_proj", "k_proj", "v_proj") if fused == "qkv_proj" else ("k_proj", "v_proj")
            for part, chunk in zip(parts, tensor.chunk(len(parts)), strict=True):
                weights[name.replace(fused, part)] = chunk.clone()
        else:
            weights[name.removeprefix("output.")] = tensor
    return {"format": 1, "family": family, "config": {**config, "vocab_size": VOCAB}, "model": weights, "step": 7}


@torch.no_grad()
def test_a_format_1_checkpoint_is_refused_and_the_upgrade_script_converts_it(model, tmp_path: Path) -> None:
    family = next(name for name, (_, cls) in FAMILIES.items() if isinstance(model, cls))
    old = tmp_path / "old.pt"
    torch.save(format_1(model, family), old)
    with pytest.raises(CheckpointError, match=r"old\.pt: a checkpoint of format 1.*scripts/upgrade_checkpoint\.py"):
        load_model(old)
    upgrade_checkpoint = runpy.run_path(str(REPO / "scripts/upgrade_checkpoint.py"))  # a script, not a module
    upgrade_checkpoint["main"]([str(old), "--out", str(tmp_path / "new.pt")])
    loaded, state = load_model(tmp_path / "new.pt")
    assert state["step"] == 7 and loaded.cfg == model.cfg and loaded.vocab_size == VOCAB
    src, tgt_in = batch()
    torch.testing.assert_close(loaded(src, tgt_in), model(src, tgt_in))


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(model, tmp_path: Path) -> None:
    family = next(name for name, (_, cls) in FAMILIES.items() if isinstance(model, cls))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, family, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_model(path)
    torch.save({"format": 2, "family": family, "config": {"d_model": 3}, "vocab_size": 3, "model": {}, "step": 1}, path)
    with pytest.warns(UserWarning, match="digest"), pytest.raises(CheckpointError, match=r"model\.pt: its config does"):
        load_model(path)


def flip_a_byte_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit of `tensor`'s bytes where torch.save stored them, leaving the file a valid zip."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().numpy().tobytes()[:64])
    assert at > 0, "the tensor's bytes are stored as they are in memory"
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_a_tensor_is_refused_naming_the_file(model, tmp_path: Path) -> None:
    family = next(name for name, (_, cls) in FAMILIES.items() if isinstance(model, cls))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, family, step=1)
    largest = max(model.state_dict().values(), key=torch.Tensor.numel)
    flip_a_byte_inside(path, largest)
    with pytest.raises(CheckpointError, match=r"model\.pt: corrupt checkpoint: its tensors' sha256 is \w+ but it was"):
        load_model(path)


def test_checkpoints_without_a_digest_load_with_a_warning_and_the_script_adds_one(model, tmp_path: Path) -> None:
    family = next(name for name, (_, cls) in FAMILIES.items() if isinstance(model, cls))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, family, step=1)
    state = torch.load(path, weights_only=True)
    del state["tensors_sha256"]
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"model\.pt: written before checkpoints carried a digest"):
        load_model(path)
    upgrade_checkpoint = runpy.run_path(str(REPO / "scripts/upgrade_checkpoint.py"))
    upgrade_checkpoint["main"]([str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(path)


def test_text_and_incomplete_checkpoints_are_one_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: corrupt or unreadable checkpoint"):
        load_model(text)
    partial = tmp_path / "partial.pt"
    torch.save({"format": 2, "model": {}, "step": 3}, partial)
    with pytest.raises(
        CheckpointError, match=r"partial\.pt: not a model checkpoint: it lacks family, config, vocab_size"
    ):
        load_model(partial)


def test_each_family_is_built_from_its_own_section(base_params) -> None:
    for family, (config_class, model_class) in FAMILIES.items():
        params = base_params.model_copy(update={"family": family})
        model = build_model(params, VOCAB)
        assert isinstance(model, model_class) and isinstance(model.cfg, config_class)
        assert model.cfg is getattr(base_params, family) and model.vocab_size == VOCAB
