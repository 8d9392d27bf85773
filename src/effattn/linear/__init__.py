"""Linear attention, state-space and recurrent mixers.

Each method lives in its own module with ``naive_*`` (reference), ``chunk_*`` (chunkwise
parallel) and ``step_*`` (decoding) forms; see ``effattn.linear._common`` for the conventions.
"""

from effattn.linear._common import REGISTRY, LinearOp
from effattn.linear.aaren import chunk_aaren, naive_aaren, scan_aaren, step_aaren
from effattn.linear.delta_rule import chunk_delta_rule, naive_delta_rule, step_delta_rule
from effattn.linear.gated_delta_rule import (
    chunk_gated_delta_rule,
    naive_gated_delta_rule,
    step_gated_delta_rule,
)
from effattn.linear.mamba import chunk_selective_scan, naive_selective_scan, step_selective_scan
from effattn.linear.mom import chunk_mom, naive_mom, step_mom

__all__ = [
    "REGISTRY",
    "LinearOp",
    "naive_delta_rule",
    "chunk_delta_rule",
    "step_delta_rule",
    "naive_gated_delta_rule",
    "chunk_gated_delta_rule",
    "step_gated_delta_rule",
    "naive_mom",
    "chunk_mom",
    "step_mom",
    "naive_selective_scan",
    "chunk_selective_scan",
    "step_selective_scan",
    "naive_aaren",
    "scan_aaren",
    "chunk_aaren",
    "step_aaren",
]
