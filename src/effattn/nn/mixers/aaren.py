"""Aaren, attention as an RNN, as a mixer (``"aaren"``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import chunk_aaren, step_aaren
from effattn.nn.mixers._base import (
    MixerBase,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.registry import register_mixer

__all__ = ["AarenMixer"]


# a padded key's score: exp(score - running max) underflows to exactly 0 once a real key arrives
_PAD_SCORE = -1e9


@register_mixer("aaren")
class AarenMixer(MixerBase):
    """Aaren, attention as an RNN (Feng, Tung, Ahmed, Bengio, Hajimirsadeghi, "Attention as an RNN",
    2024).

    A learned query ``q_h`` per head (constant over time) attends to every prefix:
    ``o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)``, ``s_i = q_h . k_i / sqrt(d)``, with
    ``k, v = W_k x, W_v x``; ``y = W_o o``. Run by :func:`effattn.linear.chunk_aaren` (prefix
    max / sums, carried ``(m, s, a)`` state) and :func:`effattn.linear.step_aaren`. Padded
    positions get a score of ``-1e9`` (through an extra key column), so their weight is exactly zero
    once a real token has been seen. State: ``(m [B, H], s [B, H], a [B, H, V])``.

    Example::

        >>> mixer = AarenMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(self, dim: int, heads: int, chunk_size: int = 64):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.chunk_size = chunk_size
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) / math.sqrt(self.head_dim))
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        H = self.heads
        k, v = split_heads(self.k_proj(x), H), split_heads(self.v_proj(x), H)
        q = self.query.to(x.dtype)
        scale = self.head_dim**-0.5
        if valid is not None:
            pad = torch.where(valid, 0.0, _PAD_SCORE / scale).to(x.dtype)
            k = torch.cat([zero_invalid(k, valid), pad[:, :, None, None].expand(-1, -1, H, 1)], dim=-1)
            q = torch.cat([q, torch.ones_like(q[:, :1])], dim=-1)
            v = zero_invalid(v, valid)
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: LASP-1's sequential pass of the running (max, sum, weighted sum)
            o, state = sp.linear(
                "aaren", q, k, v, scale=scale, initial_state=state, output_final_state=True, chunk_size=self.chunk_size
            )
        elif x.shape[1] == 1:
            o, state = step_aaren(q, k, v, scale=scale, initial_state=state, output_final_state=True)
        else:
            o, state = chunk_aaren(
                q, k, v, scale=scale, initial_state=state, output_final_state=True, chunk_size=self.chunk_size
            )
        return self.o_proj(merge_heads(o.to(x.dtype))), state
