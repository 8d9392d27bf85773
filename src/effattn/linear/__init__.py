"""Linear attention, state-space and recurrent mixers.

Each method lives in its own module with ``naive_*`` (reference), ``chunk_*`` (chunkwise
parallel) and ``step_*`` (decoding) forms; see ``effattn.linear._common`` for the conventions.
"""

from effattn.linear._common import REGISTRY, LinearOp, register
from effattn.linear._short_conv import causal_conv1d
from effattn.linear._triton import choose_backend as choose_linear_backend
from effattn.linear.aaren import chunk_aaren, naive_aaren, scan_aaren, step_aaren
from effattn.linear.delta_rule import chunk_delta_rule, naive_delta_rule, step_delta_rule
from effattn.linear.gated_delta_rule import (
    chunk_gated_delta_rule,
    naive_gated_delta_rule,
    step_gated_delta_rule,
)
from effattn.linear.gla import chunk_gla, naive_gla, step_gla
from effattn.linear.lightning import (
    chunk_lightning_attn,
    lightning_log_decay,
    naive_lightning_attn,
    step_lightning_attn,
)
from effattn.linear.linear_attn import (
    FEATURE_MAPS,
    chunk_linear_attn,
    feature_dim,
    naive_linear_attn,
    step_linear_attn,
)
from effattn.linear.mamba import chunk_selective_scan, naive_selective_scan, step_selective_scan
from effattn.linear.mom import chunk_mom, naive_mom, step_mom
from effattn.linear.retnet import chunk_retention, naive_retention, retention_log_decay, step_retention
from effattn.linear.simple_gla import chunk_simple_gla, naive_simple_gla, step_simple_gla

__all__ = [
    "REGISTRY",
    "register",
    "LinearOp",
    "choose_linear_backend",
    "naive_delta_rule",
    "chunk_delta_rule",
    "step_delta_rule",
    "naive_gated_delta_rule",
    "chunk_gated_delta_rule",
    "step_gated_delta_rule",
    "naive_mom",
    "chunk_mom",
    "step_mom",
    "naive_linear_attn",
    "chunk_linear_attn",
    "step_linear_attn",
    "FEATURE_MAPS",
    "feature_dim",
    "naive_simple_gla",
    "chunk_simple_gla",
    "step_simple_gla",
    "naive_retention",
    "chunk_retention",
    "step_retention",
    "retention_log_decay",
    "naive_lightning_attn",
    "chunk_lightning_attn",
    "step_lightning_attn",
    "lightning_log_decay",
    "naive_gla",
    "chunk_gla",
    "step_gla",
    "naive_selective_scan",
    "chunk_selective_scan",
    "step_selective_scan",
    "naive_aaren",
    "scan_aaren",
    "chunk_aaren",
    "step_aaren",
    "causal_conv1d",
]
