"""Which transformers this integration supports, checked once at import.

The integration relies on the transformers 5 interfaces: ``AttentionInterface`` /
``AttentionMaskInterface`` registration, ``masking_utils.causal_mask_function``, and the
layered ``Cache`` (``Cache.layers``, ``get_mask_sizes(query_length, layer_idx)``,
``get_query_offset``). Version 4 had a different ``Cache`` (``cache_position`` arguments) and is
refused with a message instead of failing somewhere inside a forward pass.
"""

from __future__ import annotations

import inspect

TESTED_VERSION = "5.24.0"
SUPPORTED = "transformers >= 5.0, < 6 (tested with 5.24)"

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"effattn.hf needs the Hugging Face transformers package: pip install 'effattn[hf]' (supported: {SUPPORTED})"
    ) from e


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return -1


def check_transformers() -> None:
    """Raise ``ImportError`` naming the supported range when the installed transformers lacks an
    interface the integration uses."""
    from transformers import cache_utils, masking_utils, modeling_utils

    missing = []
    if _major(transformers.__version__) != 5:
        missing.append(f"major version 5 (found {transformers.__version__})")
    if not hasattr(modeling_utils, "AttentionInterface"):
        missing.append("modeling_utils.AttentionInterface")
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        missing.append("masking_utils.AttentionMaskInterface")
    if not hasattr(masking_utils, "causal_mask_function"):
        missing.append("masking_utils.causal_mask_function")
    cache = getattr(cache_utils, "Cache", None)
    if cache is None or not hasattr(cache_utils, "CacheLayerMixin"):
        missing.append("cache_utils.Cache with CacheLayerMixin layers")
    else:
        params = list(inspect.signature(cache.get_mask_sizes).parameters)
        if params[1:3] != ["query_length", "layer_idx"]:
            missing.append(f"Cache.get_mask_sizes(query_length, layer_idx) (found {params[1:]})")
        if not hasattr(cache, "get_query_offset"):
            missing.append("Cache.get_query_offset")
    if missing:
        raise ImportError(
            f"effattn.hf supports {SUPPORTED}; the installed transformers {transformers.__version__} "
            "lacks: " + "; ".join(missing)
        )


check_transformers()
