"""effattn.nn: attention and sequence-mixer layers, hybrid language models and generation."""

from effattn.nn.attention import Attention
from effattn.nn.cache import KVCache
from effattn.nn.lm import LM, LMConfig, mixer_pattern
from effattn.nn.registry import build_mixer, list_mixers, register_mixer
from effattn.nn.rope import RotaryEmbedding

__all__ = [
    "Attention",
    "KVCache",
    "RotaryEmbedding",
    "build_mixer",
    "list_mixers",
    "register_mixer",
    "LM",
    "LMConfig",
    "mixer_pattern",
]
