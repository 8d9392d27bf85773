"""MoM, Mixture-of-Memories: linear attention over M memories, written and read through a router.

Each head keeps ``M`` memory matrices ``S^m [K, V]``. A router (its logits ``router_logits
[B, T, H, M]`` come from the layer) sends every token to its ``top_k`` memories ``sel(t)``; only
those are updated, the others stay exactly as they were at that step::

    S^m_t = exp(g_t) S^m_{t-1} + k_t v_t^T      if m in sel(t)
    S^m_t = S^m_{t-1}                           otherwise
    o_t   = scale * sum_{m in sel(t)} w_t^m (S^m_t)^T q_t,   w_t = softmax(router_logits_t[sel(t)])

With ``shared_memory=True`` one more memory (the last, index ``M``) is always written and read
with weight 1: ``o_t += scale * (S^shared_t)^T q_t``. The memory rule is plain linear attention,
optionally gated by a scalar log-decay ``g [B, T, H]`` (<= 0; ``g=None``: no decay). The state is
float32 ``[B, H, M (+1 shared), K, V]``.

Reference:
  Du, Sun, Lan, Hu, Cheng, "MoM: Linear Sequence Modeling with Mixture-of-Memories", 2025.

Chunkwise form: per memory, the tokens routed to it form a masked linear-attention problem, a
write mask ``a_t^m`` (1 if selected) on keys and decays and a read weight ``w_t^m`` on queries:
``k^m = a^m k``, ``g^m = a^m g``, ``q^m = w^m q``, and ``o = sum_m o^m``. The memories are laid
side by side as extra heads and solved by one chunkwise scalar-decay linear attention. The routing
weights enter by multiplication, so gradients reach ``router_logits`` through the selected
memories' softmax weights (the top-k choice itself is piecewise constant).

Example::

    >>> import torch
    >>> from effattn.linear import chunk_mom, naive_mom
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> logits = torch.randn(1, 10, 2, 4)
    >>> o, s = chunk_mom(q, k, v, logits, top_k=2, output_final_state=True, chunk_size=4)
    >>> o_ref, _ = naive_mom(q, k, v, logits, top_k=2)
    >>> bool(torch.allclose(o, o_ref, atol=1e-4)), tuple(s.shape)
    (True, (1, 2, 4, 8, 8))
"""

from __future__ import annotations

import torch

from effattn._checks import check_int, check_log_gate, check_scale, check_tensor
from effattn.linear._common import (
    LinearOp,
    check_chunk_size,
    check_linear_qkv,
    check_state,
    register,
    run_varlen,
    to_chunks,
)
from effattn.linear._delta import check_varlen_state, log_decay_for_strength, segment_decay_matrix

__all__ = ["naive_mom", "chunk_mom", "step_mom"]


def _check_inputs(q, k, v, router_logits, g, top_k, scale):
    B, T, H, K, V = check_linear_qkv(q, k, v)
    check_tensor("router_logits", router_logits, 4, "[batch, seq, heads, num_memories]")
    if tuple(router_logits.shape[:3]) != (B, T, H) or router_logits.shape[3] < 1:
        raise ValueError(
            f"router_logits must have shape [batch, seq, heads, num_memories] = ({B}, {T}, {H}, M >= 1), "
            f"got {tuple(router_logits.shape)}"
        )
    if torch.isnan(router_logits).any():
        raise ValueError("router_logits contains NaN")
    M = router_logits.shape[3]
    check_int(f"top_k (num_memories = {M})", top_k, minimum=1, maximum=M)
    if g is not None:
        check_log_gate("g", g, (B, T, H), "[batch, seq, heads]")
    return B, T, H, K, V, M, check_scale(scale, K)


