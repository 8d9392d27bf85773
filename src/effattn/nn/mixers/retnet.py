"""Multi-scale retention (RetNet) as a mixer (``"retnet"``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import (
    chunk_retention,
    chunk_simple_gla,
    retention_log_decay,
    step_retention,
    step_simple_gla,
)
from effattn.nn.mixers._base import (
    MixerBase,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.registry import register_mixer

__all__ = ["RetNetMixer"]


@register_mixer("retnet")
class RetNetMixer(MixerBase):
    """Multi-scale retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei, "Retentive Network: A
    Successor to Transformer for Large Language Models", 2023).

    ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` with a fixed decay
    ``gamma_h = 1 - 2^(-5 - h)`` per head (:func:`effattn.linear.retention_log_decay`);
    ``y = W_o (swish(W_g x) * GroupNorm_h(o))``. The xPos rotation of q/k is not applied (the decay
    alone gives the position signal). With left padding the same recurrence runs as
    :func:`effattn.linear.chunk_simple_gla` with the log decay zeroed at padded steps.
    State: ``S [B, H, K, V]`` float32.

    Example::

        >>> mixer = RetNetMixer(32, 2).eval()
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
        self.qkvg = nn.Linear(dim, 4 * dim, bias=False)
        self.group_norm = nn.GroupNorm(heads, dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("log_decay", retention_log_decay(heads), persistent=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, _ = x.shape
        q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        log_decay = self.log_decay.to(x.device)
        step = T == 1
        sp = current_sequence_parallel()
        if sp is not None:  # sequence shards: LASP-2 (a fixed decay per head)
            if valid is not None:
                raise ValueError("sequence-parallel RetNet takes no valid mask (shards of unpadded sequences)")
            o, state = sp.linear(
                "retnet", q, k, v, log_decay, initial_state=state, output_final_state=True, chunk_size=self.chunk_size
            )
        elif valid is None:
            fn = step_retention if step else chunk_retention
            kw = {} if step else {"chunk_size": self.chunk_size}
            o, state = fn(q, k, v, log_decay, initial_state=state, output_final_state=True, **kw)
        else:
            gate = zero_invalid(log_decay.expand(B, T, self.heads), valid)
            fn = step_simple_gla if step else chunk_simple_gla
            kw = {} if step else {"chunk_size": self.chunk_size}
            k, v = zero_invalid(k, valid), zero_invalid(v, valid)
            o, state = fn(q, k, v, gate, initial_state=state, output_final_state=True, **kw)
        o = self.group_norm(merge_heads(o.to(x.dtype)).reshape(B * T, self.dim)).reshape(B, T, self.dim)
        return self.o_proj(F.silu(g) * o), state
