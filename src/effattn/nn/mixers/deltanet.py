"""DeltaNet and Gated DeltaNet as mixers (``"deltanet"``, ``"gated_deltanet"``): one base class,
the gated one adds a Mamba-2 style scalar decay."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    step_delta_rule,
    step_gated_delta_rule,
)
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

__all__ = ["DeltaNetMixer", "GatedDeltaNetMixer"]


class _DeltaBase(MixerBase):
    gated = False
    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(self, dim: int, heads: int, conv_size: int = 4, use_gate: bool = True, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.chunk_size, self.use_gate = chunk_size, use_gate
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.b_proj = nn.Linear(dim, heads, bias=True)
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(dim, conv_size) for _ in range(3))
        if self.gated:
            self.a_proj = nn.Linear(dim, heads, bias=False)
            self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
            dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.g_proj = nn.Linear(dim, dim, bias=False) if use_gate else None
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        S, cq, ck, cv = state if state is not None else (None, None, None, None)
        q, cq = self.q_conv(self.q_proj(x), cq, valid)
        k, ck = self.k_conv(self.k_proj(x), ck, valid)
        v, cv = self.v_conv(self.v_proj(x), cv, valid)
        H = self.heads
        q, k, v = split_heads(q, H), split_heads(k, H), zero_invalid(split_heads(v, H), valid)
        beta = zero_invalid(torch.sigmoid(self.b_proj(x)), valid)
        step = x.shape[1] == 1
        kw = {} if step else {"chunk_size": self.chunk_size}
        gates = (beta,)
        if self.gated:
            g = zero_invalid(-self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias), valid)
            gates = (g.to(x.dtype), beta)
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: the convolutions took their halo; LASP-1's state pass
            op = "gated_delta_rule" if self.gated else "delta_rule"
            o, S = sp.linear(op, q, k, v, *gates, initial_state=S, output_final_state=True, **kw)
        elif self.gated:
            fn = step_gated_delta_rule if step else chunk_gated_delta_rule
            o, S = fn(q, k, v, *gates, initial_state=S, output_final_state=True, **kw)
        else:
            fn = step_delta_rule if step else chunk_delta_rule
            o, S = fn(q, k, v, beta, initial_state=S, output_final_state=True, **kw)
        o = self.o_norm(o.to(x.dtype))
        if self.g_proj is not None:
            o = o * F.silu(split_heads(self.g_proj(x), H))
        return self.o_proj(merge_heads(o)), (S, cq, ck, cv)


@register_mixer("deltanet")
class DeltaNetMixer(_DeltaBase):
    """DeltaNet layer (Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the
    Delta Rule over Sequence Length", 2024).

    ``q, k, v = silu(conv4(W x))`` (short causal depthwise convolutions), q and k L2-normalized,
    ``beta_t = sigmoid(W_b x_t)``; ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = scale * S_t^T q_t``; ``y = W_o (RMSNorm(o) * swish(W_g x))``.
    State: ``(S [B, H, K, V], conv_q, conv_k, conv_v [B, 3, dim])``.

    Example::

        >>> mixer = DeltaNetMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """


@register_mixer("gated_deltanet")
class GatedDeltaNetMixer(_DeltaBase):
    """Gated DeltaNet layer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
    Delta Rule", 2024).

    As :class:`DeltaNetMixer` with a Mamba-2 style scalar decay per head,
    ``log alpha_t = -exp(A_log) * softplus(W_a x_t + dt_bias)``:
    ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.
    State: ``(S [B, H, K, V], conv_q, conv_k, conv_v [B, 3, dim])``.

    Example::

        >>> mixer = GatedDeltaNetMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    gated = True
