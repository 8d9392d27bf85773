"""The Mamba-2 block (SSD, a scalar decay per head) as a mixer (``"mamba2"``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import chunk_simple_gla, step_simple_gla
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

__all__ = ["Mamba2Mixer"]


@register_mixer("mamba2")
class Mamba2Mixer(MixerBase):
    """The Mamba-2 block (Dao, Gu, "Transformers are SSMs: Generalized Models and Efficient
    Algorithms Through Structured State Space Duality", 2024).

    ``z, xBC, dt = W_in u``; ``x, B, C = silu(conv4(xBC))``; ``dt = softplus(dt + dt_bias)`` per
    head; ``h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D_h x_t`` (one scalar
    decay per head: the SSD form, run as :func:`effattn.linear.chunk_simple_gla` with ``q = C``,
    ``k = B``, ``v = dt x``, ``g = dt A``, scale 1); ``out = W_out RMSNorm(y * silu(z))``.
    ``d_inner = expand * dim`` split into ``heads`` heads; ``B, C`` are shared by all heads (one group).
    State: ``(h [B, H, N, P], conv [B, 3, d_inner + 2N])``.

    Example::

        >>> mixer = Mamba2Mixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(self, dim: int, heads: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, chunk_size: int = 64):
        super().__init__()
        check_heads(dim, heads)
        self.dim, self.heads, self.d_state, self.chunk_size = dim, heads, d_state, chunk_size
        self.d_inner = expand * dim
        if self.d_inner % heads:
            raise ValueError(f"expand * dim ({self.d_inner}) must be divisible by heads ({heads})")
        self.in_proj = nn.Linear(dim, 2 * self.d_inner + 2 * d_state + heads, bias=False)
        self.conv = ShortConv(self.d_inner + 2 * d_state, d_conv)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        h, conv_state = state if state is not None else (None, None)
        B, T, _ = x.shape
        H, N = self.heads, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xBC, conv_state = self.conv(xBC, conv_state, valid)
        xs, Bm, Cm = xBC.split([self.d_inner, N, N], dim=-1)
        dt = zero_invalid(F.softplus(dt.float() + self.dt_bias), valid)  # [B, T, H]
        g = -self.A_log.float().exp() * dt
        xs = split_heads(xs, H)
        q, k = Cm.unsqueeze(2).expand(B, T, H, N), Bm.unsqueeze(2).expand(B, T, H, N)
        v = xs * dt.unsqueeze(-1).to(xs.dtype)
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: the convolution took its halo; LASP-2 for the SSD scan
            y, h = sp.linear(
                "simple_gla",
                q,
                k,
                v,
                g.to(x.dtype),
                scale=1.0,
                initial_state=h,
                output_final_state=True,
                chunk_size=self.chunk_size,
            )
        elif T == 1:
            y, h = step_simple_gla(q, k, v, g.to(x.dtype), scale=1.0, initial_state=h, output_final_state=True)
        else:
            y, h = chunk_simple_gla(
                q, k, v, g.to(x.dtype), scale=1.0, initial_state=h, output_final_state=True, chunk_size=self.chunk_size
            )
        y = y.to(x.dtype) + self.D.to(x.dtype)[:, None] * xs
        y = self.norm(merge_heads(y) * F.silu(z))
        return self.out_proj(y), (h, conv_state)
