"""The mixer registry: every sequence mixer of :mod:`effattn.nn` under one name.

A mixer is an ``nn.Module`` built as ``cls(dim, heads, **kw)`` whose ``forward(x [B, T, dim],
state=None, valid=None)`` returns ``(y [B, T, dim], new_state)`` and whose ``state_size(batch,
seq_len)`` gives the bytes of state it holds. The mixers live in :mod:`effattn.nn.mixers`, one module
each, and register themselves with ``@register_mixer("name")``; the first lookup imports every module
of that package, so adding a mixer is one module and one decorator.

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

from collections.abc import Callable

from torch import nn

from effattn._registry import Registry

__all__ = ["MIXERS", "register_mixer", "build_mixer", "list_mixers"]

MixerFactory = Callable[..., nn.Module]


#: name -> mixer class or factory ``(dim, heads, **kw) -> Module``; filled from :mod:`effattn.nn.mixers`.
MIXERS: Registry[MixerFactory] = Registry("mixer", package="effattn.nn.mixers")


def register_mixer(name: str) -> Callable[[MixerFactory], MixerFactory]:
    """Class decorator: register a mixer class (or a factory ``(dim, heads, **kw) -> Module``) as ``name``."""
    return MIXERS.register(name)


def list_mixers() -> list[str]:
    """The registered mixer names, sorted."""
    return MIXERS.names()


def build_mixer(name: str, *, dim: int, heads: int, **kw) -> nn.Module:
    """Build the mixer registered as ``name`` with model width ``dim`` and ``heads`` heads (the mixer
    checks them: ``dim`` divisible by ``heads``)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {MIXERS.names()}")
    return MIXERS[name](dim, heads, **kw)
