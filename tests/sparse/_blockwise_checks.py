"""Checks shared by the tests of the block-level selectors (static, top-k, BiFormer, HiLo, Combiner)."""

from __future__ import annotations

import doctest

import torch

from effattn import attention
from tests.helpers import assert_fp32_close


def qkv(B=2, T=97, Hq=4, Hkv=2, D=16, seed=0, dtype=torch.float32):
    """Leaf tensors ``q [B, T, Hq, D], k, v [B, T, Hkv, D]`` that require grad, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=dtype).requires_grad_(True)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype).requires_grad_(True)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype).requires_grad_(True)
    return q, k, v


def reference_with_mask(q, k, v, dense):
    """The reference backend with a dense bool mask ``[B|1, H|1, T_q, T_k]`` (or ``[T_q, T_k]``)."""
    if dense.dim() == 2:
        dense = dense.view(1, 1, *dense.shape)
    return attention(
        q, k, v, mask_mod=lambda b, h, i, j: dense[b % dense.shape[0], h % dense.shape[1], i, j], backend="reference"
    )


def assert_same_fwd_bwd(o, o_ref, inputs, seed=1):
    """float32 rule on the output (1e-5) and on the gradients of every input (1e-4)."""
    assert_fp32_close(o, o_ref, 1e-5, "output")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(o, inputs, do)
    grads_ref = torch.autograd.grad(o_ref, inputs, do)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_fp32_close(g, g_ref, 1e-4, name)


def assert_no_lookahead(fn, q, k, v, t0: int, **kw):
    """Perturb q, k, v at positions >= t0: the outputs at positions < t0 must not change (and the
    perturbation must change something later, so the check can fail)."""
    q, k, v = (x.detach() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    g = torch.Generator().manual_seed(7)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t0:] = 3 * torch.randn(x[:, t0:].shape, generator=g)
    o2 = fn(q2, k2, v2, **kw)
    assert torch.equal(o[:, :t0], o2[:, :t0]), f"outputs before t0={t0} changed: max {(o - o2)[:, :t0].abs().max()}"
    assert not torch.allclose(o[:, t0:], o2[:, t0:]), "perturbation had no effect at all"


def run_doctests(module) -> None:
    """Run the examples in a module's docstrings (they are part of the API docs)."""
    res = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{module.__name__} has no examples"
    assert res.failed == 0, f"{res.failed} docstring examples of {module.__name__} failed"
