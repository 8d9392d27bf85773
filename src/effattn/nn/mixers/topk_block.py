"""Causal top-k block attention (MoBA-style) as a mixer (``"topk_block"``): projections and RoPE
around :func:`effattn.sparse.topk_block_attention` (prefill) and
:func:`effattn.sparse.step_topk_block_attention` (decoding)."""

from __future__ import annotations

import torch
from torch import nn

from effattn._checks import check_positive_int
from effattn.exact import attention
from effattn.nn.mixers._base import MixerBase, check_heads, check_x_and_valid, merge_heads, split_heads
from effattn.nn.registry import register_mixer
from effattn.nn.rope import RotaryEmbedding
from effattn.sparse import (
    TopKBlockDecodeState,
    step_topk_block_attention,
    topk_block_attention,
    topk_block_decode_state,
)

__all__ = ["TopKBlockMixer"]


@register_mixer("topk_block")
class TopKBlockMixer(MixerBase):
    """Causal top-k block attention, MoBA-style (Lu et al., "MoBA: Mixture of Block Attention for
    Long-Context LLMs", 2025), on :func:`effattn.sparse.topk_block_attention`.

    Keys are cut into blocks of ``block`` tokens (counted from each sequence's first real token);
    a query in block ``i`` attends (exact softmax, RoPE on q/k) to its own block causally and to the
    ``top_k`` earlier complete blocks ``j`` with the largest ``p_i . mean(k_block_j)``, where ``p_i``
    is the mean of the ``block`` queries ending at block ``i``'s first position (no look-ahead);
    ``y = W_o o``. ``representative="max"`` or ``"last"`` scores blocks by their max-pooled or last key
    instead (``"last"``: the old stand-in for Landmark attention, now the ``"landmark"`` mixer);
    ``rope_fraction``: RoPE on that fraction of each head's channels. Prefill runs the sparse engine; decoding runs
    :func:`effattn.sparse.step_topk_block_attention` (the pooled scores of the complete blocks for the
    one new query, attention to the gathered keys). State: a list with one
    :class:`effattn.sparse.TopKBlockDecodeState` per sequence (its keys and values grow with the
    context; ``None`` for a row with no real token yet). Rows are processed one by one (each row's
    blocks start at its own first real token), so this layer is a correct reference, not a fast
    batched decoder.

    Example::

        >>> mixer = TopKBlockMixer(32, 2, block=4, top_k=1).eval()
        >>> x = torch.randn(1, 13, 32)
        >>> y, state = mixer(x[:, :12])                  # prefill (sparse engine)
        >>> y_last, state = mixer(x[:, 12:], state)      # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 12:], atol=1e-5), tuple(state[0].k.shape)
        (True, (1, 13, 2, 16))
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "each query picks its top-k key blocks by content among all earlier blocks, so a rank would need "
        "every earlier rank's block summaries and then the selected blocks (data-dependent gathers); not "
        "implemented"
    )

    def __init__(
        self,
        dim: int,
        heads: int,
        block: int = 64,
        top_k: int = 4,
        rope: bool = True,
        rope_base: float = 10000.0,
        representative: str = "mean",
        rope_fraction: float = 1.0,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.block, self.top_k = check_positive_int("block", block), check_positive_int("top_k", top_k)
        self.representative = representative  # "mean" (MoBA), "max", "last" (the old Landmark stand-in)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_fraction) if rope else None

    def _probe_len(self, seq_len: int) -> int:
        return seq_len

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rope is None:
            return x
        return self.rope.apply(x, torch.arange(start, start + x.shape[1], device=x.device))

    def _prefill(self, q, k, v):
        """A fresh sequence ``[1, n, H, D]``: the sparse engine (dense causal while there is one block)."""
        n = q.shape[1]
        n_blocks = -(-n // self.block)
        top_k = min(self.top_k, n_blocks - 1)
        if top_k == 0:
            return attention(q, k, v, causal=True)
        return topk_block_attention(
            q, k, v, block=self.block, top_k=top_k, causal=True, representative=self.representative
        )

    def _row(self, q, k, v, st: TopKBlockDecodeState | None):
        """One sequence: new tokens ``[1, n, H, D]`` and its state (or None)."""
        n = q.shape[1]
        t0 = 0 if st is None else st.k.shape[1]
        q, k = self._rotate(q, t0), self._rotate(k, t0)
        if st is None:
            if n == 0:
                return q.new_zeros(q.shape), None
            st = topk_block_decode_state(q, k, v, block=self.block, representative=self.representative)
            return self._prefill(q, k, v), st
        outs = []
        for j in range(n):
            o, st = step_topk_block_attention(
                q[:, j : j + 1],
                k[:, j : j + 1],
                v[:, j : j + 1],
                st,
                block=self.block,
                top_k=self.top_k,
                representative=self.representative,
            )
            outs.append(o)
        return (torch.cat(outs, dim=1) if outs else q.new_zeros(q.shape)), st

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, _ = x.shape
        if state is not None and (not isinstance(state, list) or len(state) != B):
            raise ValueError(f"state must be a list of {B} per-sequence states")
        q, k, v = (split_heads(t, self.heads) for t in self.wqkv(x).chunk(3, dim=-1))
        out = x.new_zeros(B, T, self.heads, self.head_dim)
        new_state = []
        for b in range(B):
            lo = 0
            if valid is not None:
                n_valid = int(valid[b].sum())
                lo = T - n_valid
                if not bool(valid[b, lo:].all()):
                    raise ValueError("topk_block supports left padding only: valid must be False then True per row")
            st = None if state is None else state[b]
            o, st = self._row(q[b : b + 1, lo:], k[b : b + 1, lo:], v[b : b + 1, lo:], st)
            out[b, lo:] = o[0]
            new_state.append(st)
        return self.o_proj(merge_heads(out)), new_state
