"""What the delta-rule family shares: DeltaNet, Gated DeltaNet and Mixture-of-Memories.

:mod:`effattn.linear.delta_rule`, :mod:`effattn.linear.gated_delta_rule` and :mod:`effattn.linear.mom`
validate ``beta`` and packed-sequence states the same way, normalise q and k the same way, build the
same segment-sum decay matrix, and (for the first two) run one chunkwise kernel, :func:`chunk_delta_core`
(the UT transform of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"; ``g=None`` is the plain delta rule, see :mod:`effattn.linear.delta_rule` for the
math). The gated ops' ``make_inputs`` draw their log-decays from :func:`log_decay_for_strength`.

Example::

    >>> import torch
    >>> g = torch.tensor([[-0.5, -1.0, -0.25]])
    >>> keep = torch.ones(3, 3, dtype=torch.bool).tril()
    >>> segment_decay_matrix(g, keep)[0].log()  # entry (i, j): g_{j+1} + ... + g_i for i >= j
    tensor([[ 0.0000,    -inf,    -inf],
            [-1.0000,  0.0000,    -inf],
            [-1.2500, -0.2500,  0.0000]])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effattn._checks import check_cu_seqlens, check_tensor
from effattn.linear._common import check_state, to_chunks

__all__ = [
    "check_beta",
    "check_varlen_state",
    "chunk_delta_core",
    "log_decay_for_strength",
    "prepare_qk",
    "segment_decay_matrix",
]


def check_beta(beta: torch.Tensor, shape: tuple[int, int, int], allow_neg_eigval: bool) -> torch.Tensor:
    """``beta [batch, seq, heads]`` of ``shape``, in [0, 1] (or [0, 2] with ``allow_neg_eigval``)."""
    check_tensor("beta", beta, 3, "[batch, seq, heads]")
    if tuple(beta.shape) != tuple(shape):
        raise ValueError(f"beta must have shape [batch, seq, heads] = {tuple(shape)}, got {tuple(beta.shape)}")
    hi = 2.0 if allow_neg_eigval else 1.0
    if beta.numel() and (torch.isnan(beta).any() or (beta < 0).any() or (beta > hi).any()):
        what = "[0, 2]" if allow_neg_eigval else "[0, 1] (or [0, 2] with allow_neg_eigval=True)"
        raise ValueError(f"beta must lie in {what}, got values in [{beta.min().item():.4g}, {beta.max().item():.4g}]")
    return beta


def check_varlen_state(cu_seqlens: torch.Tensor, batch: int, total: int, initial_state, state_tail: tuple) -> None:
    """Packed sequences: batch 1, and the state has one row per sequence, ``[N, *state_tail]``."""
    check_cu_seqlens(cu_seqlens, batch, total)
    check_state("initial_state", initial_state, (cu_seqlens.numel() - 1, *state_tail))


def prepare_qk(q: torch.Tensor, k: torch.Tensor, use_qk_l2norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k in float32, L2-normalised along the key dim when ``use_qk_l2norm`` (fla's in-kernel norm)."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q = F.normalize(q, p=2.0, dim=-1, eps=1e-6)
        k = F.normalize(k, p=2.0, dim=-1, eps=1e-6)
    return q, k


def segment_decay_matrix(g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``Gamma[..., i, j] = exp(g_{j+1} + ... + g_i)`` where ``keep`` (a lower-triangular ``[C, C]``
    mask, or one broadcasting to ``[..., C, C]``) holds, 0 elsewhere, from per-chunk log-decays
    ``g [..., C]``.

    Each entry sums only its own segment (a masked cumsum, as Mamba2's ``segsum``) instead of
    differencing two cumulated sums: after one very strong decay, ``G_i - G_j`` of two large
    cumsums would lose the small decays that follow to float32 cancellation, and ``-inf`` gates
    would give ``-inf - (-inf)``. Exponents are <= 0 wherever ``exp`` is taken.
    """
    C = g.shape[-1]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    seg = g[..., :, None].expand(*g.shape, C).masked_fill(~strictly_lower, 0.0).cumsum(-2)
    return seg.masked_fill(~keep, float("-inf")).exp()


