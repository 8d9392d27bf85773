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

Compute (``compute=``): ``"selected"`` (default) computes a head only for the tokens routed to it:
per query head ``i`` (and batch row) the queries of the tokens that selected ``i`` are gathered and
attend the head's keys and values of every earlier token (keys and values are not routed: the paper
routes heads on the query side, and the cache keeps every kv head), causal by the tokens' positions.
The attention FLOPs then fall with ``top_k``: ``4 D sum_{t, i selected} (keys t sees)`` instead of
``4 D H sum_t (keys t sees)`` (see :func:`attention_flops`). ``"dense"`` computes every head and
weights it (zero for the heads a token does not select), as the paper's GPU code does; it is the
reference, and the path taken where ``"selected"`` does not apply (a continued cache, padding,
mask/score mods, sinks, softcap, non-causal or two-sided windows, head gates, sequence parallelism):
both give equal outputs.
The per-(row, head) loop of ``"selected"`` is a plain-PyTorch form (:func:`gathered_causal_attention`,
256 queries at a time): it saves arithmetic, not Python overhead, at small sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_int
from effattn.dist import current_sequence_parallel
from effattn.kv import LayerCache
from effattn.nn.attention import Attention, check_mixer_input, layer_cache

ROUTINGS = ("topk", "all")
COMPUTES = ("selected", "dense")

__all__ = ["MoHAttention", "attention_flops", "gathered_causal_attention"]


def gathered_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int | None = None, chunk: int = 256
) -> torch.Tensor:
    """Softmax attention of the queries ``q [n, D]`` at positions ``pos [n]`` (increasing) over the keys
    ``k, v [T, D]`` at ``0..T-1``: query ``r`` sees keys ``s <= pos[r]`` (and ``pos[r] - s < window``),
    scale ``1/sqrt(D)``. Queries go ``chunk`` at a time, each chunk against the keys up to its last
    position only, so at most ``chunk x T`` scores exist at once.

    >>> q, k = torch.randn(3, 4), torch.randn(6, 4)
    >>> o = gathered_causal_attention(q, k, k, torch.tensor([0, 2, 5]))
    >>> torch.allclose(o[0], k[0]), tuple(o.shape)
    (True, (3, 4))
    """
    out = []
    scale = q.shape[-1] ** -0.5
    for c in range(0, q.shape[0], chunk):
        p = pos[c : c + chunk]
        last = int(p[-1]) + 1
        s = (q[c : c + chunk].float() @ k[:last].float().T) * scale
        ks = torch.arange(last, device=q.device)
        ok = ks[None, :] <= p[:, None]
        if window is not None:
            ok = ok & (p[:, None] - ks[None, :] < window)
        a = s.masked_fill(~ok, float("-inf")).softmax(-1)
        out.append((a @ v[:last].float()).to(q.dtype))
    return torch.cat(out, 0)


def attention_flops(gates: torch.Tensor, head_dim: int, window: int | None = None) -> int:
    """FLOPs of causal attention's two matmuls (``QK^T`` and ``AV``, 2 each per multiply-add) over
    the (token, head) pairs with a nonzero gate in ``gates [B, T, heads]``: token ``t`` sees
    ``min(t + 1, window)`` keys. With all gates nonzero this is multi-head attention's count.

    >>> attention_flops(torch.ones(1, 4, 2), 8)             # 2 heads x (1+2+3+4) keys x 4 x 8
    640
    """
    T = gates.shape[1]
    seen = torch.arange(1, T + 1)
    if window is not None:
        seen = seen.clamp(max=window)
    return int(4 * head_dim * ((gates != 0).sum(dim=(0, 2)).cpu() * seen).sum())


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
        compute: ``"selected"`` (default: only the routed (token, head) pairs are computed where the
            call allows it) or ``"dense"`` (every head, then weighted; the reference).
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
        compute: str = "selected",
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
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        self.compute = compute
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

    def _selected_applies(self, state, valid) -> bool:
        w = self.window
        return (
            self.compute == "selected"
            and state is None
            and valid is None
            and self.causal
            and self.mask_mod is None
            and self.score_mod is None
            and self.sinks is None
            and self.softcap is None
            and self.head_gates is None
            and (w is None or isinstance(w, int))
            and current_sequence_parallel() is None  # sequence shards: the dense path's ring/Ulysses call
        )

    def attend_selected(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, LayerCache]:
        """Per-head outputs ``[B, T, heads, head_dim]`` computed only where ``g != 0`` (zeros elsewhere),
        and the new cache (every kv head of every token). Fresh causal sequences only."""
        B, T, _ = x.shape
        cache = layer_cache(None, B, self.cache_pattern)
        pos = cache.next_positions(B, T, None, x.device)
        q, k, v = self._project(x, pos)
        cache.update(k, v, valid=None, q=q)
        cache.trim()
        o = q.new_zeros(B, T, self.heads, self.head_dim)
        group, w = self.heads // self.kv_heads, self.window
        for b in range(B):
            for i in range(self.heads):
                idx = (g[b, :, i] != 0).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                j = i // group

                o[b, idx, i] = gathered_causal_attention(q[b, idx, i], k[b, :, j], v[b, :, j], idx, w)
        return o, cache

    def forward(
        self, x: torch.Tensor, state: LayerCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        check_mixer_input(x, self.dim, valid)  # before the router sees x
        g, lb = self.gates(x, valid)
        self.last_gates, self.load_balance_loss = g.detach(), lb
        if self.routing == "topk" and self._selected_applies(state, valid):
            o, cache = self.attend_selected(x, g)
        else:
            o, cache = self.attend(x, state, valid)
        return self.o_proj((o * g[..., None].to(o.dtype)).flatten(2)), cache
