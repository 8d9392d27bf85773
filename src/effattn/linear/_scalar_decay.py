"""The one chunkwise kernel for linear recurrences with a scalar log-decay per head and step.

Recurrence (one ``[K, V]`` matrix state per batch row and head; ``g_t <= 0`` a scalar)::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

Simple GLA / Mamba-2 SSD (data-dependent ``g_t``), RetNet retention and Lightning Attention-2
(a fixed ``g`` per head) are this recurrence; plain linear attention is it with no decay
(``g = None``). :mod:`simple_gla`, :mod:`retnet`, :mod:`lightning` and :mod:`linear_attn` are thin
front ends over the functions here.

Chunkwise form (as in Mamba-2's SSD and Lightning Attention-2). Cut the sequence into chunks of
``C`` tokens; inside a chunk (positions ``1..C``) that starts from state ``S_0``, with
``G_i = g_1 + ... + g_i``::

    o_i   = scale * ( exp(G_i) q_i^T S_0  +  sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j )
    S_C   = exp(G_C) S_0  +  sum_j exp(G_C - G_j) k_j v_j^T

The intra-chunk term is a masked ``C x C`` attention (batched matmuls over all chunks and heads at
once), the state passing a short Python loop over chunks on ``[K, V]`` matrices only.

Numerics. Every exponent above is a sum of gates over a range of steps, hence ``<= 0``; each is
computed as a difference ``G_i - G_j`` only where ``i >= j`` and masked before ``exp``, never as
``exp(-G)`` (which overflows for strong decay). The chunk's cumulative sums are taken in float64
and split into a float32 pair ``hi + lo``, so that the differences keep full accuracy when strong
early decay makes ``G`` large while the gates in between are weak (a plain float32 difference loses
about ``|G| * 6e-8`` relative accuracy: ~5e-5 once ``G`` reaches -1000); see :func:`decay_matrix`.
The diagonal ``G_i - G_i`` is the constant 0, so that no O(1) gradients cancel into the gates'
(possibly tiny) gradients. Gates of ``-inf`` (a hard reset) are allowed: they are clamped to
``LOG_DECAY_FLOOR`` (= -1e4, exp() of it is 0).

Some helpers here (validation of states, the chunk-state scan) are shared with the vector-gate
kernel of :mod:`effattn.linear.gla`; chunking and the chunk-size check are the family's, in
:mod:`effattn.linear._common`.
"""

from __future__ import annotations

import math

import torch

from effattn._checks import check_cu_seqlens, check_scale
from effattn.linear._common import check_chunk_size, check_state, from_chunks, run_varlen, to_chunks
from effattn.linear._triton import chunk_scalar_decay_triton, resolve_backend

# ----------------------------------------------------------------------------------------------
# validation and dtype helpers shared by the front ends
# ----------------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def num_states(batch: int, seq: int, cu_seqlens: torch.Tensor | None) -> int:
    """How many independent sequences (and states) a call has: ``batch``, or the number of packed
    sequences with ``cu_seqlens`` (validated here)."""
    if cu_seqlens is None:
        return batch
    check_cu_seqlens(cu_seqlens, batch, seq)
    return cu_seqlens.numel() - 1


