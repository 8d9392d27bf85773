"""The Triton kernels of the linear family against the PyTorch chunk forms: the scalar-decay chunk
kernels and the gated delta rule chunk kernels, forward and backward (outputs, final states,
gradients of q, k, v, gates, beta and initial state), and the recurrent (decoding) kernels.

On the CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set at the top of this
module, before anything imports triton (triton fixes its mode at its first import; effattn never
imports it before a kernel launch). Where CUDA is present the same tests run compiled on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from effattn.linear import chunk_gated_delta_rule, naive_gated_delta_rule, step_gated_delta_rule  # noqa: E402
from effattn.linear._delta import chunk_delta_core, prepare_qk  # noqa: E402
from effattn.linear._scalar_decay import recurrent_scalar_decay, scalar_decay_op  # noqa: E402
from effattn.linear._triton import (  # noqa: E402
    chunk_gated_delta_rule_triton,
    fused_recurrent_scalar_decay_triton,
    resolve_backend,
    triton_linear_status,
)
from tests.helpers import assert_fp32_close, assert_lowp_close  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = triton_linear_status(torch.device(DEVICE))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not RUNS[0], reason=f"triton cannot run here: {RUNS[1]}")]


def _randn(g, *shape):
    return torch.randn(*shape, generator=g).to(DEVICE)


def _loss_weights(o, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o.shape, generator=g).to(o.device), torch.randn(s.shape, generator=g).to(s.device)


def _scalar_run(backend, q, k, v, g, s0, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k, v, g, s0)]
    q_, k_, v_, g_, s_ = leaves
    o, s = scalar_decay_op(
        "chunk",
        q_,
        k_,
        v_,
        g_,
        scale=kw.pop("scale", None),
        initial_state=s_,
        output_final_state=True,
        cu_seqlens=kw.pop("cu_seqlens", None),
        backend=backend,
        **kw,
    )
    w_o, w_s = _loss_weights(o, s)
    ((o.double() * w_o).sum() + (s.double() * w_s).sum()).backward()
    return o.detach(), s.detach(), [x.grad if x is not None else None for x in leaves]


SCALAR_CASES = {
    # name: (B, T, H, K, V, gate kind, initial state, chunk_size)
    "gated_odd_T_state": (2, 37, 2, 8, 12, "data", True, 16),
    "gated_T64_one_head": (1, 64, 1, 16, 16, "data", False, 16),
    "no_decay_linear_attn": (1, 29, 2, 8, 8, None, True, 16),
    "fixed_decay_retnet_chunk_20": (1, 45, 2, 8, 4, "fixed", True, 20),
    "one_token": (2, 1, 1, 4, 4, "data", True, 64),
}


@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_scalar_decay_chunk_matches_torch(case):
    B, T, H, K, V, kind, with_state, C = SCALAR_CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, V)
    if kind == "data":
        g = -torch.rand(B, T, H, generator=gen).to(DEVICE) * 0.7
    elif kind == "fixed":  # RetNet / Lightning: one decay per head
        g = (-torch.rand(H, generator=gen).to(DEVICE) * 0.3).expand(B, T, H).contiguous()
    else:
        g = None
    s0 = _randn(gen, B, H, K, V) if with_state else None
    o, s, grads = _scalar_run("triton", q, k, v, g, s0, chunk_size=C)
    ro, rs, rgrads = _scalar_run("torch", q, k, v, g, s0, chunk_size=C)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "final state")
    for name, a, r in zip(("dq", "dk", "dv", "dg", "dstate"), grads, rgrads):
        if r is not None:
            assert_fp32_close(a, r, 1e-4, name)


def test_scalar_decay_strong_gates_and_packed_sequences():
    gen = torch.Generator().manual_seed(3)
    T, H, K = 41, 2, 8
    q, k, v = _randn(gen, 1, T, H, K), _randn(gen, 1, T, H, K), _randn(gen, 1, T, H, K)
    g = -torch.rand(1, T, H, generator=gen).to(DEVICE) * 6.0  # exp(G) down to ~1e-40 inside a chunk
    cu = torch.tensor([0, 11, 12, 41], device=DEVICE)
    s0 = _randn(gen, 3, H, K, K)
    o, s, grads = _scalar_run("triton", q, k, v, g, s0, chunk_size=16, cu_seqlens=cu)
    ro, rs, rgrads = _scalar_run("torch", q, k, v, g, s0, chunk_size=16, cu_seqlens=cu)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "final state")
    for name, a, r in zip(("dq", "dk", "dv", "dg", "dstate"), grads, rgrads):
        assert_fp32_close(a, r, 1e-4, name)


def test_scalar_decay_bf16_flash_rule():
    gen = torch.Generator().manual_seed(4)
    B, T, H, K = 1, 33, 2, 16
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, K)
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE) * 0.5
    ref = scalar_decay_op(
        "chunk", q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, backend="torch"
    )[0]
    low = [x.bfloat16() for x in (q, k, v, g)]
    common = dict(scale=None, initial_state=None, output_final_state=False, cu_seqlens=None)
    o_t = scalar_decay_op("chunk", *low, **common, backend="triton")[0]
    o_r = scalar_decay_op("chunk", *low, **common, backend="torch")[0]
    assert o_t.dtype == torch.bfloat16
    assert_lowp_close(o_t, o_r, ref, name="o")


def _gdr_run(backend, q, k, v, g, beta, s0):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    o, s = chunk_gated_delta_rule(
        *leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=16, backend=backend
    )
    w_o, w_s = _loss_weights(o, s)
    ((o.double() * w_o).sum() + (s.double() * w_s).sum()).backward()
    return o.detach(), s.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("B,T,H,K,V", [(2, 37, 2, 8, 12), (1, 64, 1, 16, 16)])
def test_gated_delta_rule_chunk_matches_torch(B, T, H, K, V):
    gen = torch.Generator().manual_seed(5)
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, V)
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE) * 0.5
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    s0 = _randn(gen, B, H, K, V)
    o, s, grads = _gdr_run("triton", q, k, v, g, beta, s0)
    ro, rs, rgrads = _gdr_run("torch", q, k, v, g, beta, s0)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "final state")
    for name, a, r in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), grads, rgrads):
        assert_fp32_close(a, r, 1e-4, name)


def test_delta_rule_without_gates_matches_torch():
    gen = torch.Generator().manual_seed(6)
    B, T, H, K = 1, 23, 2, 8
    q, k = prepare_qk(_randn(gen, B, T, H, K), _randn(gen, B, T, H, K), True)
    v, beta = _randn(gen, B, T, H, K), torch.rand(B, T, H, generator=gen).to(DEVICE)
    o, s = chunk_gated_delta_rule_triton(q, k, v, beta, None, 0.5, None, 16)
    ro, rs = chunk_delta_core(q, k, v, beta, None, 0.5, None, 16)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "final state")


def test_recurrent_kernels_match_the_recurrences():
    gen = torch.Generator().manual_seed(7)
    B, T, H, K, V = 2, 3, 2, 8, 6
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, V)
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE)
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    s0 = _randn(gen, B, H, K, V)
    o, s = fused_recurrent_scalar_decay_triton(q, k, v, g, 0.3, s0)
    ro, rs = recurrent_scalar_decay(q, k, v, g, 0.3, s0)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "state")
    o, s = step_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, backend="triton")
    ro, rs = naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "state")
    with pytest.raises(ValueError, match="forward only"):
        step_gated_delta_rule(q.requires_grad_(), k, v, g, beta, initial_state=s0, backend="triton")


def test_backend_selection(monkeypatch):
    x = torch.zeros(1, 2, 1, 4)
    assert resolve_backend("auto", x) == "torch"  # never Triton on CPU tensors unless asked
    assert resolve_backend("torch", x) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", x)
    with pytest.raises(ValueError, match="float64"):
        resolve_backend("triton", x.to(DEVICE).double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", x)


def test_hard_reset_inside_a_chunk_keeps_later_decays_accurate():
    """A gate of -inf (clamped to LOG_DECAY_FLOOR) inside a chunk: the decays after it come from
    segment sums, so they keep float32 accuracy (a difference of cumulated sums near -1e4 would not)."""
    gen = torch.Generator().manual_seed(8)
    B, T, H, K = 1, 30, 2, 8
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, K)
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE) * 0.3
    g[:, 5, 0] = float("-inf")
    g[:, 20, 1] = -1e5
    s0 = _randn(gen, B, H, K, K)
    o, s, grads = _scalar_run("triton", q, k, v, g, s0, chunk_size=16)
    ro, rs, rgrads = _scalar_run("torch", q, k, v, g, s0, chunk_size=16)
    assert_fp32_close(o, ro, 1e-5, "o")
    assert_fp32_close(s, rs, 1e-5, "final state")
    for name, a, r in zip(("dq", "dk", "dv", "dg", "dstate"), grads, rgrads):
        assert_fp32_close(a, r, 1e-4, name)
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    o, s, grads = _gdr_run("triton", q, k, v, g, beta, s0)
    ro, rs, rgrads = _gdr_run("torch", q, k, v, g, beta, s0)
    assert_fp32_close(o, ro, 1e-5, "gdr o")
    assert_fp32_close(s, rs, 1e-5, "gdr final state")
    for name, a, r in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), grads, rgrads):
        assert_fp32_close(a, r, 1e-4, "gdr " + name)
