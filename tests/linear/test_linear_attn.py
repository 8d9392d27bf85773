"""Linear attention with feature maps (identity, elu+1, relu, Taylor/Based, cosine/Cottention),
with and without the normalizer.

Checked here: chunk vs naive for every map and normalizer setting (forward, final state -- the
(S, z) tuple with normalize=True -- and gradients of q, k, v and of every initial-state tensor under
random upstream gradients on output and state) in float32 and bfloat16 over odd lengths / head
dims / chunk sizes; naive vs the materialised kernel-attention formula of each paper (in float64);
the Taylor kernel identity; feature dims; step decoding with the tuple state; gradcheck; bad input.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from effattn.linear import (
    FEATURE_MAPS,
    REGISTRY,
    chunk_linear_attn,
    feature_dim,
    linear_attn,
    naive_linear_attn,
    step_linear_attn,
)
from tests.helpers import assert_fp32_close, assert_lowp_close, rel_rms

CONFIGS = [  # (feature_map, normalize)
    ("identity", False),
    ("elu1", False),
    ("elu1", True),
    ("relu", False),
    ("relu", True),
    ("taylor", False),
    ("taylor", True),
    ("cosine", False),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (up to 7x slower on a
    busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(B, T, H, K, V, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(B, T, H, K, generator=gen).to(dtype),
        "k": torch.randn(B, T, H, K, generator=gen).to(dtype),
        "v": torch.randn(B, T, H, V, generator=gen).to(dtype),
    }


def parts(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


def random_state(B, H, Fd, V, normalize, seed=3):
    """A valid carried state: for the normalizer, z must be a sum of non-negative features."""
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(B, H, Fd, V, generator=gen)
    return (S, torch.rand(B, H, Fd, generator=gen) * 3) if normalize else S


def run(fn, inputs, h0, d_o=None, d_s=None, **kw):
    leaves = {n: t.detach().clone().requires_grad_(d_o is not None) for n, t in inputs.items()}
    h = None
    if h0 is not None:
        hp = [p.detach().clone().requires_grad_(d_o is not None) for p in parts(h0)]
        h = tuple(hp) if isinstance(h0, tuple) else hp[0]
    o, s = fn(**leaves, initial_state=h, output_final_state=True, **kw)
    grads = {}
    if d_o is not None:
        loss = (o.float() * d_o).sum() + sum((p * d).sum() for p, d in zip(parts(s), d_s, strict=True))
        loss.backward()
        grads = {n: t.grad for n, t in leaves.items()}
        if h is not None:
            grads.update({f"initial_state[{i}]": p.grad for i, p in enumerate(parts(h))})
    return o.detach(), tuple(p.detach() for p in parts(s)), grads


# ------------------------------------------------------------------------------------------------
# chunk vs naive
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,K,V,chunk", [(1, 40, 60, 64), (63, 40, 60, 16), (97, 60, 40, 33), (97, 64, 64, 64)])
@pytest.mark.parametrize("feature_map,normalize", CONFIGS)
def test_chunk_matches_naive_fp32(feature_map, normalize, T, K, V, chunk):
    if feature_map == "taylor":
        K = 8  # F = 1 + K + K^2
    B, H = 2, 2
    Fd = feature_dim(feature_map, K)
    x = make(B, T, H, K, V)
    h0 = random_state(B, H, Fd, V, normalize)
    torch.manual_seed(1)
    d_o = torch.randn(B, T, H, V)
    d_s = [torch.randn(B, H, Fd, V)] + ([torch.randn(B, H, Fd)] if normalize else [])
    kw = {"feature_map": feature_map, "normalize": normalize}
    o_n, s_n, g_n = run(naive_linear_attn, x, h0, d_o, d_s, **kw)
    o_c, s_c, g_c = run(chunk_linear_attn, x, h0, d_o, d_s, chunk_size=chunk, **kw)
    assert o_c.shape == (B, T, H, V)
    assert len(s_c) == (2 if normalize else 1)
    assert s_c[0].shape == (B, H, Fd, V) and s_c[0].dtype == torch.float32
    assert_fp32_close(o_c, o_n, name="output")
    for i, (a, b) in enumerate(zip(s_c, s_n, strict=True)):
        assert_fp32_close(a, b, name=f"final state[{i}]")
    assert set(g_c) == {"q", "k", "v", *(f"initial_state[{i}]" for i in range(len(d_s)))}
    for n in g_c:
        assert_fp32_close(g_c[n], g_n[n], tol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("feature_map,normalize", [("identity", False), ("elu1", True), ("taylor", True)])
def test_chunk_matches_naive_bf16(feature_map, normalize):
    B, T, H, K, V = 2, 97, 2, (8 if feature_map == "taylor" else 40), 60
    x16 = make(B, T, H, K, V, dtype=torch.bfloat16)
    ref = {n: t.float() for n, t in x16.items()}
    kw = {"feature_map": feature_map, "normalize": normalize}
    Fd = feature_dim(feature_map, K)
    torch.manual_seed(2)
    d_o = torch.randn(B, T, H, V)
    d_s = [torch.randn(B, H, Fd, V)] + ([torch.randn(B, H, Fd)] if normalize else [])
    o_ref, s_ref, g_ref = run(naive_linear_attn, ref, None, d_o, d_s, **kw)
    o_low, s_low, g_low = run(naive_linear_attn, x16, None, d_o, d_s, **kw)
    o_c, s_c, g_c = run(chunk_linear_attn, x16, None, d_o, d_s, chunk_size=16, **kw)
    assert o_c.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in s_c)
    assert_lowp_close(o_c, o_low, o_ref, name="output")
    for i in range(len(s_c)):
        assert_lowp_close(s_c[i], s_low[i], s_ref[i], name=f"final state[{i}]")
    for n in ("q", "k", "v"):
        # the helper's atol (1e-3), down from 1e-2: measured e_fast - 2 e_ref <= 0 for every gradient and
        # <= 3e-5 for outputs/float32 states (the chunk form errs no more than the naive one in bf16)
        assert_lowp_close(g_c[n], g_low[n], g_ref[n], name=f"grad {n}")


# ------------------------------------------------------------------------------------------------
# against the papers' formulas (materialised, float64)
# ------------------------------------------------------------------------------------------------


def kernel_attention(kernel: torch.Tensor, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Causal o_i = sum_{j <= i} kernel_ij v_j (/ sum_{j <= i} kernel_ij); kernel [B, H, T, T]."""
    T = kernel.shape[-1]
    kernel = kernel * torch.ones(T, T, dtype=kernel.dtype).tril()
    o = torch.einsum("bhij,bjhv->bihv", kernel, v)
    if normalize:
        o = o / (kernel.sum(-1).transpose(1, 2).unsqueeze(-1) + 1e-6)
    return o


