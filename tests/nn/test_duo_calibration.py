"""DuoAttention calibration (effattn.nn.duo_calibration): its home beside the model, the kv name that
forwards to it, the gates hook left clean, and its doctests."""

from __future__ import annotations

import doctest

import pytest
import torch

import effattn.kv
import effattn.nn.duo_calibration
from effattn.nn import LM, LMConfig, calibrate_duo_attention


def _lm(seed: int = 0) -> LM:
    torch.manual_seed(seed)
    return LM(LMConfig(vocab_size=40, dim=32, n_layers=2, heads=4, kv_heads=2)).eval()


def test_the_three_names_give_one_result():
    model = _lm()
    kw = dict(num_samples=2, seq_len=24, recent=4, return_scores=True)
    mask, scores = calibrate_duo_attention(model, **kw)
    for other in (effattn.kv.calibrate_duo_attention(model, **kw), model.calibrate_duo_attention(**kw)):
        assert torch.equal(other[0], mask) and torch.equal(other[1], scores)
    with pytest.raises(TypeError, match="model must be an effattn.nn.LM"):
        effattn.kv.calibrate_duo_attention(torch.nn.Linear(2, 2))


def test_error_scores_put_one_head_at_a_time_under_the_streaming_mask():
    """The 'error' score of a head is the logits' error with that head (only) streaming: a model whose
    attention layer is the streaming pattern itself for that head gives the same logits."""
    model = _lm()
    ids, tail = effattn.nn.duo_calibration.passkey_batch(40, 2, 24, 4, torch.Generator().manual_seed(0))
    stream = effattn.nn.duo_calibration.streaming_mask(4, 4)
    _, scores = calibrate_duo_attention(model, method="error", num_samples=2, seq_len=24, recent=4, return_scores=True)
    layer = model.blocks[1].mixer
    with torch.no_grad():
        ref = model(ids)[0][:, -tail:]
        layer.set_head_gates(torch.tensor([1.0, 0.0]), stream)
        out = model(ids)[0][:, -tail:]
        layer.set_head_gates(None)
    assert abs(((out - ref).pow(2).mean() / ref.pow(2).mean()).item() - scores[1, 1].item()) < 1e-6


@pytest.mark.parametrize("target", ["hidden", "logits"])
def test_gate_optimisation_sends_heads_whose_streaming_output_is_full_to_streaming(target):
    """The default (the paper's gates): a kv head whose values are zero outputs 0 under full and
    streaming attention alike, so only the L1 term acts on its gate and it goes to 0 (streaming); the
    other heads, whose streaming output differs, keep gates above it and are the retrieval heads."""
    model = _lm(seed=1)
    with torch.no_grad():
        for i in (0, 1):  # kv head 0 of layer 0 and kv head 1 of layer 1: values zero
            attn = model.blocks[i].mixer
            d = attn.head_dim
            h = 0 if i == 0 else 1
            attn.v_proj.weight[h * d : (h + 1) * d] = 0.0
    mask, gates = calibrate_duo_attention(
        model, target=target, num_samples=4, seq_len=32, recent=2, sinks=1, steps=60, l1=0.01, return_scores=True
    )
    assert gates[0, 0] == 0.0 and gates[1, 1] == 0.0, gates
    assert gates[0, 1] > 0.05 and gates[1, 0] > 0.05, gates
    assert mask.tolist() == [[False, True], [True, False]]
    assert all(b.mixer.head_gates is None for b in model.blocks)


def test_gates_are_removed_even_when_calibration_fails(monkeypatch):
    model = _lm()

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "grad", boom)  # fails after the gates are set, mid-training
    with pytest.raises(RuntimeError, match="boom"):
        calibrate_duo_attention(model, method="gates", num_samples=2, seq_len=24, recent=4)
    assert all(b.mixer.head_gates is None for b in model.blocks) and not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_docstring_examples_run():
    res = doctest.testmod(effattn.nn.duo_calibration, extraglobs={"torch": torch})
    assert res.failed == 0 and res.attempted > 0
