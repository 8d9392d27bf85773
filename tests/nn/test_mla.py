"""MLA: plain vs absorbed forms, decode vs full, padding, state size, and exact GQA -> MLA conversion."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import effattn.nn.mla
from effattn.nn.attention import Attention, WindowKVCache
from effattn.nn.mla import MLA, mla_from_gqa
from tests.helpers import assert_fp32_close

DIM = 32


def _mla(seed: int = 0, **kw) -> MLA:
    torch.manual_seed(seed)
    args = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    args.update(kw)
    return MLA(DIM, 4, **args)


def _x(B: int = 2, T: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed))


def test_plain_matches_formula():
    """The plain form equals the DeepSeek-V2 formulas written out with materialized softmax."""
    m = _mla(q_lora_rank=12)
    x = _x()
    B, T = x.shape[:2]
    H, dn, dr, dv, r = 4, 8, 4, 6, 16
    q = m.q_proj(x).view(B, T, H, dn + dr)
    lat = m.kv_down(x)
    c = m.kv_norm(lat[..., :r])
    pos = torch.arange(T)
    k_pe = m.rope.apply(lat[..., r:].view(B, T, 1, dr), pos)
    q = torch.cat([q[..., :dn], m.rope.apply(q[..., dn:], pos)], -1)
    w = m.kv_up.weight.view(H, dn + dv, r)
    k_nope = torch.einsum("btr,hdr->bthd", c, w[:, :dn])
    v = torch.einsum("btr,hdr->bthd", c, w[:, dn:])
    k = torch.cat([k_nope, k_pe.expand(B, T, H, dr)], -1)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dn + dr)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
    assert_fp32_close(m(x)[0], m.o_proj(o.flatten(2)))


@pytest.mark.parametrize("absorb", [None, True, False])
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 12}, {"qk_rope_head_dim": 0}, {"window": 4}, {"v_head_dim": 16}])
def test_decode_equals_full(absorb, kw):
    m = _mla(**kw)
    x = _x(T=12)
    with torch.no_grad():
        m.absorb = False
        full, _ = m(x)
        m.absorb = absorb
        cache, ys = None, []
        for t in range(x.shape[1]):
            y, cache = m(x[:, t : t + 1], cache)
            ys.append(y)
        assert_fp32_close(torch.cat(ys, 1), full, name="token by token")
        y0, cache = m(x[:, :7])
        y1, cache = m(x[:, 7:], cache)
        assert_fp32_close(torch.cat([y0, y1], 1), full, name="prefill + rest")
        assert cache.key_only and cache.k.shape[2:] == (1, 16 + m.qk_rope_head_dim)
        assert cache.k.shape[0] == 2 and cache.length + getattr(cache, "dropped", 0) == 12
        if m.window is not None:  # a windowed layer keeps a bounded latent cache
            assert isinstance(cache, WindowKVCache) and cache.length <= cache.max_length < 12


def test_absorbed_equals_plain_prefill_and_grads():
    m = _mla(q_lora_rank=12)
    x = _x()
    m.absorb = False
    y_plain = m(x)[0]
    g_plain = torch.autograd.grad(y_plain.square().sum(), m.kv_up.weight)[0]
    m.absorb = True
    y_abs = m(x)[0]
    g_abs = torch.autograd.grad(y_abs.square().sum(), m.kv_up.weight)[0]
    assert_fp32_close(y_abs, y_plain)
    assert_fp32_close(g_abs, g_plain, tol=1e-4, name="dW_up")


def test_left_padded_batch_equals_unbatched():
    m = _mla()
    x = _x(B=2, T=8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    xp = x.clone()
    xp[1, :3] = 1e3
    nxt = _x(B=2, T=1, seed=5)
    with torch.no_grad():
        y, c = m(xp, valid=valid)
        d, c = m(nxt, c)
        ref, rc = m(x[1:, 3:])
        rd, rc = m(nxt[1:], rc)
    assert_fp32_close(y[1, 3:], ref[0])
    assert_fp32_close(d[1], rd[0])


def test_state_size_smaller_than_gqa_cache():
    m = MLA(64, 8, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    gqa = Attention(64, 8, kv_heads=4)
    assert m.state_size(2, 40) == 2 * 40 * (32 + 4) * 4
    assert m.state_size(2, 40) < gqa.state_size(2, 40)
    with torch.no_grad():
        _, c = m(torch.randn(2, 40, 64))
    assert c.nbytes == m.state_size(2, 40)


@pytest.mark.parametrize(
    "kw",
    [
        {"kv_heads": 2, "rope": False},
        {"kv_heads": 2},
        {"kv_heads": 1, "rope_fraction": 0.5},
        {"kv_heads": 4, "bias": True, "window": 5},
    ],
)
def test_mla_from_gqa_is_exact(kw):
    torch.manual_seed(0)
    gqa = Attention(DIM, 4, **kw)
    mla = mla_from_gqa(gqa)
    assert mla.kv_lora_rank == 2 * gqa.kv_heads * gqa.head_dim
    assert mla.state_size(2, 10) == gqa.state_size(2, 10)
    x = _x(T=10)
    assert_fp32_close(mla(x)[0], gqa(x)[0], tol=1e-6)
    with torch.no_grad():
        y_g, cg = gqa(x[:, :6])
        y_m, cm = mla(x[:, :6])
        for t in range(6, 10):  # decode: absorbed when there is no RoPE, plain otherwise
            yg, cg = gqa(x[:, t : t + 1], cg)
            ym, cm = mla(x[:, t : t + 1], cm)
            assert_fp32_close(ym, yg, tol=1e-6, name=f"decode step {t}")
    if gqa.rope is not None:
        mla.absorb = True
        with pytest.raises(ValueError, match="absorb"):
            mla(x)


def test_bad_input():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        _mla(kv_lora_rank=0)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        _mla(qk_rope_head_dim=3)
    with pytest.raises(ValueError, match="x must have shape"):
        _mla()(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="qk_norm"):
        mla_from_gqa(Attention(DIM, 4, qk_norm=True))
    with pytest.raises(TypeError, match="attn"):
        mla_from_gqa(torch.nn.Linear(2, 2))
    _, cache = Attention(DIM, 4)(_x())
    with pytest.raises(TypeError, match="MLA cache"):
        _mla()(_x(T=1), cache)


def test_docstring_examples_run():
    res = doctest.testmod(effattn.nn.mla, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
