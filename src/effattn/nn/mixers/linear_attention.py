"""Causal linear attention with a feature map as a mixer (``"linear_attention"``), and the
normalized kernel attention that Based shares."""

from __future__ import annotations

import torch
from torch import nn

from effattn.dist import current_sequence_parallel
from effattn.linear import FEATURE_MAPS, chunk_linear_attn, step_linear_attn
from effattn.nn.mixers._base import (
    MixerBase,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.registry import register_mixer

__all__ = ["LinearAttentionMixer", "normalized_linear_attn"]


def normalized_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    feature_map: str,
    scale: float | None,
    state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized kernel attention ``phi_q(q)^T S / (phi_q(q)^T z + eps)``, with the normalizer
    carried as an extra value column that is 1 at valid positions and 0 at padded ones (so padded
    steps add nothing to ``z`` even where ``phi(0) != 0``). State ``[B, H, F, V + 1]``."""
    ones = torch.ones_like(v[..., :1])
    v_ext = zero_invalid(torch.cat([v, ones], dim=-1), valid)
    sp = current_sequence_parallel()
    if sp is not None:  # sequence shards: LASP-2 (no decay: the states add up)
        o_ext, state = sp.linear(
            "linear_attn",
            q,
            k,
            v_ext,
            feature_map=feature_map,
            scale=scale,
            initial_state=state,
            output_final_state=True,
            chunk_size=chunk_size,
        )
    else:
        fn = step_linear_attn if q.shape[1] == 1 else chunk_linear_attn
        kw = {} if q.shape[1] == 1 else {"chunk_size": chunk_size}
        o_ext, state = fn(
            q, k, v_ext, feature_map=feature_map, scale=scale, initial_state=state, output_final_state=True, **kw
        )
    return o_ext[..., :-1] / (o_ext[..., -1:] + 1e-6), state


# ----------------------------------------------------------------------------------------------
# linear attention and Based
# ----------------------------------------------------------------------------------------------


@register_mixer("linear_attention")
class LinearAttentionMixer(MixerBase):
    """Causal linear attention with a feature map (Katharopoulos, Vyas, Pappas, Fleuret,
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020).

    ``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)``, ``S_t = S_{t-1} + phi(k_t) v_t^T``,
    ``z_t = z_{t-1} + phi(k_t)``; ``y = W_o o``. ``feature_map`` is one of
    :data:`effattn.linear.FEATURE_MAPS` (default ``"elu1"``); the normalizer is used for the
    non-negative maps, and for ``identity``/``cosine`` (which have none) the output goes through a
    per-head RMSNorm instead. ``feature_dim`` sets the per-head q/k size (default: the head dim).
    State: ``S [B, H, F, V (+1 normalizer column)]`` float32.

    Example::

        >>> mixer = LinearAttentionMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(
        self, dim: int, heads: int, feature_map: str = "elu1", feature_dim: int | None = None, chunk_size: int = 64
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.feature_map, self.chunk_size = feature_map, chunk_size
        self.normalize = feature_map in ("elu1", "relu", "taylor")
        self.key_dim = feature_dim or self.head_dim
        self.q_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_norm = None if self.normalize else nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        H = self.heads
        q, k, v = (split_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        k = zero_invalid(k, valid)
        if self.normalize:
            o, state = normalized_linear_attn(q, k, v, valid, self.feature_map, None, state, self.chunk_size)
        else:
            v = zero_invalid(v, valid)
            sp = current_sequence_parallel()
            if sp is not None:  # sequence shards: LASP-2
                o, state = sp.linear(
                    "linear_attn",
                    q,
                    k,
                    v,
                    feature_map=self.feature_map,
                    initial_state=state,
                    output_final_state=True,
                    chunk_size=self.chunk_size,
                )
            else:
                fn = step_linear_attn if x.shape[1] == 1 else chunk_linear_attn
                kw = {} if x.shape[1] == 1 else {"chunk_size": self.chunk_size}
                o, state = fn(q, k, v, feature_map=self.feature_map, initial_state=state, output_final_state=True, **kw)
            o = self.o_norm(o)
        return self.o_proj(merge_heads(o.to(x.dtype))), state
