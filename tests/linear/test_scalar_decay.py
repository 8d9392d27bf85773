"""Simple GLA / Mamba-2 SSD, RetNet retention and Lightning Attention-2: the three fronts of the
shared scalar-decay kernel (effattn.linear._scalar_decay).

Checked here: chunk vs naive (forward, final state, gradients of q, k, v, the gate and
initial_state under random upstream gradients on output and state) in float32 and bfloat16 over odd
lengths / head dims / chunk sizes / decay strengths; stability and accuracy for very strong and
mixed decay, and for -inf gates (a hard reset); naive vs the papers' materialised parallel forms;
the default decays of RetNet and Lightning; step decoding; gradcheck in float64; bad input.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from effattn.linear import (
    chunk_lightning_attn,
    chunk_retention,
    chunk_simple_gla,
    lightning,
    lightning_log_decay,
    naive_lightning_attn,
    naive_retention,
    naive_simple_gla,
    retention_log_decay,
    retnet,
    simple_gla,
    step_lightning_attn,
    step_retention,
    step_simple_gla,
)
from effattn.linear._scalar_decay import chunk_cumsum, decay_magnitude, decay_matrix
from tests.helpers import assert_fp32_close, assert_lowp_close, rel_rms

FORMS = {
    "simple_gla": (naive_simple_gla, chunk_simple_gla, step_simple_gla, "g"),
    "retnet": (naive_retention, chunk_retention, step_retention, "log_decay"),
    "lightning": (naive_lightning_attn, chunk_lightning_attn, step_lightning_attn, "log_decay"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (up to 7x slower on a
    busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def magnitude(strength: float) -> float:
    return decay_magnitude(strength)


def make(name: str, B: int, T: int, H: int, K: int, V: int, strength: float, seed: int = 0):
    """Inputs as a dict of named tensors (q unit-scale, k unit-norm; gate per the op)."""
    gen = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, T, H, K, generator=gen),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen),
    }
    m = magnitude(strength)
    if name == "simple_gla":
        x["g"] = -m * (0.1 + 1.8 * torch.rand(B, T, H, generator=gen))
    else:
        x["log_decay"] = -m * (0.5 + torch.rand(H, generator=gen))
    return x


def run(fn, inputs: dict, h0, d_o=None, d_s=None, **kw):
    """Call ``fn`` on fresh leaves; with upstream gradients, also return every input's gradient."""
    leaves = {n: t.detach().clone().requires_grad_(d_o is not None) for n, t in inputs.items()}
    h = h0.detach().clone().requires_grad_(d_o is not None) if h0 is not None else None
    o, s = fn(**leaves, initial_state=h, output_final_state=True, **kw)
    grads = {}
    if d_o is not None:
        ((o.float() * d_o).sum() + (s * d_s).sum()).backward()
        grads = {n: t.grad for n, t in leaves.items()}
        if h is not None:
            grads["initial_state"] = h.grad
    return o.detach(), s.detach(), grads


