"""Machinery shared by the sparse and content-routed family.

Every method is a *selector*: it decides which keys (or key blocks) each query (or query block)
attends to and hands that to the exact family's block-sparse engine (``effattn.attention`` with a
``BlockMask``), so the forward and backward are the engine's and memory stays O(T x selected).
Token-level selectors (k-means routing, LSH) permute q/k/v into bucket order, attend
block-diagonally there, and un-permute.

Each method module registers a :class:`SparseMethod` so the generic tests (engine == reference on
the selection's dense mask; causal selections never look ahead) and ``effattn bench sparse``
cover it without listing methods by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SparseMethod:
    """One registered method (or configuration: ``lsh`` and ``lsh_2rounds`` are the same function with
    different ``make_params``, benchmarked side by side because the rounds change the cost).

    ``attend(q, k, v, *, causal, **params) -> o`` runs the method ([B, T, H, D] layout);
    ``dense_mask(q, k, *, causal, **params) -> bool [B|1, H|1, T_q, T_k]`` materializes exactly the
    selection that ``attend`` uses (for tests at small T: the reference backend with this mask must
    equal ``attend``). ``dense_mask`` returns ``None`` for a method whose keys are not (only) the
    original keys, or that composes several attention passes (HiLo's pooled Lo-Fi keys, Combiner's
    appended summaries, axial's row-then-column passes): no mask over the original keys states it,
    so the generic test skips it and the method's own tests compare ``attend`` with its dense
    reference form (``hilo_reference``, ``combiner_reference``, explicit reference calls).
    ``make_params(T)`` gives parameters for a benchmark/test at length T with
    about 1/16 of the key blocks selected where the method has such a knob; ``content_based`` says
    whether the selection depends on the data; ``causal_modes`` lists the supported ``causal`` values.
    """

    name: str
    attend: Callable
    dense_mask: Callable
    make_params: Callable[[int], dict]
    content_based: bool
    causal_modes: tuple[bool, ...] = (False, True)


REGISTRY: dict[str, SparseMethod] = {}


def register(method: SparseMethod) -> SparseMethod:
    if method.name in REGISTRY:
        raise ValueError(f"sparse method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def check_block_size(name: str, block: int, length: int, *, must_divide: bool = False) -> int:
    """A positive block size (dividing ``length`` where the method requires it)."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{name} must be a positive int, got {block!r}")
    if must_divide and length % block:
        raise ValueError(f"{name}={block} must divide the sequence length {length}")
    return block


def check_top_k(name: str, k: int, available: int) -> int:
    """``1 <= k``; a ``k`` larger than what is available is an error (not silently clamped)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    if k > available:
        raise ValueError(f"{name}={k} exceeds the {available} blocks available")
    return k
