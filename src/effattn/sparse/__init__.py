"""Sparse and content-routed attention: selectors on the exact family's block-sparse engine.

See ``effattn.sparse._common`` for the conventions; each method lives in its own module. Methods that
decode (routing with a fixed ``cluster_window``, top-k block) keep their one-token ``step_*`` form and
its state beside the full form, as the linear family does.
"""

from effattn.sparse._common import REGISTRY, SparseMethod, register
from effattn.sparse.biformer import biformer_attention, biformer_mask
from effattn.sparse.combiner import (
    combiner_attention,
    combiner_axial_attention,
    combiner_axial_reference,
    combiner_mixture_attention,
    combiner_mixture_reference,
    combiner_reference,
)
from effattn.sparse.hilo import hilo_attention, hilo_reference
from effattn.sparse.hip import (
    HIP_REPRESENTATIVES,
    brute_force_topk_blocks,
    hip_attention,
    hip_block_mask,
    hip_selection,
)
from effattn.sparse.hyper_attention import hyper_attention, hyper_attention_dense, sort_lsh_buckets
from effattn.sparse.kmeans import KMeansRouter
from effattn.sparse.landmark import (
    LandmarkDecodeState,
    landmark_attention,
    landmark_decode_state,
    step_landmark_attention,
)
from effattn.sparse.lsh import lsh_attention, lsh_buckets, lsh_pair_counts
from effattn.sparse.routing import (
    RoutingDecodeState,
    routing_attention,
    routing_decode_state,
    routing_dense_mask,
    step_routing_attention,
)
from effattn.sparse.static import (
    axial_ar_attention,
    axial_ar_reference,
    axial_attention,
    bigbird_attention,
    bigbird_mask,
    dilated_attention,
    local_attention,
    strided_attention,
)
from effattn.sparse.topk_block import (
    TopKBlockDecodeState,
    attention_mass_kept,
    step_topk_block_attention,
    topk_block_attention,
    topk_block_decode_state,
    topk_block_mask,
)

__all__ = [
    "HIP_REPRESENTATIVES",
    "REGISTRY",
    "register",
    "KMeansRouter",
    "LandmarkDecodeState",
    "RoutingDecodeState",
    "SparseMethod",
    "TopKBlockDecodeState",
    "attention_mass_kept",
    "axial_ar_attention",
    "axial_ar_reference",
    "axial_attention",
    "bigbird_attention",
    "brute_force_topk_blocks",
    "bigbird_mask",
    "biformer_attention",
    "biformer_mask",
    "combiner_attention",
    "combiner_axial_attention",
    "combiner_axial_reference",
    "combiner_mixture_attention",
    "combiner_mixture_reference",
    "combiner_reference",
    "dilated_attention",
    "hilo_attention",
    "hilo_reference",
    "hip_attention",
    "hip_block_mask",
    "hip_selection",
    "hyper_attention",
    "hyper_attention_dense",
    "landmark_attention",
    "landmark_decode_state",
    "local_attention",
    "lsh_attention",
    "lsh_buckets",
    "lsh_pair_counts",
    "routing_attention",
    "routing_decode_state",
    "routing_dense_mask",
    "sort_lsh_buckets",
    "step_landmark_attention",
    "step_routing_attention",
    "step_topk_block_attention",
    "strided_attention",
    "topk_block_attention",
    "topk_block_decode_state",
    "topk_block_mask",
]