# ------------------------------------------------------------------------------------------------
# chunk vs naive
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.0, 0.5, 0.85, 1.0])
@pytest.mark.parametrize(
    "T,K,V,chunk",
    [(1, 40, 60, 64), (63, 40, 60, 16), (97, 64, 64, 64), (97, 40, 60, 33), (97, 60, 40, 1)],
)
@pytest.mark.parametrize("name", sorted(FORMS))
def test_chunk_matches_naive_fp32(name, T, K, V, chunk, strength):
    naive, chunkf, _, gate = FORMS[name]
    B, H = 2, 2
    x = make(name, B, T, H, K, V, strength)
    h0 = torch.randn(B, H, K, V) * 0.3
    torch.manual_seed(1)
    d_o, d_s = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    o_n, s_n, g_n = run(naive, x, h0, d_o, d_s)
    o_c, s_c, g_c = run(chunkf, x, h0, d_o, d_s, chunk_size=chunk)
    assert o_c.dtype == torch.float32 and s_c.dtype == torch.float32
    assert o_c.shape == (B, T, H, V) and s_c.shape == (B, H, K, V)
    assert_fp32_close(o_c, o_n, name="output")
    assert_fp32_close(s_c, s_n, name="final state")
    for n in ("q", "k", "v", gate, "initial_state"):
        assert g_c[n] is not None and g_n[n] is not None, n
        assert_fp32_close(g_c[n], g_n[n], tol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("name", sorted(FORMS))
def test_chunk_matches_naive_bf16(name):
    naive, chunkf, _, gate = FORMS[name]
    B, T, H, K, V = 2, 97, 2, 40, 60
    x32 = make(name, B, T, H, K, V, 0.4)
    x16 = {n: t.to(torch.bfloat16) for n, t in x32.items()}
    ref = {n: t.float() for n, t in x16.items()}  # the same (rounded) values in float32
    torch.manual_seed(2)
    d_o, d_s = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    o_ref, s_ref, g_ref = run(naive, ref, None, d_o, d_s)
    o_low, s_low, g_low = run(naive, x16, None, d_o, d_s)
    o_c, s_c, g_c = run(chunkf, x16, None, d_o, d_s, chunk_size=16)
    assert o_c.dtype == torch.bfloat16 and s_c.dtype == torch.float32
    assert_lowp_close(o_c, o_low, o_ref, name="output")
    assert_lowp_close(s_c, s_low, s_ref, name="final state")
    for n in ("q", "k", "v", gate):
        assert g_c[n].dtype == x16[n].dtype
        # the helper's atol (1e-3), down from 1e-2: measured e_fast - 2 e_ref <= 0 for every gradient and
        # <= 3e-5 for outputs/float32 states (the chunk form errs no more than the naive one in bf16)
        assert_lowp_close(g_c[n], g_low[n], g_ref[n], name=f"grad {n}")


# ------------------------------------------------------------------------------------------------
# numerics: strong, mixed and infinite decay
# ------------------------------------------------------------------------------------------------


def naive64(name, x, h0=None):
    naive = FORMS[name][0]
    o, s = naive(
        **{n: t.double() for n, t in x.items()},
        initial_state=None if h0 is None else h0.double(),
        output_final_state=True,
    )
    return o, s


@pytest.mark.parametrize("name", sorted(FORMS))
def test_very_strong_decay_is_finite_and_exact(name):
    """g down to -20 per step (exp(-1280) over a chunk of 64): no overflow, no NaN, and the chunk
    form still agrees with a float64 recurrence (with the gate's gradient)."""
    B, T, H, K, V = 1, 97, 2, 32, 32
    x = make(name, B, T, H, K, V, 1.0)
    gate = FORMS[name][3]
    assert x[gate].min() < -20
    o64, s64 = naive64(name, x)
    d_o, d_s = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    o, s, g = run(FORMS[name][1], x, None, d_o, d_s, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(t).all() for t in g.values())
    assert_fp32_close(o, o64, name="output vs float64")
    assert_fp32_close(s, s64, name="state vs float64")


def test_mixed_decay_keeps_full_accuracy():
    """Strong early decay makes the within-chunk cumulative sum G large (~ -1300) while the later
    gates are weak: the weights exp(G_i - G_j) between weak steps must stay accurate. A plain
    float32 difference G_i - G_j loses ~5e-5 here; the kernel's split float64 sums do not."""
    B, T, H, K, V = 1, 64, 2, 16, 16
    x = make("simple_gla", B, T, H, K, V, 0.0)
    g = torch.full((B, T, H), -1e-3)
    g[:, :32] = -40.0  # the first half of the chunk: G reaches -1280
    x["g"] = g
    o64, s64 = naive64("simple_gla", x)
    o, s = chunk_simple_gla(**x, output_final_state=True, chunk_size=64)
    err_o, err_s = rel_rms(o, o64), rel_rms(s, s64)
    assert err_o < 2e-6 and err_s < 2e-6, (err_o, err_s)
    # the decay matrix itself, against float64
    gc = g[0, :, 0].view(1, T)
    G64, hi, lo = chunk_cumsum(gc)
    W = decay_matrix(hi, lo)[0].double()
    G = g[0, :, 0].double().cumsum(0)
    W64 = (G[:, None] - G[None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).exp()
    assert rel_rms(W, W64) < 1e-7
    W_plain = (hi[0][:, None] - hi[0][None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).exp()
    assert rel_rms(W_plain.double(), W64) > 10 * rel_rms(W, W64)  # what the split buys


def test_minus_inf_gate_is_a_hard_reset():
    """g_t = -inf forgets everything before t: outputs from t on equal a fresh run from t."""
    B, T, H, K, V = 2, 50, 2, 16, 24
    x = make("simple_gla", B, T, H, K, V, 0.3)
    t0 = 21
    x["g"][:, t0] = -math.inf
    h0 = torch.randn(B, H, K, V)
    tail = {n: t[:, t0:] for n, t in x.items()}
    tail["g"] = tail["g"].clone()
    tail["g"][:, 0] = 0.0
    o_tail, s_tail = naive_simple_gla(**tail, output_final_state=True)
    for fn, kw in ((naive_simple_gla, {}), (chunk_simple_gla, {"chunk_size": 16})):
        o, s = fn(**x, initial_state=h0, output_final_state=True, **kw)
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert_fp32_close(o[:, t0:], o_tail, name=f"{fn.__name__} after reset")
        assert_fp32_close(s, s_tail, name=f"{fn.__name__} state after reset")
    # gradients stay finite through the reset
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, _ = chunk_simple_gla(**leaves, chunk_size=16)
    o.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())
    assert leaves["q"].grad[:, :t0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# against the papers' parallel forms (materialised, float64)
# ------------------------------------------------------------------------------------------------


def parallel_decayed_attention(q, k, v, g, scale):
    """o_i = scale * sum_{j <= i} exp(g_{j+1} + ... + g_i) (q_i . k_j) v_j, materialised."""
    G = g.cumsum(1)  # [B, T, H]
    T = q.shape[1]
    D = (G.unsqueeze(2) - G.unsqueeze(1)).permute(0, 3, 1, 2)  # [B, H, T(i), T(j)]
    D = D.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).exp()
    A = torch.einsum("bihk,bjhk->bhij", q, k) * scale * D
    return torch.einsum("bhij,bjhv->bihv", A, v)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_naive_matches_parallel_form(name):
    B, T, H, K, V = 2, 29, 3, 8, 12
    x = {n: t.double() for n, t in make(name, B, T, H, K, V, 0.6).items()}
    if name == "simple_gla":
        g = x["g"]
    else:
        g = x["log_decay"].view(1, 1, H).expand(B, T, H)
    ref = parallel_decayed_attention(x["q"], x["k"], x["v"], g, scale=K**-0.5)
    o, _ = FORMS[name][0](**x)
    assert o.dtype == torch.float64
    assert rel_rms(o, ref) < 1e-12


def test_retention_default_decay():
    assert torch.allclose(retention_log_decay(4).double().exp(), 1 - 2.0 ** -torch.arange(5.0, 9.0).double())
    B, T, H, K = 1, 20, 4, 8
    x = make("retnet", B, T, H, K, K, 0.0)
    del x["log_decay"]
    o, s = naive_retention(**x, output_final_state=True)
    o2, s2 = naive_retention(**x, log_decay=retention_log_decay(H), output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(s, s2)
    # gamma = 1 - 2^-5 for head 0: the RetNet decay mask D_nm = gamma^(n - m)
    gamma = 1 - 2.0**-5
    ref = parallel_decayed_attention(
        *(x[n].double() for n in "qkv"), torch.full((B, T, H), math.log(gamma)).double(), K**-0.5
    )
    assert rel_rms(o[:, :, 0].double(), ref[:, :, 0]) < 1e-6
    with pytest.raises(ValueError, match="num_heads"):
        retention_log_decay(0)


def test_lightning_default_decay():
    # ALiBi slopes: 2^(-8 (h+1) / H) for H a power of two, interleaved otherwise
    assert torch.allclose(lightning_log_decay(8), -(2.0 ** -torch.arange(1.0, 9.0)))
    expected6 = -torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert torch.allclose(lightning_log_decay(6), expected6)
    B, T, H, K = 1, 20, 6, 8
    x = make("lightning", B, T, H, K, K, 0.0)
    del x["log_decay"]
    o, _ = chunk_lightning_attn(**x, chunk_size=8)
    o2, _ = naive_lightning_attn(**x, log_decay=expected6)
    assert_fp32_close(o, o2)
    with pytest.raises(ValueError, match="num_heads"):
        lightning_log_decay(-1)


# ------------------------------------------------------------------------------------------------
# step, gradcheck, varlen
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMS))
def test_step_token_by_token_equals_full(name):
    naive, chunkf, step, gate = FORMS[name]
    B, T, H, K, V = 2, 23, 2, 16, 8
    x = make(name, B, T, H, K, V, 0.5)
    h0 = torch.randn(B, H, K, V)
    o_full, s_full = chunkf(**x, initial_state=h0, output_final_state=True, chunk_size=8)
    state, outs = h0, []
    for t in range(T):
        tok = {n: (v[:, t : t + 1] if v.dim() > 1 else v) for n, v in x.items()}
        o, state = step(**tok, initial_state=state, output_final_state=True)
        outs.append(o)
    assert_fp32_close(torch.cat(outs, 1), o_full, name="step outputs")
    assert_fp32_close(state, s_full, name="step state")


@pytest.mark.parametrize("name", sorted(FORMS))
def test_gradcheck_chunk_float64(name):
    B, T, H, K, V = 1, 7, 2, 3, 2
    x = {n: t.double().requires_grad_() for n, t in make(name, B, T, H, K, V, 0.5).items()}
    h0 = torch.randn(B, H, K, V, dtype=torch.float64, requires_grad=True)
    names = list(x)

    def f(*args):
        o, s = FORMS[name][1](
            **dict(zip(names, args[:-1], strict=True)), initial_state=args[-1], output_final_state=True, chunk_size=3
        )
        return o, s

    assert torch.autograd.gradcheck(f, (*x.values(), h0))


def test_varlen_retention_matches_loop():
    B, H, K, V = 1, 2, 8, 8
    bounds = [0, 5, 5, 19, 30]  # an empty sequence too
    x = make("retnet", B, bounds[-1], H, K, V, 0.3)
    h0 = torch.randn(len(bounds) - 1, H, K, V)
    cu = torch.tensor(bounds)
    for fn in (chunk_retention, naive_retention):
        o, s = fn(**x, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            o_i, s_i = naive_retention(
                x["q"][:, a:b],
                x["k"][:, a:b],
                x["v"][:, a:b],
                x["log_decay"],
                initial_state=h0[i : i + 1],
                output_final_state=True,
            )
            if b > a:
                assert_fp32_close(o[:, a:b], o_i, name=f"{fn.__name__} sequence {i}")
            assert_fp32_close(s[i : i + 1], s_i, name=f"{fn.__name__} state {i}")


# ------------------------------------------------------------------------------------------------
# bad input names the argument
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", [0, 1, 2])
def test_bad_input_simple_gla(form):
    fn = FORMS["simple_gla"][form]
    x = make("simple_gla", 2, 5, 2, 8, 8, 0.5)
    extra = {"chunk_size": 4} if form == 1 else {}
    fn(**x, **extra)  # fine as is
    cases = [
        ({"g": -x["g"]}, ValueError, r"\bg\b.*<= 0"),
        ({"g": x["g"][..., :1]}, ValueError, r"\bg\b"),
        ({"g": x["g"].unsqueeze(-1)}, ValueError, r"\bg\b"),
        ({"g": x["g"].masked_fill(torch.rand(2, 5, 2) < 0.3, math.nan)}, ValueError, r"\bg\b"),
        ({"g": "nope"}, TypeError, r"\bg\b"),
        ({"initial_state": torch.zeros(2, 2, 8, 9)}, ValueError, "initial_state"),
        ({"initial_state": (torch.zeros(2, 2, 8, 8),)}, TypeError, "initial_state"),
        ({"scale": math.nan}, ValueError, "scale"),
        ({"cu_seqlens": torch.tensor([0, 5])}, ValueError, "cu_seqlens"),
        ({"v": x["v"][:, :4]}, ValueError, r"\bv\b"),
    ]
    for change, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            fn(**{**x, **change}, **extra)
    if form == 1:
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="chunk_size"):
                fn(**x, chunk_size=bad)


@pytest.mark.parametrize("name", ["retnet", "lightning"])
def test_bad_log_decay(name):
    for fn in FORMS[name][:3]:
        x = make(name, 1, 5, 2, 8, 8, 0.5)
        for bad in (x["log_decay"].abs() + 0.1, x["log_decay"][:1], x["log_decay"].view(1, 2)):
            with pytest.raises(ValueError, match="log_decay"):
                fn(**{**x, "log_decay": bad})


def test_docstring_examples_run():
    for mod in (simple_gla, retnet, lightning):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, mod.__name__
