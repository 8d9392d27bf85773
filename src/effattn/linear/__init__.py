"""Linear attention, state-space and recurrent mixers.

Each method lives in its own module with ``naive_*`` (reference), ``chunk_*`` (chunkwise
parallel) and ``step_*`` (decoding) forms; see ``effattn.linear._common`` for the conventions.
"""

from effattn.linear._common import REGISTRY, LinearOp

__all__ = ["REGISTRY", "LinearOp"]