def chunk_delta_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    S0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (gated) delta rule on float32 ``[B, T, H, *]`` inputs (q, k already normalised).

    ``g`` (``[B, T, H]`` log-decay, or None for no decay). Returns ``(o [B, T, H, V], S_T [B, H, K, V])``.
    Padding tokens have ``k = v = beta = g = 0``: they neither write nor decay the state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    T_pad = N * C

    def chunks(x):  # [B, T, H, *] -> [B, H, N, C, *], contiguous for the batched triangular solve
        return to_chunks(x, C).contiguous()

    qc, kc, vc, bc = chunks(q), chunks(k), chunks(v), chunks(beta)  # [B, H, N, C, *]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    kk = kc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    qk = qc @ kc.transpose(-1, -2)
    if g is not None:
        gamma = segment_decay_matrix(chunks(g), causal)  # exp(G_i - G_j), i >= j; [B, H, N, C, C]
        kk = kk * gamma
        qk = qk * gamma
        eG = chunks(g).cumsum(-1).exp()  # exp(G_i), decay since the chunk start
        decay_last = eG[..., -1]  # exp(G_C): decay of the whole chunk, [B, H, N]
        k_to_end = kc * gamma[..., -1, :, None]  # k_j exp(G_C - G_j)
        k_w = kc * (bc * eG)[..., None]
    else:
        qk = qk.masked_fill(~causal, 0.0)
        decay_last = None
        k_to_end = kc
        k_w = kc * bc[..., None]

    # UT transform, all heads and chunks at once: (I + A) [W | U] = [diag(beta e^G) K | diag(beta) V].
    A = (bc[..., None] * kk).tril(-1)
    I_plus_A = A + torch.eye(C, dtype=A.dtype, device=A.device)
    WU = torch.linalg.solve_triangular(
        I_plus_A, torch.cat([k_w, vc * bc[..., None]], dim=-1), upper=False, unitriangular=True
    )
    W, U = WU[..., :K], WU[..., K:]

    # State passing S_n = M_n S_{n-1} + R_n: M_n = e^{G_C} I - (K e^{G_C - G})^T W, R_n = (K e^{G_C - G})^T U
    kt = k_to_end.transpose(-1, -2)  # [B, H, N, K, C]
    M = -(kt @ W)
    if decay_last is not None:
        M = M + decay_last[..., None, None] * torch.eye(K, dtype=M.dtype, device=M.device)
    else:
        M = M + torch.eye(K, dtype=M.dtype, device=M.device)
    R = kt @ U  # [B, H, N, K, V]
    S = S0 if S0 is not None else q.new_zeros(B, H, K, V)
    starts = []
    # unbind (not M[:, :, n]): its backward is one stack, where indexing would allocate a full-size
    # zero gradient per chunk (quadratic in the number of chunks).
    for M_n, R_n in zip(M.unbind(2), R.unbind(2), strict=True):
        starts.append(S)
        S = M_n @ S + R_n
    S_start = torch.stack(starts, dim=2)  # state entering each chunk, [B, H, N, K, V]

    delta = U - W @ S_start  # [B, H, N, C, V]
    q_in = qc * eG[..., None] if g is not None else qc
    o = (q_in @ S_start + qk @ delta) * scale  # [B, H, N, C, V]
    o = o.movedim(1, 3).reshape(B, T_pad, H, V)[:, :T].contiguous()
    return o, S


def log_decay_for_strength(
    shape: tuple[int, ...], gate_strength: float, *, device="cpu", dtype=torch.float32
) -> torch.Tensor:
    """Random log-decays ``g <= 0`` whose typical magnitude goes log-uniformly from 1e-4
    (``gate_strength=0``: almost no decay) to ~30 (``gate_strength=1``: the state is forgotten
    within a token, exp(-30) ~ 1e-13). Used by ``make_inputs`` of the gated ops."""
    if not 0.0 <= float(gate_strength) <= 1.0:
        raise ValueError(f"gate_strength must be in [0, 1], got {gate_strength!r}")
    magnitude = 10.0 ** (-4.0 + (4.0 + math.log10(30.0)) * float(gate_strength))
    spread = torch.empty(shape, device=device, dtype=torch.float32).uniform_(0.5, 1.5)
    return (-magnitude * spread).to(dtype)
