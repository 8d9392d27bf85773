"""Cache names: :func:`make_cache` builds a per-layer cache from a name or a factory (what
``LM.generate(kv_cache=...)`` takes)."""

from __future__ import annotations

from collections.abc import Callable

from effattn.kv.base import KVCacheBase, LayerCache
from effattn.kv.contiguous import KVCache
from effattn.kv.quantized import QuantizedKVCache

CACHES: dict[str, Callable[..., KVCacheBase]] = {"contiguous": KVCache, "quantized": QuantizedKVCache}


def make_cache(spec: str | Callable[[], LayerCache] = "contiguous", **kwargs) -> LayerCache:
    """A fresh per-layer cache: ``spec`` is a name of ``CACHES`` (``"contiguous"``, ``"quantized"``;
    ``kwargs`` go to its class) or a callable returning a :class:`~effattn.kv.LayerCache`
    (``functools.partial(QuantizedKVCache, bits=4)``).

    Example::

        >>> make_cache("quantized", bits=4).bits
        4
    """
    if isinstance(spec, str):
        if spec not in CACHES:
            raise ValueError(f"kv_cache must be one of {sorted(CACHES)} or a callable returning a cache, got {spec!r}")
        cache = CACHES[spec](**kwargs)
    elif callable(spec):
        cache = spec(**kwargs)
    else:
        raise TypeError(f"kv_cache must be a cache name {sorted(CACHES)} or a callable, got {type(spec).__name__}")
    if not isinstance(cache, LayerCache):
        raise TypeError(
            f"kv_cache must build an effattn.kv.LayerCache (KVCacheBase, QuantizedKVCache, ...), "
            f"got {type(cache).__name__}"
        )
    return cache