def _route(router_logits: torch.Tensor, top_k: int, shared_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense routing tensors ``[B, T, H, M (+1)]`` in float32: read weights ``w`` (softmax over the
    selected logits, 0 elsewhere; 1 for the shared memory) and write mask ``a`` (1 where selected)."""
    logits = router_logits.float()
    top = logits.topk(top_k, dim=-1)
    w = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    a = torch.zeros_like(logits).scatter(-1, top.indices, 1.0)
    if shared_memory:
        one = logits.new_ones(*logits.shape[:3], 1)
        w, a = torch.cat([w, one], dim=-1), torch.cat([a, one], dim=-1)
    return w, a


def naive_mom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    top_k: int = 2,
    shared_memory: bool = False,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token Mixture-of-Memories in float32 (the ground truth).

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, router_logits ``[B, T, H, M]``, optional log-decay
    g ``[B, T, H]``; state float32 ``[B, H, M (+1 if shared_memory), K, V]``. For every token the
    ``top_k`` selected memories decay and add ``k v^T``; the rest are left unchanged; the output
    is the softmax(selected logits)-weighted sum of reading each selected memory with ``scale q``.
    """
    B, T, H, K, V, M, scale = _check_inputs(q, k, v, router_logits, g, top_k, scale)
    Ms = M + int(shared_memory)
    kw = dict(top_k=top_k, shared_memory=shared_memory, scale=scale)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, Ms, K, V))
        seq = dict(q=q, k=k, v=v, router_logits=router_logits, g=g)
        return run_varlen(naive_mom, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, Ms, K, V))

    w, a = _route(router_logits, top_k, shared_memory)  # [B, T, H, Ms]
    qf, kf, vf = q.float(), k.float(), v.float()
    S = S0 if S0 is not None else q.new_zeros(B, H, Ms, K, V, dtype=torch.float32)
    outs = []
    for t in range(T):
        selected = a[:, t] > 0  # [B, H, Ms]
        if g is not None:  # only the selected memories decay (a memory not selected is untouched)
            decay = torch.where(selected, g[:, t, :, None].float().exp(), 1.0)
            S = S * decay[..., None, None]
        kv = torch.einsum("bhk,bhv->bhkv", kf[:, t], vf[:, t])
        S = S + a[:, t, :, :, None, None] * kv[:, :, None]
        outs.append(torch.einsum("bhmkv,bhk,bhm->bhv", S, qf[:, t], w[:, t]) * scale)
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(B, 0, H, V)
    return o.to(q.dtype), (S if output_final_state else None)


def step_mom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    top_k: int = 2,
    shared_memory: bool = False,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: advance the carried memories ``initial_state [B, H, M (+1), K, V]`` by the few
    given tokens (the recurrence of :func:`naive_mom`; same arguments and result)."""
    return naive_mom(
        q,
        k,
        v,
        router_logits,
        g,
        top_k=top_k,
        shared_memory=shared_memory,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def _chunk_mom_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    S0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise MoM on float32 ``[B, T, H, *]`` inputs with dense routing ``w, a [B, T, H, Ms]``.

    Memory ``m`` is the masked linear attention ``S^m_t = exp(a^m_t g_t) S^m_{t-1} + a^m_t k_t v_t^T``
    read with ``w^m_t q_t``. Per chunk, with ``Gamma^m_tj = exp(sum_{j<l<=t} a^m_l g_l)`` (t >= j):

        O   = scale (sum_m diag(w^m e^{G^m}) Q S^m + (Q K^T * D) V),  D_tj = sum_m w^m_t a^m_j Gamma^m_tj
        S^m <- e^{G^m_C} S^m + (diag(a^m Gamma^m_{C, :}) K)^T V

    The intra-chunk part needs one ``Q K^T`` for all memories (they share q, k, v and differ only in
    the scalar mask ``D``); only reading and writing the states is per memory.
    Returns ``(o [B, T, H, V], S_T [B, H, Ms, K, V])``.
    """
    B, T, H, K = q.shape
    V, Ms = v.shape[-1], w.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    T_pad = N * C

    def chunks(x):  # [B, T, H, *] -> [B, H, N, C, *]
        return to_chunks(x, C).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    wc, ac = chunks(w), chunks(a)  # [B, H, N, C, Ms]; padding: not routed
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        D = (wc @ ac.transpose(-1, -2)).tril()
        read, write, decay_last = wc, ac, None
    else:
        # a memory that is not selected does not decay; where() also keeps 0 * -inf out
        g_m = torch.where(ac > 0, chunks(g)[..., None], 0.0).transpose(-1, -2)  # [B,H,N,Ms,C]
        # a^m_j Gamma^m_tj: the write mask folded into the decay matrix's mask (exp(-inf) = 0)
        written = causal & (ac.transpose(-1, -2)[..., None, :] > 0)
        gamma = segment_decay_matrix(g_m, written)  # [B, H, N, Ms, C, C]
        D = (gamma * wc.transpose(-1, -2)[..., :, None]).sum(-3)
        eG = g_m.cumsum(-1).exp()  # [B, H, N, Ms, C]
        read = wc * eG.transpose(-1, -2)
        write = gamma[..., -1, :].transpose(-1, -2)  # a^m_j exp(G^m_C - G^m_j)
        decay_last = eG[..., -1]  # [B, H, N, Ms]
    q_read = (qc[..., None, :] * read[..., None]).flatten(-2)  # [B, H, N, C, Ms*K]
    k_write = (kc[..., None, :] * write[..., None]).flatten(-2)
    R = (k_write.transpose(-1, -2) @ vc).unflatten(-2, (Ms, K))  # [B, H, N, Ms, K, V]

    S = S0 if S0 is not None else q.new_zeros(B, H, Ms, K, V)
    starts = []
    decays = decay_last.unbind(2) if decay_last is not None else [None] * N
    for R_n, d_n in zip(R.unbind(2), decays, strict=True):
        starts.append(S)
        S = (S * d_n[..., None, None] if d_n is not None else S) + R_n
    S_start = torch.stack(starts, dim=2).flatten(-3, -2)  # [B, H, N, Ms*K, V]
    o = (q_read @ S_start + ((qc @ kc.transpose(-1, -2)) * D) @ vc) * scale
    return o.movedim(1, 3).reshape(B, T_pad, H, V)[:, :T].contiguous(), S


