"""The materialized softmax-attention formula: the ground truth of every exact and sparse backend.

    S = (q k^T) * scale ;  S <- score_mod(S) ;  S[~mask] = -inf
    lse_i = log( sum_j exp(S_ij) + exp(sink_h) )        (the sink term only with learned sinks)
    O = exp(S - lse) v

Memory is ``O(B * H * T_q * T_k)``: above ``max_elements`` it raises and names the tiled backend.
It computes in ``compute_dtype(q.dtype)``: float32 for half, bfloat16 and float32 inputs, float64 for
float64 (a float64 call is float64 end to end, so ``torch.autograd.gradcheck`` applies).
"""

from __future__ import annotations

import torch

from effattn._checks import check_qkv

MAX_DENSE_ELEMENTS = 2**27


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype exact attention computes in for inputs of ``dtype``: ``promote_types(dtype, float32)``.

    Low precision (float16, bfloat16) is upcast to float32 as FlashAttention accumulates ("FlashAttention:
    Fast and Memory-Efficient Exact Attention with IO-Awareness", Dao et al. 2022); float64 stays float64.
    The log-sum-exp an exact path returns has this dtype too.

    Example::

        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float32), compute_dtype(torch.float64)
        (torch.float32, torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask_mod=None,
    score_mod=None,
    sinks: torch.Tensor | None = None,
    upcast: bool = True,
    max_elements: int = MAX_DENSE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T_q, H, D_v], lse [B, H, T_q])`` computed densely in :func:`compute_dtype` (float32, or
    float64 for float64 input); with ``upcast=False`` in the input dtype (the low-precision reference of
    the FlashAttention test rule). ``lse`` is returned in :func:`compute_dtype` either way."""
    B, Tq, Tk, Hq, Hkv, D, Dv = check_qkv(q, k, v)
    if B * Hq * Tq * Tk > max_elements:
        raise ValueError(
            f"the reference backend would materialize a {B}x{Hq}x{Tq}x{Tk} score matrix "
            f"(> {max_elements} elements); use backend='tiled' (O(T) memory) or 'auto'"
        )
    dtype = compute_dtype(q.dtype) if upcast else q.dtype
    G = Hq // Hkv
    qf = q.to(dtype).transpose(1, 2)
    kf = k.to(dtype).repeat_interleave(G, dim=2).transpose(1, 2)
    vf = v.to(dtype).repeat_interleave(G, dim=2).transpose(1, 2)
    s = (qf @ kf.transpose(-1, -2)) * scale
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    qi = torch.arange(Tq, device=dev).view(1, 1, Tq, 1)
    ki = torch.arange(Tk, device=dev).view(1, 1, 1, Tk)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, qi, ki), float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)
        lse = torch.logsumexp(torch.cat([s, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - lse_safe[..., None])
    o = p @ vf
    return o.transpose(1, 2).to(q.dtype), lse.to(compute_dtype(q.dtype))
