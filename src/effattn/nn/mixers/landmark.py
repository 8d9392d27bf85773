"""Landmark attention as a mixer (``"landmark"``): projections, RoPE and the per-block landmark key around
:func:`effattn.sparse.step_landmark_attention` (one function for prefill, chunks and decoding)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_positive_int
from effattn.nn.mixers._base import MixerBase, check_heads, check_x_and_valid, merge_heads, split_heads
from effattn.nn.registry import register_mixer
from effattn.nn.rope import RotaryEmbedding
from effattn.sparse import LandmarkDecodeState, step_landmark_attention

__all__ = ["LandmarkMixer"]


@register_mixer("landmark")
class LandmarkMixer(MixerBase):
    """Causal landmark attention (Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context
    Length for Transformers", 2023) on :func:`effattn.sparse.landmark_attention`.

    ``q, k, v = W x`` (RoPE on the first ``rope_fraction`` of each head's channels, positions counted from
    each sequence's first real token). The sequence is cut into blocks of ``block`` tokens; when block
    ``b`` completes it gets a landmark key

        x_b = e + sum_{j in b} softmax_j(u . x_j / sqrt(dim)) x_j ;   l_b = RoPE(W_k x_b, last position of b)

    and a query reads earlier blocks only through the grouped softmax: its own block's tokens and the
    landmarks (logits ``q . l_b / sqrt(D) + c_h``) share one softmax, a landmark's share is spread over its
    block by the block's own softmax. ``c_h`` is a learned offset per head, ``log(block)`` at the start,
    so that with equal scores a landmark weighs as much as its block's tokens would in a plain softmax
    (the paper has no offset: without one a landmark starts ``block`` times lighter than its block, and
    on the passkey task of ``docs/results/landmark`` the lookup formed much more slowly).
    Training (``model.train()``) reads every earlier block, as the paper trains; evaluation reads the
    ``top_k`` blocks with the largest landmark scores per query and head (retrieval), so context past
    the training length costs ``O(top_k x block)`` keys per token to attend (plus one landmark score per
    block). ``y = W_o o``.

    Deviation, stated: in the paper a landmark is a token of the input that passes through every layer,
    so its key at a layer is made from what it gathered at the layers below. A mixer sees one layer, so
    its landmark's layer input ``x_b`` is a learned vector ``e`` plus a learned attention pool (query
    ``u``) over the block's own inputs at this layer; the sequence the model sees has no extra tokens.

    State: a list with one ``(LandmarkDecodeState, inputs of the incomplete block)`` per sequence (keys
    and values grow with the context; ``None`` for a row with no real token yet). Calls with a state or
    with left padding run row by row.

    Example::

        >>> mixer = LandmarkMixer(32, 2, block=4, top_k=1).eval()
        >>> x = torch.randn(1, 13, 32)
        >>> y, state = mixer(x[:, :12])                  # prefill: retrieval of 1 block per query
        >>> y_last, state = mixer(x[:, 12:], state)      # one decoding step
        >>> torch.allclose(y_last, mixer(x)[0][:, 12:], atol=1e-5), tuple(state[0][0].landmarks.shape)
        (True, (1, 3, 2, 16))
    """

    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "each query weighs every earlier block through that block's landmark key (and decoding retrieves "
        "the top-k blocks by content), so a rank would need every earlier rank's landmarks and then its "
        "blocks (data-dependent gathers); not implemented"
    )

    def __init__(
        self,
        dim: int,
        heads: int,
        block: int = 8,
        top_k: int = 2,
        rope: bool = True,
        rope_fraction: float = 1.0,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.block, self.top_k = check_positive_int("block", block), check_positive_int("top_k", top_k)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.landmark = nn.Parameter(torch.randn(dim) * dim**-0.5)  # e: the landmark's own input
        self.pool_query = nn.Parameter(torch.zeros(dim))  # u: zeros = a mean pool at the start
        # c_h, one offset per head on the landmark logits; log(block): at the start (equal scores) a block's
        # landmark carries the weight its block's tokens would have in a plain softmax
        self.landmark_bias = nn.Parameter(torch.full((heads,), math.log(self.block)))
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_fraction) if rope else None

    def _probe_len(self, seq_len: int) -> int:
        return seq_len

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.rope is None else self.rope.apply(x, positions)

    def landmark_keys(self, xb: torch.Tensor, first: int) -> torch.Tensor:
        """Landmark keys ``[B, m, H, D]`` of complete blocks ``xb [B, m, block, dim]``, the first starting
        at position ``first``."""
        w = torch.softmax(xb @ self.pool_query / math.sqrt(self.dim), -1)  # [B, m, block]
        xl = self.landmark + torch.einsum("bmj,bmjd->bmd", w, xb)
        kl = split_heads(F.linear(xl, self.wqkv.weight[self.dim : 2 * self.dim]), self.heads)
        last = first + self.block - 1 + self.block * torch.arange(xb.shape[1], device=xb.device)
        return self._rotate(kl, last)

    def _run(self, x: torch.Tensor, st):
        """Fresh or continued sequences of one length: ``x [b, n, dim]``, ``st`` None or ``(state, tail)``."""
        t0 = 0 if st is None else st[0].k.shape[1]
        tail = x[:, :0] if st is None else st[1]
        n = x.shape[1]
        q, k, v = (split_heads(z, self.heads) for z in self.wqkv(x).chunk(3, dim=-1))
        pos = torch.arange(t0, t0 + n, device=x.device)
        q, k = self._rotate(q, pos), self._rotate(k, pos)
        xs = torch.cat([tail.to(x.dtype), x], 1)  # inputs from the first position of t0's block
        m = xs.shape[1] // self.block
        lms = None
        if m:
            xb = xs[:, : m * self.block].reshape(x.shape[0], m, self.block, self.dim)
            lms = self.landmark_keys(xb, t0 - tail.shape[1])
        top_k = None if self.training else self.top_k
        o, sparse_state = step_landmark_attention(
            q,
            k,
            v,
            None if st is None else st[0],
            block=self.block,
            top_k=top_k,
            landmarks=lms,
            landmark_bias=self.landmark_bias,
        )
        return o, (sparse_state, xs[:, m * self.block :])

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        B, T, _ = x.shape
        if state is not None and (not isinstance(state, list) or len(state) != B):
            raise ValueError(f"state must be a list of {B} per-sequence states")
        if state is None and valid is None:  # fresh sequences of one length: one batched call
            if T == 0:
                return self.o_proj(x), [None] * B
            o, (s, tail) = self._run(x, None)
            rows = [
                (LandmarkDecodeState(s.k[b : b + 1], s.v[b : b + 1], s.landmarks[b : b + 1]), tail[b : b + 1])
                for b in range(B)
            ]
            return self.o_proj(merge_heads(o)), rows
        out = x.new_zeros(B, T, self.heads, self.head_dim)
        new_state = []
        for b in range(B):
            lo = 0
            if valid is not None:
                lo = T - int(valid[b].sum())
                if not bool(valid[b, lo:].all()):
                    raise ValueError("landmark supports left padding only: valid must be False then True per row")
            st = None if state is None else state[b]
            if lo < T:
                o, st = self._run(x[b : b + 1, lo:], st)
                out[b, lo:] = o[0]
            new_state.append(st)
        return self.o_proj(merge_heads(out)), new_state
