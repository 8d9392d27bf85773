"""GLA: gated linear attention with a data-dependent decay per key dimension.

Recurrence (state ``S_t`` of shape ``[K, V]`` per head, log-gate ``gk_t <= 0`` a ``K``-vector)::

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

Reference:
  Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
  Training", 2024.

Chunkwise form. In a chunk that starts from state ``S_0``, with ``G_i = gk_1 + ... + gk_i``
(per key dimension, from the chunk start)::

    o_i = scale * ( (q_i * exp(G_i))^T S_0  +  sum_{j <= i} (q_i . (k_j * exp(G_i - G_j))) v_j )
    S_C = diag(exp(G_C)) S_0  +  sum_j (k_j * exp(G_C - G_j)) v_j^T

The difficulty is numerical: the decay differs per key dimension, so the intra-chunk weights are
not a mask on ``Q K^T``, and the factorisation ``(q_i exp(G_i)) . (k_j exp(-G_j))`` overflows once
decay is strong (``exp(-G)`` with ``G`` in the thousands). GLA's answer is secondary chunking
(sub-chunks of 16 with a reference point at the sub-chunk boundary, and a ``[16, 16, K]`` tensor
for the diagonal sub-blocks). Here the same idea is applied recursively, which removes the
``[c, c, K]`` tensor: for block sizes ``b = 1, 2, 4, ..., C/2`` split each chunk into pairs of
adjacent blocks; for a query ``i`` in the right block and a key ``j`` in the left one, the split
point ``r`` between them gives

    exp(G_i - G_j) = exp(G_i - G_r) * exp(G_r - G_j),   both exponents <= 0,

so that block of ``A`` is the ordinary matmul ``(q * exp(G_i - G_r)) (k * exp(G_r - G_j))^T``,
finite and accurate for any decay. Every pair ``j < i`` of a chunk is covered at exactly one level
(where ``i`` and ``j`` first fall into different halves of one block); ``j = i`` is ``q_i . k_i``.
The decay factors ``exp(G_i - G_r)`` (into a block) and ``exp(G_r - G_j)`` (out of a block) of
each level are products of those of the level below, numbers in [0, 1]: no ``exp(-G)``, no
difference of cumulative sums, no cancellation; the top level gives the inter-chunk factors
``exp(G_i)`` and ``exp(G_C - G_j)``. The blocks are assembled into the ``C x C`` matrix ``A``,
applied to the values in one matmul. Chunk sizes that are not powers of two are zero-padded
inside each chunk.

Example::

    >>> import torch
    >>> from effattn.linear import chunk_gla, naive_gla
    >>> q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    >>> gk = -torch.rand(1, 10, 2, 8)  # log-gates <= 0, one per key dimension
    >>> o, s = chunk_gla(q, k, v, gk, output_final_state=True, chunk_size=4)
    >>> o_ref, s_ref = naive_gla(q, k, v, gk, output_final_state=True)
    >>> bool(torch.allclose(o, o_ref, atol=1e-5)), tuple(s.shape)
    (True, (1, 2, 8, 8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_log_gate, check_scale
from effattn.linear._common import (
    LinearOp,
    check_chunk_size,
    check_linear_qkv,
    from_chunks,
    register,
    run_varlen,
    to_chunks,
)
from effattn.linear._scalar_decay import (
    LOG_DECAY_FLOOR,
    check_matrix_state,
    compute_dtype,
    decay_magnitude,
    num_states,
    scan_states,
)

__all__ = ["naive_gla", "chunk_gla", "step_gla"]


# ----------------------------------------------------------------------------------------------
# kernels (compute-dtype tensors, no validation)
# ----------------------------------------------------------------------------------------------


def _recurrent_gla(q, k, v, gk, scale, state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if state is None else state
    outs = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), gk.unbind(1), strict=True):
        S = S * g_t.exp().unsqueeze(-1) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)
    return o, S


def _intra_chunk(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The intra-block attention matrix ``A_ij = q_i . (k_j * exp(g_{j+1} + ... + g_i))`` for
    ``j <= i`` (0 above the diagonal) inside blocks of ``P`` tokens, ``P`` a power of two:
    ``q, k, g [..., P, K]`` -> ``A [..., P, P]``, by recursive halving (see the module docstring).

    Also returns the decay factors from the block start to each position, ``exp(G_i)``, and from
    each position to the block end, ``exp(G_P - G_j)``, which the inter-chunk terms need. Those of
    each level are built from the level below (``into(right half) * through(left half)``,
    ``out_of(left half) * through(right half)``): products of numbers in [0, 1], so nothing
    overflows or cancels, and there is no ``exp`` or cumulative sum per level. ``A`` is assembled
    bottom-up the same way, so that the values are applied in one ``[P, P] @ [P, V]`` matmul."""
    *lead, P, K = q.shape
    A = (q * k).sum(-1)[..., None, None]  # [..., P, 1, 1]: blocks of size b = 1 (the diagonal)
    into = g.exp()  # decay from the block start to i (inclusive), within blocks of size b
    out_of = None  # decay from j (exclusive) to the block end: 1 for b = 1
    b = 1
    while b < P:
        nb = P // (2 * b)

        def halves(x: torch.Tensor, nb: int = nb, b: int = b) -> tuple[torch.Tensor, torch.Tensor]:
            return x.reshape(*lead, nb, 2, b, x.shape[-1]).unbind(-3)

        (into_l, into_r), (A_l, A_r) = halves(into), halves(A)
        q_t = halves(q)[1] * into_r  # decay from the split point to the query i
        k_l = halves(k)[0]
        if out_of is None:
            k_t, out_r = k_l, None
        else:
            out_l, out_r = halves(out_of)
            k_t = k_l * out_l  # decay from the key j to the split point
        if b <= 2:  # tiny blocks: elementwise beats batched 1x1 / 2x2 matmuls
            A_lr = (q_t.unsqueeze(-2) * k_t.unsqueeze(-3)).sum(-1)
        else:
            A_lr = q_t @ k_t.transpose(-1, -2)  # [..., nb, b, b]: right-half queries, left-half keys
        top = torch.cat([A_l, torch.zeros_like(A_l)], dim=-1)
        A = torch.cat([top, torch.cat([A_lr, A_r], dim=-1)], dim=-2)  # [..., nb, 2b, 2b]
        # decay factors within blocks of size 2b
        through_l, through_r = into_l[..., -1:, :], into_r[..., -1:, :]
        into = torch.stack([into_l, into_r * through_l], dim=-3).reshape(*lead, P, K)
        out_l_new = through_r.expand_as(into_l) if out_of is None else out_l * through_r
        out_r_new = torch.ones_like(into_r) if out_of is None else out_r
        out_of = torch.stack([out_l_new, out_r_new], dim=-3).reshape(*lead, P, K)
        b *= 2
    if out_of is None:  # P == 1
        out_of = torch.ones_like(into)
    return A.reshape(*lead, P, P), into, out_of


