"""DeltaNet (effattn.linear.delta_rule): chunk (UT transform) vs naive, the delta-rule semantics,
negative eigenvalues, decoding and input validation."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from effattn.linear import REGISTRY, chunk_delta_rule, naive_delta_rule, step_delta_rule
from effattn.linear import delta_rule as module
from tests.helpers import assert_fp32_close, assert_lowp_close


def _inputs(B, T, H, D, *, seed, beta_hi=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    beta = torch.rand(B, T, H, generator=g) * beta_hi
    h0 = torch.randn(B, H, D, D, generator=g) * 0.5
    return [x.to(dtype) for x in (q, k, v, beta)], h0


def _fwd_bwd(fn, q, k, v, beta, h0, d_o, d_s, **kw):
    """Output, final state and the gradients of (q, k, v, beta, h0) for loss <o, d_o> + <S_T, d_s>."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, beta, h0)]
    o, s = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, **kw)
    loss = (o.float() * d_o).sum() + (s * d_s).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, leaves)


NAMES = ("q", "k", "v", "beta", "initial_state")


@pytest.mark.parametrize(
    "T, D, chunk_size, neg",
    [
        (1, 40, 64, False),  # one token, chunk larger than T
        (63, 60, 16, False),  # ragged last chunk
        (97, 40, 32, True),  # ragged, beta in [0, 2]
        (64, 16, 16, False),  # chunk size divides T
        (97, 64, 64, True),
    ],
)
def test_chunk_matches_naive_fp32(T, D, chunk_size, neg):
    B, H = 2, 2
    (q, k, v, beta), h0 = _inputs(B, T, H, D, seed=T + D, beta_hi=2.0 if neg else 1.0)
    d_o, d_s = torch.randn(B, T, H, D), torch.randn(B, H, D, D)
    kw = dict(allow_neg_eigval=neg)
    o_r, s_r, g_r = _fwd_bwd(naive_delta_rule, q, k, v, beta, h0, d_o, d_s, **kw)
    o_c, s_c, g_c = _fwd_bwd(chunk_delta_rule, q, k, v, beta, h0, d_o, d_s, chunk_size=chunk_size, **kw)
    assert o_c.shape == (B, T, H, D) and s_c.shape == (B, H, D, D) and s_c.dtype == torch.float32
    assert_fp32_close(o_c, o_r, name="output")
    assert_fp32_close(s_c, s_r, name="final state")
    for n, a, b in zip(NAMES, g_c, g_r, strict=True):
        assert_fp32_close(a, b, tol=1e-4, name=f"grad {n}")


def test_chunk_matches_naive_bf16():
    B, T, H, D = 2, 70, 2, 40
    (q, k, v, beta), h0 = _inputs(B, T, H, D, seed=1, dtype=torch.bfloat16)
    d_o, d_s = torch.randn(B, T, H, D), torch.randn(B, H, D, D)
    ref32 = _fwd_bwd(naive_delta_rule, *(x.float() for x in (q, k, v, beta)), h0, d_o, d_s)
    ref16 = _fwd_bwd(naive_delta_rule, q, k, v, beta, h0, d_o, d_s)
    fast = _fwd_bwd(chunk_delta_rule, q, k, v, beta, h0, d_o, d_s, chunk_size=16)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32
    assert_lowp_close(fast[0], ref16[0], ref32[0], name="output")
    assert_lowp_close(fast[1], ref16[1], ref32[1], name="final state")
    for n, a, b, c in zip(NAMES, fast[2], ref16[2], ref32[2], strict=True):
        assert a.dtype == b.dtype
        # the helper's atol (1e-3), down from 1e-2: measured e_fast - 2 e_ref <= 0 for every gradient and
        # <= 3e-5 for outputs/float32 states (the chunk form errs no more than the naive one in bf16)
        assert_lowp_close(a, b, c, name=f"grad {n}")


