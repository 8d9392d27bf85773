"""Sparse and content-routed attention: selectors on the exact family's block-sparse engine.

See ``effattn.sparse._common`` for the conventions; each method lives in its own module.
"""

from effattn.sparse._common import REGISTRY, SparseMethod

__all__ = ["REGISTRY", "SparseMethod"]
