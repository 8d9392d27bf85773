"""FLOP estimates of the linear family's chunk algorithms, shared by ``bench linear`` (CPU) and its GPU
comparison (:mod:`effattn.bench.linear_gpu`).

Counted per forward call, all batch rows and heads, matmuls and the dominant elementwise work as executed
(a chunk's full ``C x C`` block, masked half included); a backward is counted as :data:`CHUNK_BWD_FACTOR`
forwards. The chunk algorithms are Mamba-2's SSD (Dao and Gu, "Transformers are SSMs", 2024) for the scalar
decay and the WY / UT form (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", 2024) for the delta rules.

Example::

    >>> flops_scalar_decay_chunk(T=128, B=1, H=1, K=64, V=64, C=64) == 2 * (2 * 64**3 + 2 * 64**3 + 4 * 64**3)
    True
"""

from __future__ import annotations

import math

__all__ = ["CHUNK_BWD_FACTOR", "flops_delta_chunk", "flops_scalar_decay_chunk", "flops_selective_scan"]

CHUNK_BWD_FACTOR = 2.0  # backward of a chunk form counted as 2 x its forward


def flops_scalar_decay_chunk(T: int, B: int, H: int, K: int, V: int, C: int) -> float:
    """Chunkwise linear attention with a scalar decay (linear_attn, simple_gla, retnet, lightning):
    per chunk ``Q K^T`` (2 C^2 K), the masked scores times ``V`` (2 C^2 V), the read of the entering
    state ``Q S`` (2 C K V) and the state update ``K^T V`` (2 C K V)."""
    n = math.ceil(T / C)
    return B * H * n * (2 * C * C * K + 2 * C * C * V + 4 * C * K * V)


def flops_delta_chunk(T: int, B: int, H: int, K: int, V: int, C: int) -> float:
    """Chunkwise (gated) delta rule, WY / UT form: per chunk ``K K^T`` and ``Q K^T`` (4 C^2 K), the
    unit-triangular solve for ``W, U`` (C^2 (K + V)), the chunk transition ``K^T W`` (2 C K^2) and
    input ``K^T U`` (2 C K V), the state passing ``M S`` (2 K^2 V), ``Delta = U - W S`` (2 C K V),
    the output ``Q S + tril(Q K^T) Delta`` (2 C K V + 2 C^2 V)."""
    n = math.ceil(T / C)
    per_chunk = 4 * C * C * K + C * C * (K + V) + 2 * C * K * K + 6 * C * K * V + 2 * K * K * V + 2 * C * C * V
    return B * H * n * per_chunk


def flops_selective_scan(T: int, B: int, H: int, P: int, N: int) -> float:
    """Mamba's chunked selective scan is elementwise on the ``[P, N]`` state per head: ~12 FLOPs
    per token and state entry (discretisation, the chunk-end states, the in-chunk recurrence and
    the ``C`` read-out); ``exp`` counted as one."""
    return 12.0 * B * T * H * P * N
