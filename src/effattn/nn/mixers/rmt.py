"""Recurrent memory tokens as a mixer (Bulatov, Kuratov, Burtsev, "Recurrent Memory Transformer", 2022):
:class:`effattn.memory.RecurrentMemoryAttention` (memory tokens read by every token of a segment and
rewritten at its end; segment-level recurrence, backprop through ``bptt_segments`` segments)."""

from __future__ import annotations

from effattn.memory import RecurrentMemoryAttention
from effattn.nn.mixers._base import MixerBase, check_heads, check_x_and_valid
from effattn.nn.registry import register_mixer

__all__ = ["RMTMixer"]


@register_mixer("rmt")
class RMTMixer(MixerBase):
    """RMT layer with ``num_memory`` memory tokens (default 4) and segments of ``segment`` tokens
    (default 8); ``rope`` (default True): RoPE at RMT's layout positions (memory keys ``0 .. m-1``, the
    segment's tokens after them, the write queries last); ``start_memory``: ``"zeros"`` (default: the first
    segment reads a zero memory) or ``"learned"`` (the paper's). State: the memory tokens and the current
    segment's keys/values (bounded).

    Example::

        >>> mixer = RMTMixer(16, 2, segment=4).eval()
        >>> x = torch.randn(1, 10, 16)
        >>> y, st = mixer(x[:, :9])
        >>> torch.allclose(mixer(x[:, 9:], st)[0], mixer(x)[0][:, 9:], atol=1e-5)
        True
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "each segment's memory tokens are the previous segment's attention output, a nonlinear map "
        "carried through the whole sequence segment by segment: the shards could only run one after the "
        "other, and that pass is not implemented"
    )

    def __init__(
        self,
        dim: int,
        heads: int,
        num_memory: int = 4,
        segment: int = 8,
        bptt_segments: int | None = None,
        rope: bool = True,
        start_memory: str = "zeros",
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.layer = RecurrentMemoryAttention(
            dim,
            heads,
            num_memory=num_memory,
            segment=segment,
            bptt_segments=bptt_segments,
            rope=rope,
            start_memory=start_memory,
        )

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self.layer(x, state, valid)