def _chunk_gla(q, k, v, gk, scale, state, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), (q.new_zeros(B, H, K, V) if state is None else state)
    gk = gk.clamp(min=LOG_DECAY_FLOOR)
    qc, kc, vc, gc = (to_chunks(x, chunk_size) for x in (q, k, v, gk))  # [B, H, N, C, *]
    # intra-chunk, on chunks zero-padded to a power of two (the padding comes after every real
    # token and its gates are 0: it changes no attention weight or decay factor of a real one)
    C = chunk_size
    P = 1 << (C - 1).bit_length()
    if P != C:
        qc, kc, gc = (F.pad(x, (0, 0, 0, P - C)) for x in (qc, kc, gc))
    A, into, out_of = _intra_chunk(qc, kc, gc)  # into = exp(G_i), out_of = exp(G_C - G_j)
    if P != C:
        A, into, out_of, qc, kc = A[..., :C, :C], *(x[..., :C, :] for x in (into, out_of, qc, kc))
    o = A @ vc

    # inter-chunk: state passing, and the contribution of the state entering each chunk
    U = (kc * out_of).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    entering, last = scan_states(U, into[..., -1, :].unsqueeze(-1), state)
    o = o + (qc * into) @ entering
    return from_chunks(o * scale, T), last


# ----------------------------------------------------------------------------------------------
# public forms
# ----------------------------------------------------------------------------------------------