def test_naive_is_the_delta_rule():
    """Independent statement of the math: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with
    unit-norm keys, o_t = scale S_t^T q_t; and the delta rule's defining property: with beta = 1 a
    value written under key k replaces the previous one (S^T k returns the newest value)."""
    B, T, H, D = 1, 5, 1, 6
    (q, k, v, beta), h0 = _inputs(B, T, H, D, seed=3)
    o, s = naive_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, scale=0.7)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    S = h0[0, 0].double()
    for t in range(T):
        kt, vt, bt = kn[0, t, 0].double(), v[0, t, 0].double(), beta[0, t, 0].double()
        S = (torch.eye(D, dtype=torch.float64) - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(kt, vt)
        torch.testing.assert_close(o[0, t, 0].double(), 0.7 * S.T @ qn[0, t, 0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[0, 0].double(), S, rtol=1e-5, atol=1e-5)

    key = torch.randn(1, 1, 1, D).expand(1, 3, 1, D)  # the same key three times
    vals = torch.randn(1, 3, 1, D)
    for fn in (naive_delta_rule, chunk_delta_rule):
        _, s = fn(key, key, vals, torch.ones(1, 3, 1), initial_state=h0, output_final_state=True)
        read = s[0, 0].T @ F.normalize(key[0, 0, 0], dim=-1)
        torch.testing.assert_close(read, vals[0, 2, 0], rtol=1e-5, atol=1e-5)


def test_qk_l2norm_switch():
    """use_qk_l2norm=True normalises inside; False takes q, k as given (here: keys of norm < 1)."""
    B, T, H, D = 1, 37, 2, 16
    (q, k, v, beta), h0 = _inputs(B, T, H, D, seed=4)
    o1, s1 = naive_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)
    qn, kn = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
    o2, s2 = naive_delta_rule(qn, kn, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=False)
    assert_fp32_close(o2, o1)
    assert_fp32_close(s2, s1)
    k_small = kn * 0.8
    o3, s3 = naive_delta_rule(q, k_small, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=False)
    o4, s4 = chunk_delta_rule(
        q, k_small, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=False, chunk_size=8
    )
    assert_fp32_close(o4, o3)
    assert_fp32_close(s4, s3)
    assert (o3 - o1).abs().max() > 1e-2  # the switch really changes the computation


def test_negative_eigenvalues():
    """beta = 2 with a unit key reflects the memory along k (eigenvalue -1 of I - 2 k k^T)."""
    D = 8
    h0 = torch.randn(1, 1, D, D)
    k = torch.randn(1, 1, 1, D)
    kn = F.normalize(k[0, 0, 0], dim=-1)
    v = torch.zeros(1, 1, 1, D)
    for fn in (naive_delta_rule, chunk_delta_rule):
        _, s = fn(
            k,
            k,
            v,
            torch.full((1, 1, 1), 2.0),
            initial_state=h0,
            output_final_state=True,
            allow_neg_eigval=True,
        )
        torch.testing.assert_close(s[0, 0].T @ kn, -(h0[0, 0].T @ kn), rtol=1e-5, atol=1e-5)


def test_step_token_by_token_equals_full():
    B, T, H, D = 2, 21, 2, 24
    (q, k, v, beta), h0 = _inputs(B, T, H, D, seed=5, beta_hi=2.0)
    kw = dict(allow_neg_eigval=True)
    o_full, s_full = chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=8, **kw)
    state, outs = h0, []
    for t in range(T):
        o, state = step_delta_rule(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], beta[:, t : t + 1],
            initial_state=state, output_final_state=True, **kw,
        )  # fmt: skip
        outs.append(o)
    assert_fp32_close(torch.cat(outs, dim=1), o_full)
    assert_fp32_close(state, s_full)


def test_registered_inputs_are_realistic():
    op = REGISTRY["delta_rule"]
    torch.manual_seed(0)
    (q, k, v, beta), kw = op.make_inputs(2, 33, 2, 16, device="cpu", dtype=torch.float32, gate_strength=0.5)
    assert ((beta > 0) & (beta < 1)).all() and beta.shape == (2, 33, 2)
    o_n, s_n = op.naive(q, k, v, beta, output_final_state=True, **kw)
    o_c, s_c = op.chunk(q, k, v, beta, output_final_state=True, chunk_size=8, **kw)
    assert_fp32_close(o_c, o_n)
    assert s_c.shape == op.state_shape(2, 2, 16)
    assert op.differentiable_args == ("q", "k", "v", "beta")


@pytest.mark.parametrize("fn", [naive_delta_rule, chunk_delta_rule, step_delta_rule])
def test_bad_input(fn):
    (q, k, v, beta), h0 = _inputs(2, 5, 2, 8, seed=6)
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, beta + 1.5)  # > 1 without allow_neg_eigval
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, beta * 3, allow_neg_eigval=True)  # > 2
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, -beta - 0.1)
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, beta.masked_fill(beta > 0.5, float("nan")))
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, beta[:, :-1])
    with pytest.raises(TypeError, match="beta"):
        fn(q, k, v, (beta * 0).long())
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, beta, initial_state=h0[:, :, :-1])
    with pytest.raises(ValueError, match="cu_seqlens"):  # packed sequences need batch 1
        fn(q, k, v, beta, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="scale"):
        fn(q, k, v, beta, scale=float("inf"))
    if fn is chunk_delta_rule:
        with pytest.raises(ValueError, match="chunk_size"):
            fn(q, k, v, beta, chunk_size=0)


def test_docstring_example_runs():
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
