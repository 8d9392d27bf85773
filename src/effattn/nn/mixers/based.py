"""Based: Taylor linear attention, a sliding-window softmax branch and a short gated convolution as
one mixer (``"based"``)."""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.exact import attention
from effattn.nn.mixers._base import (
    MixerBase,
    ShortConv,
    check_heads,
    check_x_and_valid,
    merge_heads,
    split_heads,
    zero_invalid,
)
from effattn.nn.mixers.linear_attention import normalized_linear_attn
from effattn.nn.registry import register_mixer

__all__ = ["BasedMixer"]


@register_mixer("based")
class BasedMixer(MixerBase):
    """Based: Taylor linear attention, a small sliding-window softmax attention and a short gated
    convolution (Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Re, "Simple linear
    attention language models balance the recall-throughput tradeoff", 2024).

    Linear branch: ``phi(x) = [1, x, x (x) x / sqrt(2)]`` on a small feature dim (``feature_dim``,
    default 16) so ``phi(s q) . phi(k) = 1 + s q.k + (s q.k)^2 / 2`` approximates ``exp(s q.k)``,
    normalized as softmax is. Window branch: exact causal softmax attention over the ``window``
    (default 64) most recent tokens (:func:`effattn.attention`). Convolution branch (the paper's
    gated convolution, BaseConv of the same authors): ``o_conv = (W_g x) * conv_K(W_c x)``, a causal
    depthwise convolution of ``conv_size`` taps (default 3, no activation) gated elementwise by a
    linear projection; it gives the layer exact local token shifts that the Taylor map blurs.

    The paper stacks the three as separate layers (in a fixed pattern); here one mixer holds them,
    ``y = W_o [o_linear ; o_window ; o_conv]`` (a choice of ours: the paper does not describe a
    single-layer fusion). ``conv_size=0`` drops the convolution branch (the mixer of effattn before
    it had one). State: the Taylor state ``[B, H, 1 + f + f^2, V + 1]``, the window's last
    ``window - 1`` keys/values (with their validity) and the convolution's last ``conv_size - 1``
    inputs ``[B, conv_size - 1, dim]``, constant in the context length. No rotary embedding.

    Example::

        >>> mixer = BasedMixer(32, 2).eval()
        >>> x = torch.randn(1, 9, 32)
        >>> y, state = mixer(x[:, :8])                    # prefill
        >>> y_last, state = mixer(x[:, 8:], state)        # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 8:], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel (linear, window, conv)

    def __init__(
        self,
        dim: int,
        heads: int,
        feature_dim: int = 16,
        window: int = 64,
        chunk_size: int = 64,
        conv_size: int = 3,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        check_positive_int("window", window)
        self.conv_size = check_int("conv_size", conv_size, 0)
        self.feature_dim, self.window, self.chunk_size = feature_dim, window, chunk_size
        self.q_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        branches = 2
        if self.conv_size:
            self.conv_in = nn.Linear(dim, dim, bias=False)
            self.conv_gate = nn.Linear(dim, dim, bias=False)
            self.conv = ShortConv(dim, self.conv_size, activation=False)
            branches = 3
        self.o_proj = nn.Linear(branches * dim, dim, bias=False)

    def _probe_len(self, seq_len: int) -> int:
        return min(seq_len, self.window)

    def _window_attention(self, x, buf, valid):
        B, T, _ = x.shape
        q, k, v = (split_heads(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        sp = current_sequence_parallel()
        if sp is not None and buf is None and valid is None:  # sequence shards: the halo exchange
            return sp.attention_call(q, k, v, causal=True, window=self.window), None
        kval = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if buf is not None:
            k = torch.cat([buf[0].to(k.dtype), k], dim=1)
            v = torch.cat([buf[1].to(v.dtype), v], dim=1)
            kval = torch.cat([buf[2], kval], dim=1)
        mask_mod = None
        if not bool(kval.all()):
            kv_valid = kval

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_valid[b, kv_idx]

        o = attention(q, k, v, causal=True, window=self.window, mask_mod=mask_mod)
        start = max(0, k.shape[1] - (self.window - 1))  # the keys a later query can still see
        new_buf = (k[:, start:], v[:, start:], kval[:, start:])
        return o, new_buf

    def _gated_conv(self, x, conv_state, valid):
        """``(W_g x) * conv(W_c x)``; inputs at invalid positions are zeroed before the convolution."""
        u, conv_state = self.conv(self.conv_in(x), conv_state, valid)
        return self.conv_gate(x) * u, conv_state

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        lin_state, buf, conv_state = state if state is not None else (None, None, None)
        H = self.heads
        q, k, v = (split_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj))
        o_lin, lin_state = normalized_linear_attn(
            q, zero_invalid(k, valid), v, valid, "taylor", None, lin_state, self.chunk_size
        )
        o_win, buf = self._window_attention(x, buf, valid)
        parts = [merge_heads(o_lin.to(x.dtype)), merge_heads(o_win)]
        if self.conv_size:
            o_conv, conv_state = self._gated_conv(x, conv_state, valid)
            parts.append(o_conv)
        return self.o_proj(torch.cat(parts, dim=-1)), (lin_state, buf, conv_state)
