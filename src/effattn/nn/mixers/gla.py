"""Gated linear attention as a mixer (``"gla"``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import chunk_gla, step_gla
from effattn.nn.mixers._base import (
    MixerBase,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.registry import register_mixer

__all__ = ["GLAMixer"]


@register_mixer("gla")
class GLAMixer(MixerBase):
    """Gated linear attention layer (Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention
    Transformers with Hardware-Efficient Training", 2024).

    ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with a data-dependent
    decay per key dimension from a low-rank projection,
    ``log alpha_t = logsigmoid(W_2 W_1 x_t + b) / gate_normalizer`` (rank 16, normalizer 16);
    ``y = W_o (RMSNorm(o) * swish(W_r x))``. Keys use half the width (``expand_k = 0.5``) as in the
    paper. State: ``S [B, H, K, V]`` float32.

    Example::

        >>> mixer = GLAMixer(32, 2).eval()
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
        expand_k: float = 0.5,
        gate_low_rank: int = 16,
        gate_normalizer: float = 16.0,
        chunk_size: int = 64,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        key_total = int(dim * expand_k)
        if key_total < heads or key_total % heads:
            raise ValueError(f"dim * expand_k ({key_total}) must be a positive multiple of heads ({heads})")
        self.key_dim, self.gate_normalizer, self.chunk_size = key_total // heads, gate_normalizer, chunk_size
        self.q_proj = nn.Linear(dim, key_total, bias=False)
        self.k_proj = nn.Linear(dim, key_total, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.g_proj = nn.Linear(dim, dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank, bias=False), nn.Linear(gate_low_rank, key_total))
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        H = self.heads
        q, k, v = (split_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        gk = split_heads(F.logsigmoid(self.gk_proj(x)) / self.gate_normalizer, H)
        k, v, gk = zero_invalid(k, valid), zero_invalid(v, valid), zero_invalid(gk, valid)
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: LASP-2 (effattn.dist.sequence_parallel)
            o, state = sp.linear(
                "gla", q, k, v, gk, initial_state=state, output_final_state=True, chunk_size=self.chunk_size
            )
        elif x.shape[1] == 1:
            o, state = step_gla(q, k, v, gk, initial_state=state, output_final_state=True)
        else:
            o, state = chunk_gla(q, k, v, gk, initial_state=state, output_final_state=True, chunk_size=self.chunk_size)
        o = merge_heads(self.o_norm(o.to(x.dtype)))
        return self.o_proj(o * F.silu(self.g_proj(x))), state
