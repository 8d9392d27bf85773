"""The softmax-attention family as mixers: ``"attention"`` (MHA/GQA/MQA), ``"sliding_window"``,
``"mla"`` (multi-head latent attention) and ``"moh"`` (mixture-of-head attention). The layers live in
:mod:`effattn.nn.attention`, :mod:`effattn.nn.mla` and :mod:`effattn.nn.moh`; this module only
registers them (with the defaults a mixer built from ``(dim, heads)`` needs)."""

from __future__ import annotations

from torch import nn

from effattn.nn.attention import Attention
from effattn.nn.mixers._base import check_heads
from effattn.nn.mla import MLA
from effattn.nn.moh import MoHAttention
from effattn.nn.registry import register_mixer

__all__ = ["mla_mixer", "sliding_window_mixer"]

register_mixer("attention")(Attention)
register_mixer("moh")(MoHAttention)


@register_mixer("sliding_window")
def sliding_window_mixer(dim: int, heads: int, window: int = 128, **kw) -> nn.Module:
    """Causal attention over the ``window`` most recent keys (:class:`~effattn.nn.Attention` with a window).

    Example::

        >>> sliding_window_mixer(32, 4, window=8).window
        8
    """
    return Attention(dim, heads, window=window, **kw)


@register_mixer("mla")
def mla_mixer(dim: int, heads: int, **kw) -> nn.Module:
    """MLA (DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language
    Model", 2024) with DeepSeek-V2's proportions unless given: latent ``kv_lora_rank = 4 * head_dim``,
    ``qk_nope_head_dim = v_head_dim = head_dim``, decoupled RoPE key of ``head_dim / 2``.

    Example::

        >>> mla_mixer(32, 4).kv_lora_rank
        32
    """
    hd = check_heads(dim, heads)
    kw.setdefault("kv_lora_rank", 4 * hd)
    kw.setdefault("qk_nope_head_dim", hd)
    kw.setdefault("qk_rope_head_dim", max(2, hd // 4 * 2))
    kw.setdefault("v_head_dim", hd)
    return MLA(dim, heads, **kw)
