"""effattn.nn: attention and sequence-mixer layers, hybrid language models and generation."""

from effattn.nn.attention import Attention
from effattn.nn.cache import KVCache
from effattn.nn.rope import RotaryEmbedding

__all__ = ["Attention", "KVCache", "RotaryEmbedding"]
