"""One decode step's attention: one new query over a cache it sees entirely (the HF decode-step path).

:mod:`effattn.hf.attention` sends a step here when the query is alone (``T_q = 1``), nothing is masked
but a causal window (already applied by slicing the keys), there is no padding and no gradient.
"""

from __future__ import annotations

import torch

__all__ = ["one_query_attention"]


def one_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(cap(q k^T * scale)) v`` of one query per head over every key given (HF's layout:
    ``query [B, H_q, 1, D]``, ``key``/``value [B, H_kv, T_k, D]``), returned as ``[B, 1, H_q, D_v]``.

    The ``G = H_q / H_kv`` heads of a group are stacked as ``G`` query rows over their one KV head, so
    PyTorch's SDPA kernel reads each key once (about 1.5x faster on CPU than ``enable_gqa``). With a
    softcap (``cap * tanh(s / cap)``, Gemma 2) or sinks (a logit per head with no value, gpt-oss; "Efficient
    Streaming Language Models with Attention Sinks", Xiao et al. 2023) the ``G x T_k`` scores are written
    out in float32. Every key is visible to the query, so a NaN/inf key or value can only make the row
    non-finite; such rows are set to NaN (the rule of :mod:`effattn.exact.nonfinite`, checked on the
    output instead of scanning the ``T_k`` cached keys at every step).

    Example::

        >>> q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
        >>> one_query_attention(q, k, k, softcap=30.0).shape
        torch.Size([1, 1, 4, 8])
    """
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    qg = query.reshape(B, Hkv, G, D)
    if softcap is None and sinks is None:
        o = torch.nn.functional.scaled_dot_product_attention(qg, key, value, scale=scaling)
    else:
        scale = D**-0.5 if scaling is None else scaling
        s = torch.matmul(qg.float(), key.float().transpose(-1, -2)) * scale  # [B, H_kv, G, T_k]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        m = s.amax(-1, keepdim=True)
        if sinks is not None:
            m = torch.maximum(m, sinks.float().view(1, Hkv, G, 1))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        if sinks is not None:
            den = den + torch.exp(sinks.float().view(1, Hkv, G, 1) - m)
        o = (torch.matmul(p, value.float()) / den).to(query.dtype)
    o = o.reshape(B, 1, Hq, value.shape[-1])
    bad = ~torch.isfinite(o).all(-1, keepdim=True)
    return o.masked_fill(bad, float("nan"))