@pytest.mark.parametrize("feature_map,normalize", CONFIGS)
def test_naive_matches_materialised_formula(feature_map, normalize):
    B, T, H, K, V = 2, 17, 2, 6, 5
    x = {n: t.double() for n, t in make(B, T, H, K, V).items()}
    q, k, v = x["q"], x["k"], x["v"]
    s = K**-0.5
    qk = torch.einsum("bihd,bjhd->bhij", q, k)
    if feature_map == "identity":
        kernel = s * qk
    elif feature_map == "elu1":  # Katharopoulos et al.
        kernel = s * torch.einsum("bihd,bjhd->bhij", F.elu(q) + 1, F.elu(k) + 1)
    elif feature_map == "relu":
        kernel = s * torch.einsum("bihd,bjhd->bhij", F.relu(q), F.relu(k))
    elif feature_map == "taylor":  # Based: 2nd-order Taylor expansion of exp(s q.k)
        kernel = 1 + s * qk + (s * qk) ** 2 / 2
    else:  # Cottention: cosine similarity
        kernel = s * torch.einsum("bihd,bjhd->bhij", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
    ref = kernel_attention(kernel, v, normalize)
    o, st = naive_linear_attn(**x, feature_map=feature_map, normalize=normalize, output_final_state=True)
    assert o.dtype == torch.float64
    assert rel_rms(o, ref) < 1e-10
    if normalize:  # z is the running sum of the key features
        S, z = st
        assert z.shape == (B, H, feature_dim(feature_map, K))
        if feature_map == "elu1":
            assert torch.allclose(z, (F.elu(k) + 1).sum(1))


def test_taylor_feature_map_based_scaling():
    """phi(s q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2, equal to Based's symmetric form with
    phi_based(x) = [1, x / d^(1/4), x (x) x / (sqrt(2) sqrt(d))] for s = d^(-1/2)."""
    d = 16
    q, k = torch.randn(5, d, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    s = d**-0.5
    ours = (linear_attn._phi(q * s, "taylor") * linear_attn._phi(k, "taylor")).sum(-1)
    qk = (q * k).sum(-1)
    assert torch.allclose(ours, 1 + s * qk + (s * qk) ** 2 / 2)

    def phi_based(x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
        return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, x2], -1)

    assert torch.allclose(ours, (phi_based(q) * phi_based(k)).sum(-1))
    assert linear_attn._phi(q, "taylor").shape[-1] == feature_dim("taylor", d) == 1 + d + d * d


def test_normalized_output_is_a_weighted_average():
    """With a positive kernel and the normalizer, constant values come back unchanged."""
    B, T, H, K = 1, 30, 2, 8
    x = make(B, T, H, K, 4)
    x["v"] = torch.full((B, T, H, 4), 2.5)
    for fm in ("elu1", "taylor"):
        o, _ = chunk_linear_attn(**x, feature_map=fm, normalize=True, chunk_size=8)
        assert torch.allclose(o, torch.full_like(o, 2.5), rtol=0, atol=2.5e-5), fm  # 1e-5 relative; measured 3e-6


def test_relu_zero_denominator_gives_zeros():
    """relu features can all vanish: the output is then 0 (numerator 0 / eps), never NaN."""
    B, T, H, K = 1, 10, 1, 4
    x = make(B, T, H, K, 3)
    x["q"] = -x["q"].abs()  # relu(q) = 0
    for fn, kw in ((naive_linear_attn, {}), (chunk_linear_attn, {"chunk_size": 4})):
        o, _ = fn(**x, feature_map="relu", normalize=True, **kw)
        assert torch.equal(o, torch.zeros_like(o))


# ------------------------------------------------------------------------------------------------
# step, gradcheck, registry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map,normalize", [("identity", False), ("elu1", True), ("taylor", True)])
def test_step_token_by_token_equals_full(feature_map, normalize):
    B, T, H, K, V = 2, 21, 2, 4, 6
    x = make(B, T, H, K, V)
    h0 = random_state(B, H, feature_dim(feature_map, K), V, normalize)
    kw = {"feature_map": feature_map, "normalize": normalize}
    o_full, s_full = chunk_linear_attn(**x, initial_state=h0, output_final_state=True, chunk_size=8, **kw)
    state, outs = h0, []
    for t in range(T):
        o, state = step_linear_attn(
            **{n: v[:, t : t + 1] for n, v in x.items()}, initial_state=state, output_final_state=True, **kw
        )
        outs.append(o)
    assert_fp32_close(torch.cat(outs, 1), o_full, name="step outputs")
    for a, b in zip(parts(state), parts(s_full), strict=True):
        assert_fp32_close(a, b, name="step state")


@pytest.mark.parametrize("feature_map,normalize", [("elu1", True), ("taylor", True), ("cosine", False)])
def test_gradcheck_chunk_float64(feature_map, normalize):
    B, T, H, K, V = 1, 6, 1, 2, 2
    x = [t.double().requires_grad_() for t in make(B, T, H, K, V).values()]
    Fd = feature_dim(feature_map, K)
    h = [p.double().requires_grad_() for p in parts(random_state(B, H, Fd, V, normalize))]

    def f(q, k, v, *h):
        o, s = chunk_linear_attn(
            q,
            k,
            v,
            feature_map=feature_map,
            normalize=normalize,
            initial_state=tuple(h) if normalize else h[0],
            output_final_state=True,
            chunk_size=4,
        )
        return (o, *parts(s))

    assert torch.autograd.gradcheck(f, (*x, *h))


def test_registered_variants():
    expected = {
        "linear_attn": ("identity", False),
        "linear_attn_elu1": ("elu1", True),
        "based": ("taylor", True),
        "cottention": ("cosine", False),
    }
    for name, (fm, norm) in expected.items():
        op = REGISTRY[name]
        args, kwargs = op.make_inputs(2, 5, 3, 32)
        assert kwargs == {"feature_map": fm, "normalize": norm}
        _, s = op.naive(*args, **kwargs, output_final_state=True)
        shapes = op.state_shape(2, 3, 32)
        if norm:
            assert tuple(p.shape for p in s) == shapes
        else:
            assert tuple(s.shape) == shapes
    assert REGISTRY["based"].make_inputs(1, 3, 1, 64)[0][0].shape[-1] == 16  # Based's small feature dim


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [naive_linear_attn, chunk_linear_attn, step_linear_attn])
def test_bad_input_names_the_argument(fn):
    x = make(2, 5, 2, 4, 3)
    fn(**x, feature_map="elu1", normalize=True)
    S, z = torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4)
    cases = [
        ({"feature_map": "softmax"}, ValueError, "feature_map"),
        ({"feature_map": "identity", "normalize": True}, ValueError, "normalize"),
        ({"feature_map": "cosine", "normalize": True}, ValueError, "normalize"),
        ({"normalize": 1}, TypeError, "normalize"),
        ({"normalize": True, "initial_state": S}, TypeError, "initial_state"),
        ({"normalize": True, "initial_state": (S, z[..., :3])}, ValueError, r"initial_state\[1\]"),
        ({"normalize": True, "initial_state": (S[..., :2], z)}, ValueError, r"initial_state\[0\]"),
        ({"normalize": False, "initial_state": (S, z)}, TypeError, "initial_state"),
        ({"feature_map": "taylor", "initial_state": S}, ValueError, "initial_state"),  # F = 21, not 4
        ({"scale": "big"}, ValueError, "scale"),
        ({"cu_seqlens": torch.tensor([0, 5])}, ValueError, "cu_seqlens"),
        ({"q": x["q"][:, :4]}, ValueError, r"\bq\b"),
    ]
    base = {**x, "feature_map": "elu1", "normalize": False}
    for change, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            fn(**{**base, **change})
    if fn is chunk_linear_attn:
        with pytest.raises(ValueError, match="chunk_size"):
            fn(**x, chunk_size=-1)
    assert FEATURE_MAPS == ("identity", "elu1", "relu", "taylor", "cosine")
    with pytest.raises(ValueError, match="feature_map"):
        feature_dim("exp", 4)


def test_docstring_example_runs():
    result = doctest.testmod(linear_attn)
    assert result.attempted > 0 and result.failed == 0