def chunk_mom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    top_k: int = 2,
    shared_memory: bool = False,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel Mixture-of-Memories; same result as :func:`naive_mom`, differentiable
    w.r.t. q, k, v, router_logits, g and initial_state, memory linear in T.

    Each memory ``m`` is a masked linear attention with ``q^m = w^m q``, ``k^m = a^m k``,
    ``g^m = a^m g`` (``w`` routing weights, ``a`` the 0/1 selection); their outputs are summed.
    """
    B, T, H, K, V, M, scale = _check_inputs(q, k, v, router_logits, g, top_k, scale)
    check_chunk_size(chunk_size)
    Ms = M + int(shared_memory)
    kw = dict(top_k=top_k, shared_memory=shared_memory, scale=scale, chunk_size=chunk_size)
    if cu_seqlens is not None:
        check_varlen_state(cu_seqlens, B, T, initial_state, (H, Ms, K, V))
        seq = dict(q=q, k=k, v=v, router_logits=router_logits, g=g)
        return run_varlen(chunk_mom, cu_seqlens, seq, kw, initial_state, output_final_state)
    S0 = check_state("initial_state", initial_state, (B, H, Ms, K, V))
    if T == 0:
        S = S0 if S0 is not None else q.new_zeros(B, H, Ms, K, V, dtype=torch.float32)
        return v.new_zeros(B, 0, H, V).to(q.dtype), (S if output_final_state else None)

    w, a = _route(router_logits, top_k, shared_memory)  # [B, T, H, Ms]
    gf = None if g is None else g.float()
    o, S = _chunk_mom_core(q.float(), k.float(), v.float(), w, a, gf, scale, S0, chunk_size)
    return o.to(q.dtype), (S if output_final_state else None)


_NUM_MEMORIES, _TOP_K = 4, 2


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """Random inputs: q, k, v ~ N(0, 1), router logits ~ N(0, 1) over 4 memories with top_k=2 and a
    shared memory, g <= 0 from the gated ops' strength scale (near 0 to very strong decay)."""
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    logits = torch.randn(B, T, H, _NUM_MEMORIES, device=device, dtype=dtype)
    g = log_decay_for_strength((B, T, H), gate_strength, device=device, dtype=dtype)
    return (q, k, v, logits, g), dict(top_k=_TOP_K, shared_memory=True)


register(
    LinearOp(
        name="mom",
        naive=naive_mom,
        chunk=chunk_mom,
        step=step_mom,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, _NUM_MEMORIES + 1, D, D),
        differentiable_args=("q", "k", "v", "router_logits", "g"),
    )
)
