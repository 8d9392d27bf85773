"""effattn.kv: inference memory — KV caches (contiguous, paged, quantized) and eviction policies."""

from effattn.kv.base import KVCacheBase
from effattn.kv.contiguous import KVCache

__all__ = [
    "KVCacheBase",
    "KVCache",
]
