"""Mixture-of-Memories as a mixer (``"mom"``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.linear import chunk_mom, step_mom
from effattn.nn.mixers._base import (
    MixerBase,
    ShortConv,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.registry import register_mixer

__all__ = ["MoMMixer"]


@register_mixer("mom")
class MoMMixer(MixerBase):
    """Mixture-of-Memories layer (Du, Sun, Lan, Hu, Cheng, "MoM: Linear Sequence Modeling with
    Mixture-of-Memories", 2025).

    ``q, k, v = silu(conv4(W x))``; a router ``W_r x`` per head sends each token to its ``top_k``
    of ``memories`` memory matrices (plus one shared memory, always written and read); a selected
    memory decays by ``alpha_t = exp(-exp(A_log) * softplus(W_a x + dt_bias))`` and adds
    ``k_t v_t^T``; ``o_t = scale * sum_m w_t^m S^m_t^T q_t`` with ``w_t`` the softmax of the
    selected router logits; ``y = W_o (RMSNorm(o) * swish(W_g x))`` (:func:`effattn.linear.chunk_mom`).
    Keys are L2-normalized so the memories stay bounded. State:
    ``(S [B, H, memories + 1, K, V], conv_q, conv_k, conv_v)``.

    Example::

        >>> mixer = MoMMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(
        self,
        dim: int,
        heads: int,
        memories: int = 4,
        top_k: int = 2,
        shared_memory: bool = True,
        conv_size: int = 4,
        chunk_size: int = 64,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        check_positive_int("memories", memories)
        check_int("top_k", top_k, 1, memories)
        self.memories, self.top_k, self.shared_memory, self.chunk_size = memories, top_k, shared_memory, chunk_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(dim, conv_size) for _ in range(3))
        self.router = nn.Linear(dim, heads * memories, bias=False)
        self.a_proj = nn.Linear(dim, heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        S, cq, ck, cv = state if state is not None else (None, None, None, None)
        H = self.heads
        q, cq = self.q_conv(self.q_proj(x), cq, valid)
        k, ck = self.k_conv(self.k_proj(x), ck, valid)
        v, cv = self.v_conv(self.v_proj(x), cv, valid)
        q = F.normalize(split_heads(q, H), dim=-1)
        k = zero_invalid(F.normalize(split_heads(k, H), dim=-1), valid)
        v = zero_invalid(split_heads(v, H), valid)
        logits = split_heads(self.router(x), H)
        g = zero_invalid(-self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias), valid)
        kw = dict(top_k=self.top_k, shared_memory=self.shared_memory, initial_state=S, output_final_state=True)
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: the convolutions took their halo; LASP-1's state pass
            o, S = sp.linear("mom", q, k, v, logits, g.to(x.dtype), **kw, chunk_size=self.chunk_size)
        elif x.shape[1] == 1:
            o, S = step_mom(q, k, v, logits, g.to(x.dtype), **kw)
        else:
            o, S = chunk_mom(q, k, v, logits, g.to(x.dtype), **kw, chunk_size=self.chunk_size)
        o = self.o_norm(o.to(x.dtype)) * F.silu(split_heads(self.g_proj(x), H))
        return self.o_proj(merge_heads(o)), (S, cq, ck, cv)
