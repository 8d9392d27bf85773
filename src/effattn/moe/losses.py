"""Auxiliary losses of a router.

Switch load-balancing loss (Fedus et al., "Switch Transformers", 2021; top-k form of GShard)::

    L_bal = E * sum_i f_i * P_i,   f_i = (assignments routed to expert i) / (N * top_k),
                                   P_i = (1/N) sum_n p_{n,i}

with ``p`` the router's softmax (for sigmoid scores, ``s`` normalised per token). ``f`` carries no
gradient; ``L_bal = 1`` for perfectly uniform routing.

Router z-loss (Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models", 2022)::

    L_z = (1/N) sum_n (logsumexp_i z_{n,i})^2

Global-batch balancing (Qiu et al., "Demons in the Detail: On Implementing Load Balancing Loss for
Training Specialized Mixture-of-Expert Models", 2025): ``f`` is counted over the global batch (all
data-parallel ranks, and every gradient-accumulation micro-batch so far) instead of one micro-batch;
:func:`load_balancing_loss` takes those counts from the caller (``MoE(lbl_scope="global")`` keeps them).
"""

from __future__ import annotations

import torch

__all__ = ["router_probs", "load_balancing_loss", "z_loss"]


def router_probs(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token distribution over experts: softmax scores as they are, sigmoid scores normalised."""
    if kind == "softmax":
        return scores
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def load_balancing_loss(
    prob_sum: torch.Tensor, prob_tokens: float, counts: torch.Tensor, count_total: float
) -> torch.Tensor:
    """``E * sum_i (counts_i / count_total) * (prob_sum_i / prob_tokens)``.

    ``prob_sum [E]``: sum of router probabilities over this call's tokens (with gradient);
    ``prob_tokens``: the token count ``P`` is averaged over; ``counts [E]``: assignments per expert, over
    the micro-batch (``micro``) or the global batch (``global``), ``count_total`` their total.

    >>> import torch
    >>> p = torch.full((4, 2), 0.5)
    >>> float(load_balancing_loss(p.sum(0), 4, torch.tensor([4.0, 4.0]), 8.0))
    1.0
    """
    E = prob_sum.shape[0]
    if prob_tokens <= 0 or count_total <= 0:
        return prob_sum.sum() * 0.0
    f = counts.to(prob_sum.dtype) / count_total
    return E * (f.detach() * prob_sum).sum() / prob_tokens


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_n logsumexp(z_n)^2`` (0 for no tokens).

    >>> import torch
    >>> float(z_loss(torch.zeros(3, 4))) == float(torch.log(torch.tensor(4.0)) ** 2)
    True
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, -1).pow(2).mean()
