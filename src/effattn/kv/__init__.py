"""effattn.kv: inference memory — KV caches (contiguous, window, paged, quantized, policy-compressed)
behind one per-layer protocol (:class:`LayerCache`), and eviction policies.

DuoAttention's calibration, which trains gates on a model, lives with the model:
:func:`effattn.nn.calibrate_duo_attention` (the policy stays here; :func:`calibrate_duo_attention`
here forwards to the model's own method, so this package never imports :mod:`effattn.nn`).
"""

from effattn.kv.a2sf import A2SFPolicy
from effattn.kv.base import AttentionPattern, CachedKV, KVCacheBase, LayerCache
from effattn.kv.caches import CACHES, make_cache
from effattn.kv.cake import CAKEPolicy
from effattn.kv.compressed import CompressedKVCache, CompressedLayerCache
from effattn.kv.contiguous import KVCache
from effattn.kv.duo_attention import DuoAttentionPolicy, calibrate_duo_attention
from effattn.kv.h2o import H2OPolicy
from effattn.kv.knorm import KNormPolicy
from effattn.kv.paged import (
    PagedKVCache,
    PagedLayerCache,
    PoolExhaustedError,
    naive_paged_decode_attention,
    paged_decode_attention,
)
from effattn.kv.policy import POLICIES, Policy, ScoreContext, list_policies, make_policy, register_policy
from effattn.kv.pyramidkv import PyramidKVPolicy
from effattn.kv.quantized import QuantizedKVCache
from effattn.kv.snapkv import SnapKVPolicy
from effattn.kv.streaming_llm import StreamingLLMPolicy, rotate_rope
from effattn.kv.tova import TOVAPolicy
from effattn.kv.window import WindowKVCache

__all__ = [
    "LayerCache",
    "CachedKV",
    "AttentionPattern",
    "KVCacheBase",
    "KVCache",
    "PagedKVCache",
    "PagedLayerCache",
    "PoolExhaustedError",
    "paged_decode_attention",
    "naive_paged_decode_attention",
    "QuantizedKVCache",
    "WindowKVCache",
    "CACHES",
    "make_cache",
    "Policy",
    "ScoreContext",
    "POLICIES",
    "register_policy",
    "make_policy",
    "list_policies",
    "CompressedKVCache",
    "CompressedLayerCache",
    "StreamingLLMPolicy",
    "rotate_rope",
    "H2OPolicy",
    "A2SFPolicy",
    "TOVAPolicy",
    "KNormPolicy",
    "SnapKVPolicy",
    "PyramidKVPolicy",
    "CAKEPolicy",
    "DuoAttentionPolicy",
    "calibrate_duo_attention",
]