def _dense(q, k, v, gk, *, scale, form, chunk_size, initial_state, output_final_state):
    cdt = compute_dtype(q)
    qf, kf, vf, gf = q.to(cdt), k.to(cdt), v.to(cdt), gk.to(cdt)
    s0 = initial_state.to(cdt) if initial_state is not None else None
    if form == "chunk":
        o, s = _chunk_gla(qf, kf, vf, gf, scale, s0, chunk_size)
    else:
        o, s = _recurrent_gla(qf, kf, vf, gf, scale, s0)
    return o, (s if output_final_state else None)


def _gla(form, q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, chunk_size=64):
    B, T, H, K, V = check_linear_qkv(q, k, v)
    check_log_gate("gk", gk, (B, T, H, K), "[batch, seq, heads, key_dim]")
    scale = check_scale(scale, K)
    if form == "chunk":
        check_chunk_size(chunk_size)
    check_matrix_state(initial_state, (num_states(B, T, cu_seqlens), H, K, V))
    kwargs = {"scale": scale, "form": form, "chunk_size": chunk_size}
    if cu_seqlens is not None:
        o, s = run_varlen(
            _dense, cu_seqlens, {"q": q, "k": k, "v": v, "gk": gk}, kwargs, initial_state, output_final_state
        )
    else:
        o, s = _dense(q, k, v, gk, **kwargs, initial_state=initial_state, output_final_state=output_final_state)
    return o.to(q.dtype), s


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: the recurrence token by token in float32.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``gk [B, T, H, K]`` (log-gates, <= 0); ``scale``
    defaults to ``K ** -0.5``; ``initial_state`` and the final state are float32 ``[B, H, K, V]``
    (``[N, H, K, V]`` with ``N`` packed sequences given by ``cu_seqlens``).
    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    return _gla("naive", q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel GLA (recursive secondary chunking inside chunks of ``chunk_size``, state
    passing between them). Same arguments and result as :func:`naive_gla`; differentiable by
    autograd, memory linear in T, finite and accurate for any decay strength."""
    return _gla("chunk", q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def step_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: the recurrence on a few new tokens against the carried ``initial_state``.
    Same arguments and result as :func:`naive_gla`."""
    return _gla("naive", q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens)


def _make_inputs(B, T, H, D, *, device="cpu", dtype=torch.float32, gate_strength=0.5):
    """q ~ N(0, 1), k unit-norm, v ~ N(0, 1); ``gk = -m * u`` per key dimension with
    ``u ~ U(0.1, 1.9)`` and ``m`` from 1e-3 (``gate_strength=0``) to 20 (``gate_strength=1``)."""
    q = torch.randn(B, T, H, D, device=device)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    v = torch.randn(B, T, H, D, device=device)
    gk = -decay_magnitude(gate_strength) * (0.1 + 1.8 * torch.rand(B, T, H, D, device=device))
    return tuple(x.to(dtype) for x in (q, k, v, gk)), {}


register(
    LinearOp(
        name="gla",
        naive=naive_gla,
        chunk=chunk_gla,
        step=step_gla,
        make_inputs=_make_inputs,
        state_shape=lambda B, H, D: (B, H, D, D),
        differentiable_args=("q", "k", "v", "gk"),
    )
)
