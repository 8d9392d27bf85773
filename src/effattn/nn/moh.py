"""MoH: mixture-of-head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Head-Routing").

Multi-head attention is a sum over heads, ``y = sum_i H_i W_o^i``; MoH weights the sum per token
and lets each token use only some heads:

    y_t = sum_i g_{t,i} H_{t,i} W_o^i
    g_{t,i} = a1_t softmax(W_s x_t)_i                     for the h_s shared (always-on) heads
    g_{t,i} = a2_t softmax(W_r x_t)_i  if i in top-k, else 0   for the routed heads
    [a1_t, a2_t] = softmax(W_h x_t)                       (two-stage routing)

with the load-balance loss over routed heads (the paper's L_b, Switch-Transformer style)

    L_b = sum_i f_i P_i ,  f_i = (1/T) sum_t 1[token t selects head i],  P_i = (1/T) sum_t softmax(W_r x_t)_i

averaged over real (``valid``) tokens of the batch; add ``beta * layer.load_balance_loss``
(the paper uses ``beta = 0.01``) to the training loss.

Compute: every head is computed by :func:`effattn.attention` and then weighted (zero for the
heads a token does not select), as the paper's GPU implementation does; the saving MoH reports
comes from fewer active heads per token, which a dense kernel does not exploit.
"""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_int
from effattn.kv import LayerCache
from effattn.nn.attention import Attention

ROUTINGS = ("topk", "all")


class MoHAttention(Attention):
    """Mixture-of-head attention on top of :class:`~effattn.nn.attention.Attention`.

    Args:
        dim, heads: as :class:`Attention` (``heads`` counts shared and routed heads).
        shared_heads: heads every token uses (``h_s``, default ``heads // 4``); the other
            ``heads - shared_heads`` are routed.
        top_k: routed heads each token selects (default half of them, rounded up; the paper
            activates 50-90% of the heads).
        routing: ``"topk"`` (MoH) or ``"all"`` (every head with weight 1: plain multi-head
            attention, for checks and for converting from MHA).
        **kw: every other :class:`Attention` argument (``kv_heads``, ``rope``, ``window``, ...).

    After each forward, ``load_balance_loss`` (scalar tensor) and ``last_gates`` (``[B, T, heads]``,
    zero at unselected heads) hold the routing of that call.

    Example::

        >>> layer = MoHAttention(32, 8, shared_heads=2, top_k=3)
        >>> y, cache = layer(torch.randn(2, 5, 32))
        >>> (layer.last_gates > 0).sum(-1).unique().tolist()
        [5]
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        shared_heads: int | None = None,
        top_k: int | None = None,
        routing: str = "topk",
        **kw,
    ):
        super().__init__(dim, heads, **kw)
        if shared_heads is None:
            shared_heads = heads // 4
        if top_k is None and isinstance(shared_heads, int):
            top_k = -(-(heads - shared_heads) // 2)
        check_int(f"shared_heads (of heads={heads})", shared_heads, minimum=0, maximum=heads)
        routed = heads - shared_heads
        check_int(f"top_k (of {routed} routed heads)", top_k, minimum=0, maximum=routed)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if routing == "topk" and shared_heads + top_k == 0:
            raise ValueError("shared_heads + top_k must be >= 1 (each token needs a head)")
        self.shared_heads, self.routed_heads, self.top_k, self.routing = shared_heads, routed, top_k, routing
        self.router_shared = nn.Linear(dim, shared_heads, bias=False) if shared_heads else None
        self.router_routed = nn.Linear(dim, routed, bias=False) if routed else None
        self.router_mix = nn.Linear(dim, 2, bias=False)
        self.load_balance_loss: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_heads={self.shared_heads}, top_k={self.top_k}, routing={self.routing}"

    def gates(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head weights ``g [B, T, heads]`` (shared heads first) and the load-balance loss."""
        B, T, _ = x.shape
        if self.routing == "all":
            return x.new_ones(B, T, self.heads), x.new_zeros(())
        a = self.router_mix(x).softmax(-1)  # [B, T, 2]
        parts = []
        if self.shared_heads:
            parts.append(a[..., :1] * self.router_shared(x).softmax(-1))
        lb = x.new_zeros(())
        if self.routed_heads:
            p = self.router_routed(x).softmax(-1)  # [B, T, routed]
            idx = p.topk(self.top_k, dim=-1).indices
            sel = torch.zeros_like(p).scatter_(-1, idx, 1.0)
            parts.append(a[..., 1:] * p * sel)
            w = x.new_ones(B, T) if valid is None else valid.to(x.dtype)
            n = w.sum().clamp(min=1.0)
            f = (sel * w[..., None]).sum((0, 1)) / n
            P = (p * w[..., None]).sum((0, 1)) / n
            lb = (f * P).sum()
        return torch.cat(parts, -1), lb

    def forward(
        self, x: torch.Tensor, state: LayerCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        o, cache = self.attend(x, state, valid)
        g, lb = self.gates(x, valid)
        self.last_gates, self.load_balance_loss = g.detach(), lb
        return self.o_proj((o * g[..., None].to(o.dtype)).flatten(2)), cache
