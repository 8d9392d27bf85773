"""The mixer registry: every sequence mixer of :mod:`effattn.nn` under one name.

A mixer is an ``nn.Module`` built as ``cls(dim, heads, **kw)`` whose ``forward(x [B, T, dim],
state=None, valid=None)`` returns ``(y [B, T, dim], new_state)`` and whose ``state_size(batch,
seq_len)`` gives the bytes of state it holds. Adding a mixer is one line: decorate its class with
``@register_mixer("name")``.

Example::

    >>> import torch
    >>> from effattn.nn import build_mixer, list_mixers
    >>> "gated_deltanet" in list_mixers()
    True
    >>> mixer = build_mixer("gated_deltanet", dim=32, heads=2)
    >>> y, state = mixer(torch.randn(1, 5, 32))
    >>> tuple(y.shape)
    (1, 5, 32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

__all__ = ["MIXERS", "register_mixer", "build_mixer", "list_mixers"]

MIXERS: dict[str, Callable[..., nn.Module]] = {}


def register_mixer(name: str) -> Callable:
    """Class decorator: register a mixer class (or a factory ``(dim, heads, **kw) -> Module``) as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"mixer name must be a non-empty string, got {name!r}")

    def decorate(cls):
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered (by {MIXERS[name]!r})")
        MIXERS[name] = cls
        return cls

    return decorate


def _ensure_loaded() -> None:
    # the modules that define mixers register them on import
    import effattn.nn.mixers  # noqa: F401

    _register_attention_family()


@functools.cache
def _register_attention_family() -> None:
    """Register helper N1's attention layers (MHA/GQA, MLA, MoH) where their modules exist."""
    try:
        from effattn.nn.attention import Attention
    except ImportError:
        Attention = None
    if Attention is not None:
        register_mixer("attention")(Attention)

        def sliding_window(dim: int, heads: int, window: int = 128, **kw) -> nn.Module:
            """Causal attention over the ``window`` most recent keys (Attention with a window)."""
            return Attention(dim, heads, window=window, **kw)

        register_mixer("sliding_window")(sliding_window)
    try:
        from effattn.nn.mla import MLA
    except ImportError:
        MLA = None
    if MLA is not None:

        def mla(dim: int, heads: int, **kw) -> nn.Module:
            """MLA with DeepSeek-V2's proportions unless given: latent ``kv_lora_rank = 4 * head_dim``,
            ``qk_nope_head_dim = v_head_dim = head_dim``, decoupled RoPE key of ``head_dim / 2``."""
            from effattn.nn.mixers import check_heads

            hd = check_heads(dim, heads)
            kw.setdefault("kv_lora_rank", 4 * hd)
            kw.setdefault("qk_nope_head_dim", hd)
            kw.setdefault("qk_rope_head_dim", max(2, hd // 4 * 2))
            kw.setdefault("v_head_dim", hd)
            return MLA(dim, heads, **kw)

        register_mixer("mla")(mla)
    try:
        from effattn.nn import moh
    except ImportError:
        moh = None
    moh_cls = getattr(moh, "MoHAttention", None) or getattr(moh, "MoH", None)
    if moh_cls is not None:
        register_mixer("moh")(moh_cls)


def list_mixers() -> list[str]:
    """The registered mixer names, sorted."""
    _ensure_loaded()
    return sorted(MIXERS)


def build_mixer(name: str, *, dim: int, heads: int, **kw) -> nn.Module:
    """Build the mixer registered as ``name`` with model width ``dim`` and ``heads`` heads."""
    _ensure_loaded()
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(MIXERS)}")
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    return MIXERS[name](dim, heads, **kw)
