"""Token dispatch: gather the routed tokens by expert, run the experts, scatter the weighted outputs back.

Dropless (MegaBlocks, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", 2022): the
assignments are stably sorted by expert, the tokens gathered into that order, every expert runs on its
contiguous slice (one grouped matmul, no padding) and the outputs are added back into their tokens::

    y_n = sum_{(n, e, w) kept} w * expert_e(x_n)

Capacity (GShard, "GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding",
2020): expert ``e`` serves at most ``C = ceil(capacity_factor * N * top_k / E)`` assignments, taken in
priority order (all first choices in token order, then all second choices, ...); the rest are dropped:
that expert contributes 0 to the token, which keeps its residual path. :func:`reference_moe` is the
per-token loop both forms are tested against.
"""

from __future__ import annotations

import math

import torch

from effattn.moe.experts import Experts

__all__ = ["capacity", "capacity_keep", "sort_by_expert", "dispatch_combine", "reference_moe"]


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """GShard expert capacity ``ceil(capacity_factor * N * top_k / E)`` (at least 1 when ``N > 0``).

    >>> capacity(100, 8, 2, 1.25)
    32
    """
    if num_tokens == 0:
        return 0
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep(expert: torch.Tensor, priority: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """Bool ``[A]``: the assignment is among the first ``cap`` of its expert in ``priority`` order.

    >>> import torch
    >>> capacity_keep(torch.tensor([0, 0, 1, 0]), torch.tensor([3, 0, 1, 2]), 2, 2).tolist()
    [False, True, True, True]
    """
    A = expert.numel()
    if A == 0:
        return torch.zeros(0, dtype=torch.bool, device=expert.device)
    span = int(priority.max().item()) + 1
    order = torch.argsort(expert * span + priority)
    sorted_expert = expert[order]
    counts = torch.bincount(sorted_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(A, device=expert.device) - starts[sorted_expert]
    keep = torch.empty(A, dtype=torch.bool, device=expert.device)
    keep[order] = pos < cap
    return keep


def sort_by_expert(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the assignments by expert, and the count per expert ``[E]``."""
    order = torch.argsort(expert, stable=True)
    return order, torch.bincount(expert, minlength=num_experts)


def dispatch_combine(
    x: torch.Tensor,
    token: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    experts: Experts,
) -> torch.Tensor:
    """Dropless dispatch of the assignments ``(token, expert, weight)`` over ``x [N, dim]`` -> ``[N, dim]``.

    Tokens gathered in expert order, one grouped matmul per layer of the experts, outputs weighted and
    summed back into their tokens (tokens without an assignment get 0).
    """
    order, counts = sort_by_expert(expert, experts.num_experts)
    tok = token[order]
    ys = experts(x[tok], counts) * weight[order, None].to(x.dtype)
    return x.new_zeros(x.shape).index_add(0, tok, ys)


def reference_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    experts: Experts,
    top_k: int,
    *,
    kind: str = "softmax",
    normalize: bool = True,
    bias: torch.Tensor | None = None,
    capacity_factor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground truth of token-choice routing: loops over tokens and their choices, float32 math.

    Returns ``(y [N, dim], kept [N, top_k] bool)``. With ``capacity_factor``, expert slots are handed out
    in GShard order (choice slot ``j = 0..k-1``, then token ``n``) and a choice that finds its expert full
    is dropped.

    >>> import torch
    >>> ex = Experts(4, 8, 16)
    >>> y, kept = reference_moe(torch.randn(3, 8), torch.randn(4, 8), ex, 2)
    >>> tuple(y.shape), bool(kept.all())
    ((3, 8), True)
    """
    N, E = x.shape[0], experts.num_experts
    choices, weights = [], []
    for n in range(N):
        z = router_weight.float() @ x[n].float()
        s = torch.softmax(z, -1) if kind == "softmax" else torch.sigmoid(z)
        choose = s + bias if (bias is not None and kind == "sigmoid") else s
        idx = choose.detach().topk(top_k).indices
        w = s[idx]
        if normalize:
            w = w / w.sum()
        choices.append(idx.tolist())
        weights.append(w)
    kept = torch.ones(N, top_k, dtype=torch.bool)
    if capacity_factor is not None:
        cap = capacity(N, E, top_k, capacity_factor)
        used = [0] * E
        for j in range(top_k):
            for n in range(N):
                e = choices[n][j]
                if used[e] < cap:
                    used[e] += 1
                else:
                    kept[n, j] = False
    rows = []
    for n in range(N):
        acc = x.new_zeros(x.shape[1])
        for j in range(top_k):
            if kept[n, j]:
                acc = acc + weights[n][j].to(x.dtype) * experts.expert(x[n], choices[n][j])
        rows.append(acc)
    y = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    return y, kept
