"""effattn.kv: inference memory — KV caches (contiguous, paged, quantized) and eviction policies."""

from effattn.kv.base import KVCacheBase
from effattn.kv.compressed import CompressedKVCache, CompressedLayerCache
from effattn.kv.contiguous import KVCache
from effattn.kv.policy import POLICIES, Policy, ScoreContext, list_policies, make_policy, register_policy
from effattn.kv.streaming_llm import StreamingLLMPolicy

__all__ = [
    "KVCacheBase",
    "KVCache",
    "Policy",
    "ScoreContext",
    "POLICIES",
    "register_policy",
    "make_policy",
    "list_policies",
    "CompressedKVCache",
    "CompressedLayerCache",
    "StreamingLLMPolicy",
]
