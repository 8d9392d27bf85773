"""effattn.nn: attention and sequence-mixer layers, hybrid language models and generation."""

from effattn.kv import KVCache
from effattn.nn.attention import Attention, WindowKVCache
from effattn.nn.duo_calibration import calibrate_duo_attention
from effattn.nn.lm import LM, LMConfig, mixer_pattern
from effattn.nn.memory_saving import (
    CHECKPOINT_MODES,
    Int8SavedActivations,
    chunked_apply,
    reversible_stack,
)
from effattn.nn.mla import MLA, mla_from_gqa
from effattn.nn.moh import MoHAttention
from effattn.nn.recurrent_memory import RecurrentMemoryLM
from effattn.nn.registry import MIXERS, build_mixer, list_mixers, register_mixer
from effattn.nn.rope import RotaryEmbedding
from effattn.nn.transmla import attention_from_llama, transmla_cache_bytes, transmla_from_gqa, transmla_latent_width
from effattn.nn.vision import CascadedGroupAttention, SingleHeadAttention

__all__ = [
    "Attention",
    "KVCache",
    "WindowKVCache",
    "MLA",
    "mla_from_gqa",
    "transmla_from_gqa",
    "transmla_latent_width",
    "transmla_cache_bytes",
    "attention_from_llama",
    "MoHAttention",
    "RotaryEmbedding",
    "CascadedGroupAttention",
    "SingleHeadAttention",
    "MIXERS",
    "build_mixer",
    "list_mixers",
    "register_mixer",
    "LM",
    "LMConfig",
    "RecurrentMemoryLM",
    "mixer_pattern",
    "CHECKPOINT_MODES",
    "Int8SavedActivations",
    "chunked_apply",
    "reversible_stack",
    "calibrate_duo_attention",
]
