"""Rotary position embedding: :class:`effattn.exact.RotaryEmbedding`, re-exported here for the attention
layers (it lives in :mod:`effattn.exact.rope`, below :mod:`effattn.memory`, whose segment attentions use it)."""

from effattn.exact import RotaryEmbedding

__all__ = ["RotaryEmbedding"]
