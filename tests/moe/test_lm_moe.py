"""LM with MoE feed-forward layers: layer patterns, aux losses, decoding, padding, MoH + MoE."""

import pytest
import torch

from effattn.moe import MoE
from effattn.nn import LM, LMConfig
from tests.helpers import assert_fp32_close


def _lm(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=40, dim=32, n_layers=3, heads=2, ffn="dense,moe", moe={"num_experts": 4, "top_k": 2})
    base.update(kw)
    return LM(LMConfig(**base))


def test_layer_pattern_and_aux_loss():
    model = _lm()
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU"]
    moe = model.blocks[1].mlp
    assert moe.hidden == model.blocks[0].mlp.gate.out_features // 2  # equal active parameters by default
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, _ = model(ids)
    aux = model.aux_loss()
    assert torch.equal(aux, moe.last_aux.loss)
    (logits.logsumexp(-1).mean() + aux).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert float(_lm(ffn="dense").aux_loss()) == 0.0


def test_moe_kwargs_and_all_moe_layers():
    model = _lm(
        ffn="moe",
        moe={
            "num_experts": 6,
            "top_k": 1,
            "hidden": 24,
            "router": "sigmoid",
            "shared_experts": 1,
            "lbl_scope": "global",
        },
    )
    moes = [b.mlp for b in model.blocks]
    assert all(isinstance(m, MoE) and m.hidden == 24 and m.shared is not None for m in moes)
    model(torch.randint(0, 40, (1, 5)))
    assert torch.allclose(model.aux_loss(), sum(m.last_aux.loss for m in moes))


@pytest.mark.parametrize("mixers", ["attention", "moh", "mamba2,attention"])
def test_decode_equals_full_forward(mixers):
    """Token-choice dropless routing is per token, so prefill + decoding equals one forward (MoH + MoE too)."""
    model = _lm(mixers=mixers).eval()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    logits, state = model(ids[:, :4])
    steps = [logits]
    for t in range(4, 11):
        logits, state = model(ids[:, t : t + 1], state)
        steps.append(logits)
    assert_fp32_close(torch.cat(steps, 1), full)
    out = model.generate(ids[:, :3], max_new_tokens=4, temperature=0.0)
    assert out.shape == (2, 7)


def test_left_padding_is_not_routed():
    model = _lm().eval()
    ids = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(3))
    alone, _ = model(ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)
    valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], 1)
    out, _ = model(padded, valid=valid)
    assert_fp32_close(out[:, 3:], alone)
    assert model.blocks[1].mlp.last_aux.num_tokens == 7


def test_bad_config():
    with pytest.raises(ValueError, match="ffn"):
        _lm(ffn="dense,sparse")
    with pytest.raises(ValueError, match="moe"):
        _lm(ffn="moe", moe=None)
    with pytest.raises(ValueError, match="top_k"):
        _lm(moe={"num_experts": 2, "top_k": 3})
