"""Exact softmax attention: one ``attention()`` over SDPA, a tiled block-sparse engine and the
materialized reference (the backends of :mod:`effattn.exact.backends`, each declaring its capabilities;
``explain()`` reads them); composable masks and score mods; split-KV decode attention (Flash-Decoding;
Lean Attention's stream-K schedule); rotary position embedding (RoPE)."""

from effattn.exact.api import BACKENDS, AttentionCall, Explanation, attention, explain
from effattn.exact.block_mask import BlockMask, create_block_mask
from effattn.exact.decode import decode_attention, merge_attention_states
from effattn.exact.lean import lean_decode_attention, lean_schedule
from effattn.exact.masks import (
    MaskMod,
    ScoreMod,
    alibi,
    alibi_slopes,
    and_masks,
    causal_mask,
    check_mod_signature,
    compose_score_mods,
    dilated_mask,
    document_ids_from_cu_seqlens,
    document_mask,
    full_mask,
    global_local_mask,
    global_tokens_mask,
    or_masks,
    prefix_lm_mask,
    relative_position_bias,
    sink_tokens_mask,
    sliding_window_mask,
    streaming_mask,
    tanh_softcap,
    window_bounds,
)
from effattn.exact.nonfinite import nonfinite_keys, poison_rows, zero_keys
from effattn.exact.reference import MAX_DENSE_ELEMENTS, compute_dtype, reference_attention
from effattn.exact.rope import RotaryEmbedding
from effattn.exact.tiled import ScoreCount, count_scores, tiled_attention

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "BACKENDS",
    "AttentionCall",
    "BlockMask",
    "Explanation",
    "MaskMod",
    "ScoreCount",
    "RotaryEmbedding",
    "ScoreMod",
    "alibi",
    "alibi_slopes",
    "and_masks",
    "attention",
    "causal_mask",
    "check_mod_signature",
    "compose_score_mods",
    "compute_dtype",
    "count_scores",
    "create_block_mask",
    "decode_attention",
    "dilated_mask",
    "document_ids_from_cu_seqlens",
    "document_mask",
    "explain",
    "full_mask",
    "global_local_mask",
    "global_tokens_mask",
    "lean_decode_attention",
    "lean_schedule",
    "merge_attention_states",
    "nonfinite_keys",
    "poison_rows",
    "zero_keys",
    "or_masks",
    "prefix_lm_mask",
    "reference_attention",
    "relative_position_bias",
    "sink_tokens_mask",
    "sliding_window_mask",
    "streaming_mask",
    "tanh_softcap",
    "tiled_attention",
    "window_bounds",
]
