"""Scale-out: sequence and context parallelism on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Every op works on local sequence shards in the ``[B, T/P, H, D]`` layout, takes ``group=None``
(the default process group) and equals the single-process op, forward and gradients, up to float32
rounding for any world size. The softmax attention ops compute in :func:`effattn.exact.compute_dtype`, as
:func:`effattn.attention` does: float64 shards are float64 end to end (accumulators, LSE, messages, gradients).
"""

from effattn.dist._comm import CommCounter, all_to_all, check_same_shapes, count_bytes, p2p, shift
from effattn.dist.halo import halo_attention, halo_plan, previous_tokens
from effattn.dist.lasp import lasp2, lasp_schedule
from effattn.dist.launch import RankError, free_port, spawn
from effattn.dist.layout import (
    LAYOUTS,
    check_shardable,
    gather_sequence,
    layout_permutation,
    shard_positions,
    shard_sequence,
)
from effattn.dist.model import (
    H100_CLUSTER,
    Estimate,
    Hardware,
    Workload,
    estimate,
    markdown_table,
    ring_min_block,
    sweep,
)
from effattn.dist.model import METHODS as MODEL_METHODS
from effattn.dist.ring import ring_attention
from effattn.dist.sp_context import (
    ATTENTION_METHODS,
    SequenceParallel,
    checkpoint_contexts,
    current_sequence_parallel,
    sequence_parallel,
)
from effattn.dist.token_ring import token_ring_attention
from effattn.dist.ulysses import heads_to_sequence, replicate_kv_heads, sequence_to_heads, ulysses_attention
from effattn.dist.usp import (
    usp_attention,
    usp_gather_sequence,
    usp_groups,
    usp_shard_positions,
    usp_shard_sequence,
)

__all__ = [
    "ATTENTION_METHODS",
    "H100_CLUSTER",
    "LAYOUTS",
    "MODEL_METHODS",
    "all_to_all",
    "check_same_shapes",
    "checkpoint_contexts",
    "check_shardable",
    "CommCounter",
    "count_bytes",
    "current_sequence_parallel",
    "Estimate",
    "estimate",
    "free_port",
    "gather_sequence",
    "halo_attention",
    "halo_plan",
    "Hardware",
    "heads_to_sequence",
    "lasp2",
    "lasp_schedule",
    "layout_permutation",
    "markdown_table",
    "p2p",
    "previous_tokens",
    "RankError",
    "replicate_kv_heads",
    "ring_attention",
    "ring_min_block",
    "sequence_parallel",
    "sequence_to_heads",
    "SequenceParallel",
    "shard_positions",
    "shard_sequence",
    "shift",
    "spawn",
    "sweep",
    "token_ring_attention",
    "ulysses_attention",
    "usp_attention",
    "usp_gather_sequence",
    "usp_groups",
    "usp_shard_positions",
    "usp_shard_sequence",
    "Workload",
]
