"""Routers: which experts each token visits, and with what weight.

Token choice (Switch / GShard / Mixtral): router logits ``z = x W_r^T`` (float32); scores
``s = softmax(z)`` (``kind="softmax"``) or ``s = sigmoid(z)`` (``kind="sigmoid"``, DeepSeek-V3); each
token picks the ``top_k`` experts of ``s + b`` and weighs them by ``s`` at those experts, renormalized to
sum to one when ``normalize`` (Mixtral, "Mixtral of Experts", 2024). ``b`` is the auxiliary-loss-free
balancing bias of DeepSeek-V3 ("DeepSeek-V3 Technical Report", 2024): a buffer used for the choice only,
never for the weights, updated outside autograd by :meth:`Router.update_bias` after each optimizer step::

    b_i <- b_i + rate * sign(mean_j load_j - load_i)

Expert choice (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", 2022): ``s = softmax(z)``
over experts, and each expert takes the ``C = ceil(capacity_factor * N * top_k / E)`` tokens of highest
score among the ``N`` tokens of the call (weights ``s``). This choice looks at the whole batch, so it is
not causal: a token's experts depend on later tokens (use token choice for autoregressive decoding).

A routing decision is a list of assignments ``(token, expert, weight, priority)``; ``priority`` orders
the assignments for capacity (GShard: every token's first choice before any second choice, in token
order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effattn._checks import check_float, check_positive_int

__all__ = ["Router", "Routing", "ROUTER_KINDS", "ROUTINGS"]

ROUTER_KINDS = ("softmax", "sigmoid")
ROUTINGS = ("token_choice", "expert_choice")


@dataclass
class Routing:
    """One call's routing of ``N`` tokens to ``E`` experts (``A`` assignments).

    ``logits [N, E]`` float32 router logits; ``scores [N, E]`` softmax or sigmoid of them; ``token [A]``,
    ``expert [A]``, ``weight [A]`` (float32) and ``priority [A]`` (smaller is served first) the
    assignments. For token choice ``A = N * top_k`` and assignment ``n * top_k + j`` is token ``n``'s
    ``j``-th choice.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    priority: torch.Tensor


class Router(nn.Module):
    """Linear router ``x [N, dim] -> Routing`` (see the module docstring for the formulas).

    >>> import torch
    >>> r = Router(8, num_experts=4, top_k=2)
    >>> rt = r(torch.randn(5, 8))
    >>> tuple(rt.token.shape), bool(torch.allclose(rt.weight.view(5, 2).sum(-1), torch.ones(5)))
    ((10,), True)
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        kind: str = "softmax",
        routing: str = "token_choice",
        normalize: bool = True,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {kind!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "expert_choice" and kind != "softmax":
            raise ValueError(f"expert_choice routing uses softmax scores, got router={kind!r}")
        if capacity_factor is not None:
            check_float("capacity_factor", capacity_factor, 0.0, math.inf, lo_open=True)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.kind, self.routing, self.normalize = kind, routing, bool(normalize)
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.randn(num_experts, dim) * dim**-0.5)
        self.register_buffer("bias", torch.zeros(num_experts))
        # routed tokens per expert since the last bias update (DeepSeek-V3 balancing)
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def expert_capacity(self, num_tokens: int) -> int:
        """Expert choice: tokens per expert ``min(N, ceil(capacity_factor * N * top_k / E))`` (factor 1 if unset)."""
        cf = 1.0 if self.capacity_factor is None else self.capacity_factor
        return min(num_tokens, math.ceil(cf * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        N, E, k = x.shape[0], self.num_experts, self.top_k
        logits = x.float() @ self.weight.float().t()
        scores = torch.softmax(logits, -1) if self.kind == "softmax" else torch.sigmoid(logits)
        if self.routing == "expert_choice":
            C = self.expert_capacity(N)
            w, tok = scores.t().topk(C, dim=1)  # [E, C]
            expert = torch.arange(E, device=x.device).repeat_interleave(C)
            token, weight = tok.reshape(-1), w.reshape(-1)
            return Routing(logits, scores, token, expert, weight, torch.arange(token.numel(), device=x.device))
        choose = scores + self.bias if self.kind == "sigmoid" else scores
        idx = choose.detach().topk(k, dim=-1).indices  # [N, k]
        w = scores.gather(1, idx)
        if self.normalize:
            w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        if self.training and torch.is_grad_enabled():
            self.load += torch.bincount(idx.reshape(-1), minlength=E)
        token = torch.arange(N, device=x.device).repeat_interleave(k)
        priority = (torch.arange(k, device=x.device) * N + torch.arange(N, device=x.device)[:, None]).reshape(-1)
        return Routing(logits, scores, token, idx.reshape(-1), w.reshape(-1), priority)

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, group=None) -> torch.Tensor:
        """DeepSeek-V3 balancing step: ``b_i += rate * sign(mean(load) - load_i)``; resets the load.

        Call after ``optimizer.step()``. ``load`` counts the tokens routed to each expert by training calls
        since the last update; under data parallelism pass the group (or leave ``None`` to all-reduce
        over the default group when ``torch.distributed`` is initialized) so every rank applies one update.
        Returns the load that was used.

        >>> import torch
        >>> r = Router(4, 4, 1, kind="sigmoid")
        >>> _ = r(torch.randn(16, 4))
        >>> load = r.update_bias(rate=0.1)
        >>> bool((r.bias[load.argmax()] < 0).item())
        True
        """
        check_float("rate", rate, 0.0, math.inf)
        load = self.load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=group)
        lf = load.to(self.bias.dtype)
        self.bias += rate * torch.sign(lf.mean() - lf)
        self.load.zero_()
        return load
