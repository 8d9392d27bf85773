"""effattn.hf: Hugging Face transformers integration (needs the ``hf`` extra).

- :func:`register` makes effattn an ``attn_implementation`` (``AttentionInterface`` plus the mask
  builder in ``AttentionMaskInterface``).
- :class:`CompressedCache` is a ``transformers.Cache`` that keeps what an :mod:`effattn.kv` policy
  (StreamingLLM, H2O, SnapKV, ...) chooses, for ``model.generate(..., past_key_values=...)``.

Supported: transformers >= 5.0, < 6 (tested with 5.24); importing this module with another
version raises ``ImportError`` naming what is missing. ``import effattn`` never imports it.
"""

from effattn.hf._compat import SUPPORTED, TESTED_VERSION
from effattn.hf._handshake import CompressedInputs, PendingUpdate
from effattn.hf.attention import (
    HFMask,
    attend_compressed,
    effattn_mask,
    is_effattn,
    make_attention_function,
    register,
    registered,
)
from effattn.hf.cache import CompressedCache, CompressedLayer, check_model

__all__ = [
    "SUPPORTED",
    "CompressedCache",
    "CompressedLayer",
    "CompressedInputs",
    "PendingUpdate",
    "attend_compressed",
    "check_model",
    "TESTED_VERSION",
    "HFMask",
    "effattn_mask",
    "is_effattn",
    "make_attention_function",
    "register",
    "registered",
]
