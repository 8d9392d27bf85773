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

import torch

from effattn._checks import check_positive_int
from effattn._registry import Registry


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


#: Every method of the family by name; the first lookup imports every module of ``effattn.sparse``.
REGISTRY: Registry[SparseMethod] = Registry("sparse method", package="effattn.sparse")


def register(method: SparseMethod) -> SparseMethod:
    """Register ``method`` under ``method.name`` (a second, different method of that name raises).

    Example::

        >>> REGISTRY["routing"].content_based, "routing" in REGISTRY
        (True, True)
    """
    return REGISTRY.register(method.name, method)


def check_block_size(name: str, block: int, length: int, *, must_divide: bool = False) -> int:
    """A positive int block size (dividing ``length`` where the method requires it).

    Example::

        >>> check_block_size("block", 16, 64, must_divide=True)
        16
    """
    try:
        check_positive_int(name, block)
    except ValueError:
        # the wording callers of the sparse family already match on
        raise ValueError(f"{name} must be a positive int, got {block!r}") from None
    if must_divide and length % block:
        raise ValueError(f"{name}={block} must divide the sequence length {length}")
    return block


def check_top_k(name: str, k: int, available: int) -> int:
    """``1 <= k``; a ``k`` larger than what is available is an error (not silently clamped).

    Example::

        >>> check_top_k("top_k", 5, 4)
        Traceback (most recent call last):
        ...
        ValueError: top_k=5 exceeds the 4 blocks available
    """
    check_positive_int(name, k)
    if k > available:
        raise ValueError(f"{name}={k} exceeds the {available} blocks available")
    return k


def softmax_over_slots(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of ``q [..., D]`` over the slots ``k [..., S, D]``, ``v [..., S, Dv]`` where
    ``mask [..., S]`` is True: ``o = sum_s p_s v_s``, ``p = softmax_s(scale * q . k_s)`` over the kept
    slots; float32, zeros where no slot is kept (as the engine's empty rows). The decoding (``step_*``)
    forms use it for one query against a small gathered key set; a masked slot's values never enter.

    Example::

        >>> q, k = torch.ones(1, 2), torch.zeros(1, 3, 2)
        >>> v = torch.tensor([[[1.0], [3.0], [float("nan")]]])
        >>> softmax_over_slots(q, k, v, torch.tensor([[True, True, False]]), 1.0).tolist()
        [[2.0]]
    """
    s = torch.einsum("...d,...sd->...s", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(-1e30))
    v = v.float().masked_fill(~mask[..., None], 0.0)  # a masked slot's value (even NaN) never enters
    return torch.einsum("...s,...sd->...d", p, v) / p.sum(-1, keepdim=True).clamp_min(1e-30)
