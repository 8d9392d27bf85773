"""The ``sdpa`` backend: ``torch.nn.functional.scaled_dot_product_attention`` with no dense mask.

It covers the calls PyTorch's fused kernels take without a ``T_q x T_k`` mask or bias tensor: no
mask, causal with ``T_q == T_k`` (SDPA aligns causal masks top-left, which agrees with bottom-right
only there) or a single query (which sees every key: no mask), GQA, any head dims. For these it is
at the hardware's limit, so ``auto`` tries it first.

Example::

    >>> import torch
    >>> from effattn.exact.api import attention_call
    >>> from effattn.exact.backends import REGISTRY
    >>> q = torch.randn(1, 8, 2, 16)
    >>> REGISTRY["sdpa"].why_not(attention_call(q, q, q, causal=True, window=4))
    ['window not supported (it would need a dense T_q x T_k mask or bias)']
"""

from __future__ import annotations

import torch

from effattn.exact.backends import REGISTRY, AttentionCall, Backend, Capabilities

__all__ = ["SdpaBackend"]

_SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")
_DENSE = "it would need a dense T_q x T_k mask or bias"


class SdpaBackend(Backend):
    """``torch.nn.functional.scaled_dot_product_attention`` without a dense mask: no mask,
    causal (``T_q == T_k``, or one query), GQA. At the hardware limit for these cases."""

    name = "sdpa"
    auto_priority = 10
    capabilities = Capabilities(
        summary="PyTorch's scaled_dot_product_attention (fused flash / memory-efficient kernels)",
        masks=frozenset({"none", "causal"}),
        causal_bottom_right=False,
        varlen=False,
        score_mod=False,
        softcap=False,
        alibi=False,
        sinks=False,
        return_lse=False,
        # PyTorch documents that its CUDA attention kernels may pick nondeterministic algorithms
        deterministic_on=frozenset({"cpu"}),
        notes={
            **{arg: _DENSE for arg in ("window", "block_mask", "mask_mod", "cu_seqlens", "score_mod")},
            **{arg: _DENSE for arg in ("softcap", "alibi_slopes", "sinks")},
            "return_lse": "PyTorch's SDPA does not return the log-sum-exp",
        },
    )

    def run(self, c: AttentionCall):
        q, k, v = (x.transpose(1, 2) for x in (c.q, c.k, c.v))
        is_causal = c.causal and c.Tq == c.Tk  # T_q == 1 bottom-right causal sees every key
        kwargs = {}
        if c.Hq != c.Hkv:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(c.Hq // c.Hkv, dim=1)
                v = v.repeat_interleave(c.Hq // c.Hkv, dim=1)
        # PyTorch's fused CPU kernel needs one head width for q, k and v; otherwise SDPA falls back to its
        # math path, which materializes the T_q x T_k scores (MLA's prefill at 8k: 7x slower). Zero columns
        # change nothing (the scale is explicit); one query row has no T x T matrix to avoid.
        Dv = v.shape[-1]
        if q.shape[-1] != Dv and c.Tq > 1:
            width = max(q.shape[-1], Dv)
            q, k, v = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=c.scale, **kwargs)
        return o[..., :Dv].transpose(1, 2), None


REGISTRY.register(SdpaBackend.name, SdpaBackend())
