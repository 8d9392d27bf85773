"""The Mamba block (selective scan) as a mixer (``"mamba"``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import chunk_selective_scan, step_selective_scan
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

__all__ = ["MambaMixer"]


@register_mixer("mamba")
class MambaMixer(MixerBase):
    """The Mamba block (Gu, Dao, "Mamba: Linear-Time Sequence Modeling with Selective State
    Spaces", 2023).

    ``x, z = W_in u``; ``x = silu(conv4(x))``; ``delta, B, C = x_proj(x)`` (``delta`` of rank
    ``dt_rank``, default ``ceil(dim / 16)``); ``dt = softplus(W_dt delta + b_dt)``;
    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t``, ``y_t = C_t h_t + D x_t``;
    ``out = W_out (y * silu(z))`` with ``A = -exp(A_log)`` ``[d_inner, N]`` (S4D-real init
    ``A = -(1..N)``), ``d_inner = expand * dim``. The ``d_inner`` channels are grouped as ``heads``
    heads for :func:`effattn.linear.chunk_selective_scan` (any split gives the same result).
    Padded steps get ``dt = 0`` (no decay, no write). State: ``(h [B, H, P, N], conv [B, 3, d_inner])``.

    Example::

        >>> mixer = MambaMixer(32, 2).eval()
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
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        chunk_size: int = 64,
    ):
        super().__init__()
        check_heads(dim, heads)
        self.dim, self.heads, self.d_state, self.chunk_size = dim, heads, d_state, chunk_size
        self.d_inner = expand * dim
        if self.d_inner % heads:
            raise ValueError(f"expand * dim ({self.d_inner}) must be divisible by heads ({heads})")
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.conv = ShortConv(self.d_inner, d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt = torch.exp(torch.empty(self.d_inner).uniform_(math.log(1e-3), math.log(0.1)))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        h, conv_state = state if state is not None else (None, None)
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xi, conv_state = self.conv(xi, conv_state, valid)
        delta, Bm, Cm = self.x_proj(xi).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = zero_invalid(F.softplus(self.dt_proj(delta)), valid)
        H, P = self.heads, self.d_inner // self.heads
        A = -self.A_log.float().exp().reshape(H, P, self.d_state)
        args = (split_heads(xi, H), split_heads(dt, H), A.to(x.dtype), Bm.unsqueeze(2), Cm.unsqueeze(2))
        kw = dict(
            D=self.D.reshape(H, P), z=split_heads(z, H), delta_softplus=False, initial_state=h, output_final_state=True
        )
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: the convolution took its halo; LASP-2 for the scan
            y, h = sp.linear("mamba", *args, **kw, chunk_size=self.chunk_size)
        elif x.shape[1] == 1:
            y, h = step_selective_scan(*args, **kw)
        else:
            y, h = chunk_selective_scan(*args, **kw, chunk_size=self.chunk_size)
        return self.out_proj(merge_heads(y.to(x.dtype))), (h, conv_state)