def check_matrix_state(initial_state, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``initial_state`` is None or a floating tensor of exactly ``shape``."""
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        raise TypeError(
            f"initial_state must be a torch.Tensor of shape {tuple(shape)}, got {type(initial_state).__name__}"
        )
    check_state("initial_state", initial_state, shape)
    return initial_state


def decay_magnitude(gate_strength: float) -> float:
    """Typical per-step ``-log decay`` for ``make_inputs``: log-uniform from 1e-3 (near-zero
    decay, ``gate_strength=0``) to 20 (very strong, ``gate_strength=1``)."""
    s = min(max(float(gate_strength), 0.0), 1.0)
    return 10.0 ** (-3.0 + s * math.log10(2e4))


# ----------------------------------------------------------------------------------------------
# numerics helpers
# ----------------------------------------------------------------------------------------------


# Log-decays are clamped at this floor: exp() of it is 0 in float32 already, and a finite floor
# keeps differences of cumulated decays free of (-inf) - (-inf).
LOG_DECAY_FLOOR = -1e4


def chunk_cumsum(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inclusive cumulative sums ``G`` of ``g [..., C]`` along the last dim, computed in float64 and
    split as ``G = hi + lo`` (``hi`` = G rounded to g's dtype, ``lo`` the rounding error, both in
    g's dtype). Returns ``(G64, hi, lo)``; gradients flow through all three."""
    G64 = g.clamp(min=LOG_DECAY_FLOOR).double().cumsum(-1)
    hi = G64.to(g.dtype)
    lo = (G64 - hi.double()).to(g.dtype)
    return G64, hi, lo


def decay_matrix(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``exp(G_i - G_j)`` for ``i >= j`` and 0 for ``i < j``, ``[..., C, C]``, from the split
    cumulative sums of :func:`chunk_cumsum`.

    ``hi_i - hi_j`` is exact whenever ``G_i`` and ``G_j`` are within a factor 2 of each other
    (Sterbenz), and otherwise the difference is large, so its relative rounding error is harmless;
    ``lo_i - lo_j`` restores what rounding ``G`` to float32 lost. The result has the accuracy of a
    float64 difference at the cost of three float32 ``C x C`` operations: no catastrophic
    cancellation when strong early decay makes ``G`` large, and never ``exp`` of anything > 0."""
    C = hi.shape[-1]
    D = (hi.unsqueeze(-1) - hi.unsqueeze(-2)) + (lo.unsqueeze(-1) - lo.unsqueeze(-2))
    strict = torch.ones(C, C, dtype=torch.bool, device=hi.device).tril(-1)
    # the diagonal is exactly 0, a constant: computed as G_i - G_i its O(1) gradients would flow
    # into g with opposite signs and cancel only up to float32 rounding, swamping the true (tiny)
    # gradient of strongly decaying gates
    fill = torch.full((C, C), float("-inf"), dtype=hi.dtype, device=hi.device).fill_diagonal_(0.0)
    return torch.where(strict, D, fill).exp()


def scan_states(
    U: torch.Tensor, decay: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level state passing ``S_n = decay_n * S_{n-1} + U_n``.

    ``U`` is ``[B, H, N, K, V]``, ``decay`` broadcastable to it (``[B, H, N, 1, 1]`` for a scalar
    decay, ``[B, H, N, K, 1]`` for a vector one) or None for no decay, ``state`` the ``S_{-1}``
    (zeros when None). Returns the states entering each chunk ``[B, H, N, K, V]`` and the last one.
    """
    B, H, N, K, V = U.shape
    if state is None:
        state = U.new_zeros(B, H, K, V)
    if decay is None:
        csum = U.cumsum(2)
        entering = torch.cat([U.new_zeros(B, H, 1, K, V), csum[:, :, :-1]], dim=2) + state.unsqueeze(2)
        return entering, csum[:, :, -1] + state
    # unbind (not U[:, :, n]): its backward stacks the N gradients once instead of scattering
    # each into a full-size zero tensor.
    entering = []
    S = state
    for U_n, d_n in zip(U.unbind(2), decay.unbind(2), strict=True):
        entering.append(S)
        S = S * d_n + U_n
    return torch.stack(entering, dim=2), S


# ----------------------------------------------------------------------------------------------
# the two kernels (compute-dtype tensors in, compute-dtype tensors out; no validation)
# ----------------------------------------------------------------------------------------------


def recurrent_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g [B, T, H]``
    or None; returns ``o [B, T, H, V]`` and the final state ``[B, H, K, V]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if state is None else state
    outs = []
    gs = g.unbind(1) if g is not None else [None] * T
    for q_t, k_t, v_t, g_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), gs, strict=True):
        if g_t is not None:
            S = S * g_t.exp()[..., None, None]
        S = S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V)
    return o, S


def chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form (see the module docstring); same arguments as
    :func:`recurrent_scalar_decay` plus ``chunk_size``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), (q.new_zeros(B, H, K, V) if state is None else state)
    qc, kc, vc = (to_chunks(x, chunk_size) for x in (q, k, v))  # [B, H, N, C, *]
    A = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    if g is None:
        A = torch.tril(A)
        q_in, k_out, decay = qc, kc, None
    else:
        gc = to_chunks(g, chunk_size)  # [B, H, N, C]
        G64, hi, lo = chunk_cumsum(gc)  # G_i from the chunk start: <= 0
        A = A * decay_matrix(hi, lo)  # exp(G_i - G_j) for i >= j, 0 above the diagonal
        q_in = qc * hi.exp().unsqueeze(-1)
        k_out = kc * (G64[..., -1:] - G64).to(gc.dtype).exp().unsqueeze(-1)  # exp(G_C - G_j)
        decay = hi[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
    U = k_out.transpose(-1, -2) @ vc  # each chunk's contribution to the state: [B, H, N, K, V]
    entering, last = scan_states(U, decay, state)
    o = (A @ vc + q_in @ entering) * scale
    return from_chunks(o, T), last


# ----------------------------------------------------------------------------------------------
# front end shared by simple_gla / retnet / lightning
# ----------------------------------------------------------------------------------------------


def _dense(q, k, v, g, *, scale, form, chunk_size, initial_state, output_final_state, backend="auto"):
    cdt = compute_dtype(q)
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    gf = g.to(cdt) if g is not None else None
    s0 = initial_state.to(cdt) if initial_state is not None else None
    if form == "chunk" and resolve_backend(backend, q, v.shape[-1]) == "triton":
        gf = gf.clamp(min=LOG_DECAY_FLOOR) if gf is not None else None
        o, s = chunk_scalar_decay_triton(qf, kf, vf, gf, scale, s0, chunk_size)
    elif form == "chunk":
        o, s = chunk_scalar_decay(qf, kf, vf, gf, scale, s0, chunk_size)
    else:
        o, s = recurrent_scalar_decay(qf, kf, vf, gf, scale, s0)
    return o, (s if output_final_state else None)


def run_scalar_decay(
    form: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``form`` ("naive" or "chunk") on validated inputs (``g`` already ``[B, T, H]``,
    ``initial_state`` already checked), splitting packed sequences at ``cu_seqlens``.
    ``backend`` ("auto", "torch", "triton") selects the chunk form's kernels (see
    :func:`effattn.linear._triton.choose_backend`: "auto" is Triton on CUDA tensors the kernels cover),
    decided once for the whole call. Returns the output in the compute dtype (callers cast) and the final
    state or None."""
    if form == "chunk":
        backend = resolve_backend(backend, q, v.shape[-1])
    kwargs = {"scale": scale, "form": form, "chunk_size": chunk_size, "backend": backend}
    if cu_seqlens is not None:
        return run_varlen(
            _dense, cu_seqlens, {"q": q, "k": k, "v": v, "g": g}, kwargs, initial_state, output_final_state
        )
    return _dense(q, k, v, g, **kwargs, initial_state=initial_state, output_final_state=output_final_state)


def scalar_decay_op(
    form: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Everything after the gate check for a scalar-decay op: scale, chunk size, packed sequences,
    initial state, dtypes, the chunk form's ``backend``. ``q, k, v`` validated by the caller, ``g`` a
    validated ``[B, T, H]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    if form == "chunk":
        check_chunk_size(chunk_size)
    n = num_states(B, T, cu_seqlens)
    check_matrix_state(initial_state, (n, H, K, V))
    o, s = run_scalar_decay(
        form,
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
    )
    return o.to(q.dtype), s
