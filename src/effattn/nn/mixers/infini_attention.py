"""Infini-attention as a mixer (Munkhdalai, Faruqui, Gopal, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", 2024): per-segment causal softmax attention plus a
compressive linear memory, mixed by a learned per-head gate (:func:`effattn.memory.infini_attention`)."""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_int
from effattn.exact import RotaryEmbedding
from effattn.memory import infini_attention
from effattn.nn.mixers._base import MixerBase, ShortConv, check_heads, check_x_and_valid, zero_invalid
from effattn.nn.registry import register_mixer

__all__ = ["InfiniAttentionMixer"]


@register_mixer("infini_attention")
class InfiniAttentionMixer(MixerBase):
    """``y = W_o(infini_attention(x W_q, x W_k, x W_v, beta))`` with segments of ``segment`` tokens
    (default 8) and the linear (``delta=False``) or delta memory update. ``rope`` (default True): RoPE on
    the local attention's queries and keys by the position inside the segment (the memory reads unrotated
    ones). State: memory ``M, z`` and the current segment's keys/values (bounded by ``segment``).

    ``conv_size`` (default 0: none, the paper's block): short causal convolutions with SiLU (:class:`ShortConv`,
    as DeltaNet's and Titans') on ``q`` and ``k`` after their projections, so a key can hold the tokens before
    it; their last inputs join the state as ``state["conv"] = [q, k]``. Without them the compressive memory
    can bind a key to the token after it only through the first layer's segment attention: on the quick MQAR
    task that stayed at chance (``docs/memory.md``, "Infini-attention on MQAR").

    Example::

        >>> mixer = InfiniAttentionMixer(16, 2, segment=4).eval()
        >>> x = torch.randn(1, 10, 16)
        >>> y, st = mixer(x[:, :9])
        >>> torch.allclose(mixer(x[:, 9:], st)[0], mixer(x)[0][:, 9:], atol=1e-5)
        True
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "its segments and their compressive memory would have to line up with the shard boundaries and "
        "the memory pass from rank to rank; not implemented"
    )

    def __init__(
        self, dim: int, heads: int, segment: int = 8, delta: bool = False, rope: bool = True, conv_size: int = 0
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.segment, self.delta = segment, delta
        self.rope = RotaryEmbedding(self.head_dim) if rope else None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = nn.Parameter(torch.zeros(heads))
        self.conv_size = check_int("conv_size", conv_size, 0)
        self.q_conv, self.k_conv = (ShortConv(dim, conv_size), ShortConv(dim, conv_size)) if conv_size else (None, None)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, H, D = x.shape[0], x.shape[1], self.heads, self.head_dim
        x = zero_invalid(x, valid)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv = None
        if self.conv_size:
            if state is not None:
                if not isinstance(state, dict) or "conv" not in state:
                    raise ValueError(
                        f"state must be the dict a previous call of this layer returned (with a 'conv' entry for "
                        f"conv_size={self.conv_size}), got {type(state).__name__}"
                    )
                conv, state = state["conv"], {key: val for key, val in state.items() if key != "conv"}
            q, cq = self.q_conv(q, None if conv is None else conv[0], valid)
            k, ck = self.k_conv(k, None if conv is None else conv[1], valid)
            conv = [cq, ck]
        o, state = infini_attention(
            q.view(B, T, H, D),
            k.view(B, T, H, D),
            v.view(B, T, H, D),
            self.gate,
            segment=self.segment,
            delta=self.delta,
            initial_state=state,
            output_final_state=True,
            valid=valid,
            rope=self.rope,
        )
        if conv is not None:
            state["conv"] = conv
        return self.o_proj(o.reshape(B, T, -1)), state
