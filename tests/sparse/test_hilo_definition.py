"""HiLo from its definition (Pan et al. 2022), written with explicit loops over windows and pools,
independently of the library's region permutation and pooling helpers:

- Hi-Fi heads (the first ``H - floor(alpha H)``): a query attends to the tokens of its own window; with
  ``grid=(R, C)`` the window is the ``w x w`` patch of the row-major image holding the token; 1-D
  causal, the ``w`` keys ending at the query;
- Lo-Fi heads (the last ``floor(alpha H)``): a query attends to the averages of the keys and values of
  each pool (``s x s`` patches with ``grid``, else ``s`` consecutive tokens, a ragged last pool averaged
  over the tokens it has); causal, only pools complete at the query.

The loops list, for every query, its keys (Hi-Fi) and, for every pool, its member tokens (Lo-Fi); a
float64 dense softmax over those is compared with :func:`hilo_attention` and :func:`hilo_reference`
(forward and q/k/v gradients)."""

import math

import pytest
import torch

from effattn.sparse import hilo_attention, hilo_reference
from tests.helpers import assert_fp32_close


def _hifi_keys(T, window, grid, causal):
    """``allowed [T, T]``: True where query ``t`` may see key ``j`` (loops over the windows)."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    if grid is not None:
        rows, cols = grid
        for r0 in range(0, rows, window):  # every w x w patch: its tokens see each other
            for c0 in range(0, cols, window):
                members = [r * cols + c for r in range(r0, r0 + window) for c in range(c0, c0 + window)]
                for t in members:
                    for j in members:
                        allowed[t, j] = True
    elif causal:
        for t in range(T):
            for j in range(max(0, t - window + 1), t + 1):
                allowed[t, j] = True
    else:
        for start in range(0, T, window):
            for t in range(start, min(T, start + window)):
                for j in range(start, min(T, start + window)):
                    allowed[t, j] = True
    return allowed


def _pools(T, pool, grid, causal):
    """``(members, last)``: the token lists of the pools and, per pool, its last token (causal: a pool is
    visible from the query at its last token on; only complete pools exist)."""
    members = []
    if grid is not None:
        rows, cols = grid
        for r0 in range(0, rows, pool):
            for c0 in range(0, cols, pool):
                members.append([r * cols + c for r in range(r0, r0 + pool) for c in range(c0, c0 + pool)])
    else:
        for start in range(0, T, pool):
            group = list(range(start, min(T, start + pool)))
            if causal and len(group) < pool:
                continue  # a ragged last group is never complete
            members.append(group)
    return members, [max(m) for m in members]


def _softmax_attend(q, k, v, allowed):
    """float64 softmax attention ``q [B, T, H, D]`` over ``k, v [B, N, H, *]`` with ``allowed [T, N]``;
    a query that sees nothing gives zeros."""
    s = torch.einsum("bthd,bnhd->bhtn", q.double(), k.double()) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, -1e4)  # exp(-1e4) == 0 in float64
    p = s.softmax(-1) * allowed.any(-1, keepdim=True)
    return torch.einsum("bhtn,bnhd->bthd", p, v.double())


def _hilo_by_loops(q, k, v, *, alpha, window, pool, grid, causal):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    n_lo = int(math.floor(alpha * H + 1e-9))
    n_hi = H - n_lo
    k_h, v_h = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    outs = []
    if n_hi:
        allowed = _hifi_keys(T, window, grid, causal)
        outs.append(_softmax_attend(q[:, :, :n_hi], k_h[:, :, :n_hi], v_h[:, :, :n_hi], allowed))
    if n_lo:
        members, last = _pools(T, pool, grid, causal)
        avg = torch.zeros(len(members), T, dtype=torch.float64)  # row g: weights 1/|pool g| on its tokens
        for g, toks in enumerate(members):
            for t in toks:
                avg[g, t] = 1.0 / len(toks)
        kp = torch.einsum("nt,bthd->bnhd", avg, k_h[:, :, n_hi:].double())
        vp = torch.einsum("nt,bthd->bnhd", avg, v_h[:, :, n_hi:].double())
        seen = torch.ones(T, len(members), dtype=torch.bool)
        if causal:
            for t in range(T):
                for g in range(len(members)):
                    seen[t, g] = last[g] <= t
        outs.append(_softmax_attend(q[:, :, n_hi:], kp, vp, seen))
    return torch.cat(outs, 2)


@pytest.mark.parametrize(
    "T,grid,window,pool,causal,alpha",
    [
        (96, (12, 8), 4, 2, False, 0.5),
        (108, (12, 9), 3, 3, False, 0.5),
        (60, (6, 10), 2, 2, False, 1.0),
        (97, None, 10, 7, False, 0.5),  # ragged last window and pool
        (97, None, 10, 7, True, 0.5),
        (61, None, 6, 8, True, 1.0),
    ],
)
def test_hilo_equals_its_loop_definition(T, grid, window, pool, causal, alpha):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, T, 4, 16, generator=g).requires_grad_(True)
    k = torch.randn(2, T, 2, 16, generator=g).requires_grad_(True)
    v = torch.randn(2, T, 2, 16, generator=g).requires_grad_(True)
    kw = dict(alpha=alpha, window=window, pool=pool, grid=grid, causal=causal)
    want = _hilo_by_loops(q, k, v, **kw)
    do = torch.randn(want.shape, generator=g)
    grads_want = torch.autograd.grad(want, (q, k, v), do)
    for fn in (hilo_attention, hilo_reference):
        o = fn(q, k, v, **kw)
        assert_fp32_close(o, want.float(), 1e-5, f"{fn.__name__} output")
        for name, gr, gw in zip("qkv", torch.autograd.grad(o, (q, k, v), do), grads_want):
            assert_fp32_close(gr, gw.float(), 1e-4, f"{fn.__name__} d{name}")
