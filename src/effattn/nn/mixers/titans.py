"""Titans as mixers (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2025):
memory as a layer (``titans_mal``), memory as a gate (``titans_mag``) and memory as context
(``titans_mac``), each around :class:`effattn.memory.NeuralMemory` (the neural long-term memory)."""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.memory import NeuralMemory
from effattn.nn.attention import Attention
from effattn.nn.mixers._base import MixerBase, check_heads, check_state_size_args, check_x_and_valid, state_nbytes
from effattn.nn.registry import register_mixer

__all__ = ["TitansMAC", "TitansMAG", "TitansMAL", "segment_attention"]


def segment_attention(q, streams_k, streams_v, prefix_k, prefix_v, segment: int, state=None, valid=None):
    """Causal attention inside segments of ``segment`` tokens over ``[prefix | stream_1 | ... ]``: the
    query at segment position ``i`` sees every prefix key (persistent tokens) and, in each stream, the
    keys of its segment at positions ``<= i``. ``q [B, T, H, D]``, each stream ``[B, T, H, D]``, prefix
    ``[P, H, D]``. State ``dict(k, v [B, S*segment, H, D], count [B])`` continues a segment; invalid
    tokens are skipped (zero output). Returns ``(o [B, T, H, D], state)``.

    Example::

        >>> q = torch.randn(1, 5, 1, 4); p = torch.randn(2, 1, 4)
        >>> o, st = segment_attention(q, [q], [q], p, p, 3)
        >>> o2, _ = segment_attention(q[:, 4:], [q[:, 4:]], [q[:, 4:]], p, p, 3, state=segment_attention(
        ...     q[:, :4], [q[:, :4]], [q[:, :4]], p, p, 3)[1])
        >>> torch.allclose(o2, o[:, 4:], atol=1e-6)
        True
    """
    B, T, H, D = q.shape
    S, N, P = len(streams_k), segment, prefix_k.shape[0]
    scale = 1 / math.sqrt(D)
    pk, pv = prefix_k.float().expand(B, P, H, D), prefix_v.float().expand(B, P, H, D)
    if state is None:
        z = q.new_zeros(B, S * N, H, D, dtype=torch.float32)
        state = dict(k=z, v=z.clone(), count=torch.zeros(B, dtype=torch.long, device=q.device))
    kb, vb, cnt = state["k"], state["v"], state["count"]
    slot = torch.arange(S * N, device=q.device) % N  # segment position of each buffer slot
    if valid is None and not bool((cnt != 0).any()):  # segment-parallel
        n_seg = -(-T // N)
        pad = n_seg * N - T

        def seg(x):
            return torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)).reshape(B, n_seg, N, H, D)

        ks = torch.cat([pk[:, None].expand(B, n_seg, P, H, D)] + [seg(k) for k in streams_k], 2)
        vs = torch.cat([pv[:, None].expand(B, n_seg, P, H, D)] + [seg(v) for v in streams_v], 2)
        s = torch.einsum("bnihd,bnjhd->bnhij", seg(q), ks) * scale
        see = torch.cat(
            [
                torch.ones(N, P, dtype=torch.bool, device=q.device),
                slot[None, :] <= torch.arange(N, device=q.device)[:, None],
            ],
            1,
        )
        o = torch.einsum("bnhij,bnjhd->bnihd", torch.softmax(s.masked_fill(~see, float("-inf")), -1), vs)
        o = o.reshape(B, n_seg * N, H, D)[:, :T]
        n_left = T - (n_seg - 1) * N if pad else 0
        kb, vb = ks[:, -1, P:].clone(), vs[:, -1, P:].clone()
        if not n_left:
            kb, vb = torch.zeros_like(kb), torch.zeros_like(vb)
        return o.to(q.dtype), dict(k=kb, v=vb, count=torch.full((B,), n_left, dtype=torch.long, device=q.device))
    outs = []
    for t in range(T):
        ok = torch.ones(B, dtype=torch.bool, device=q.device) if valid is None else valid[:, t]
        here = ((slot[None] == cnt[:, None]) & ok[:, None])[..., None, None]
        kt = torch.cat([k[:, t, None].float().expand(B, N, H, D) for k in streams_k], 1)
        vt = torch.cat([v[:, t, None].float().expand(B, N, H, D) for v in streams_v], 1)
        kb, vb = torch.where(here, kt, kb), torch.where(here, vt, vb)
        see = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), slot[None] <= cnt[:, None]], 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, t].float(), torch.cat([pk, kb], 1)) * scale
        o = torch.einsum(
            "bhj,bjhd->bhd", torch.softmax(s.masked_fill(~see[:, None], float("-inf")), -1), torch.cat([pv, vb], 1)
        )
        outs.append(torch.where(ok[:, None, None], o, torch.zeros_like(o)))
        cnt = torch.where(ok, (cnt + 1) % N, cnt)
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, D, dtype=torch.float32)
    return o.to(q.dtype), dict(k=kb, v=vb, count=cnt)


class _TitansBase(MixerBase):
    # chunk_size (default 16): the memory's chunk grid (NeuralMemory): multi-token calls run the paper's
    # chunked form, decoding steps continue the same grid token by token; chunk_size=1 the exact token rule
    # the LM raises with this under effattn.dist.sequence_parallel (docs/dist.md lists it)
    sequence_parallel_unsupported = (
        "its memory is a small network trained by gradient steps on every token (test-time training: "
        "Titans, Miras, ATLAS); that update is not a linear map of a state, so LASP-2 does not apply, and "
        "a sequential pass of the memory's weights from rank to rank is not implemented"
    )

    def __init__(self, dim: int, heads: int, depth: int = 2, chunk_size: int = 16, **memory_kw):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, check_heads(dim, heads)
        self.memory = NeuralMemory(dim, heads, depth=depth, chunk_size=chunk_size, **memory_kw)
        self.num_persistent = 0

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of state at context ``seq_len``: the memory's (weights and momentum) plus, where the mixer
        has a sliding-window attention, its KV cache after the persistent tokens and ``seq_len`` tokens."""
        attn = getattr(self, "attn", None)
        if attn is None:  # MAC: its segment buffers are allocated whole, a probe measures them
            return super().state_size(batch, seq_len)
        check_state_size_args(batch, seq_len)
        p = next(self.parameters())
        with torch.no_grad():
            _, ms = self.memory(torch.zeros(batch, 1, self.dim, device=p.device, dtype=p.dtype))
        return state_nbytes(ms) + attn.state_size(batch, seq_len + self.num_persistent)

    def _init_persistent(self, num_persistent: int) -> None:
        check_int("num_persistent", num_persistent, minimum=0)
        self.num_persistent = num_persistent
        # learned, input-independent tokens of the model's width (Titans section 3.3), prepended to the sequence
        self.persistent = nn.Parameter(torch.randn(num_persistent, self.dim) * 0.02) if num_persistent else None

    def _start(self, x, state):
        """``(memory state, cache)`` to continue from: the given state or, at a sequence's start (``state``
        None), the state the persistent tokens leave (none: ``(None, None)``)."""
        if state is not None:
            return state
        if self.persistent is None:
            return None, None
        p = self.persistent.to(x.dtype).expand(x.shape[0], -1, -1)
        _, state = self._layer(p, None, None, None)  # their outputs are dropped: they open every sequence
        return state


@register_mixer("titans_mal")
class TitansMAL(_TitansBase):
    """Titans memory as a layer (MAL): ``m = NeuralMemory(x)``, ``y = m + SWA(x + m)`` with causal
    sliding-window attention of ``window`` keys. State ``(memory state, window KV cache)``.
    ``num_persistent`` learned tokens (paper section 3.3) open every sequence: the memory and the window
    read them before the first token (their outputs are dropped), so the memory starts from a learned state.

    Example::

        >>> mixer = TitansMAL(16, 2, window=4).eval()
        >>> x = torch.randn(1, 7, 16)
        >>> y, st = mixer(x[:, :6])
        >>> torch.allclose(mixer(x[:, 6:], st)[0], mixer(x)[0][:, 6:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int = 16,
        depth: int = 2,
        chunk_size: int = 16,
        num_persistent: int = 0,
        **memory_kw,
    ):
        super().__init__(dim, heads, depth, chunk_size, **memory_kw)
        self.attn = Attention(dim, heads, window=window)
        self._init_persistent(num_persistent)

    def _layer(self, x, ms, cache, valid):
        m, ms = self.memory(x, ms, valid)
        a, cache = self.attn(x + m, cache, valid)
        return m + a, (ms, cache)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self._layer(x, *self._start(x, state), valid)


@register_mixer("titans_mag")
class TitansMAG(_TitansBase):
    """Titans memory as a gate (MAG): sliding-window attention ``a = SWA(x)`` gated by the memory's
    output, ``y = W_o(a * sigmoid(m))`` with ``m = NeuralMemory(x)``. State ``(memory state, KV cache)``.
    ``num_persistent`` learned tokens open every sequence, as in :class:`TitansMAL`.

    Example::

        >>> mixer = TitansMAG(16, 2, window=4, num_persistent=2).eval()
        >>> x = torch.randn(1, 7, 16)
        >>> y, st = mixer(x[:, :6])
        >>> torch.allclose(mixer(x[:, 6:], st)[0], mixer(x)[0][:, 6:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int = 16,
        depth: int = 2,
        chunk_size: int = 16,
        num_persistent: int = 0,
        **memory_kw,
    ):
        super().__init__(dim, heads, depth, chunk_size, **memory_kw)
        self.attn = Attention(dim, heads, window=window)
        self.out = nn.Linear(dim, dim, bias=False)
        self._init_persistent(num_persistent)

    def _layer(self, x, ms, cache, valid):
        m, ms = self.memory(x, ms, valid)
        a, cache = self.attn(x, cache, valid)
        return self.out(a * torch.sigmoid(m)), (ms, cache)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self._layer(x, *self._start(x, state), valid)


@register_mixer("titans_mac")
class TitansMAC(_TitansBase):
    """Titans memory as context (MAC): per segment of ``segment`` tokens, causal attention over
    ``[persistent tokens | memory retrievals | segment]`` (:func:`segment_attention`): the query of
    token ``t`` sees ``num_persistent`` learned key/value pairs, the retrievals ``h_j = M_j(q_j)`` and
    the tokens ``x_j`` of its segment with ``j <= t``; ``y = W_o(o)``. State ``(memory state,
    segment buffers)``.

    Example::

        >>> mixer = TitansMAC(16, 2, segment=4).eval()
        >>> x = torch.randn(1, 7, 16)
        >>> y, st = mixer(x[:, :6])
        >>> torch.allclose(mixer(x[:, 6:], st)[0], mixer(x)[0][:, 6:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        segment: int = 8,
        num_persistent: int = 4,
        depth: int = 2,
        chunk_size: int = 16,
        **memory_kw,
    ):
        super().__init__(dim, heads, depth, chunk_size, **memory_kw)
        check_positive_int("segment", segment)
        self.segment = segment
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.persistent_k = nn.Parameter(torch.randn(num_persistent, heads, self.head_dim) / math.sqrt(self.head_dim))
        self.persistent_v = nn.Parameter(torch.randn(num_persistent, heads, self.head_dim) / math.sqrt(self.head_dim))

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        ms, ss = (None, None) if state is None else state
        m, ms = self.memory(x, ms, valid)
        B, T, H, D = x.shape[0], x.shape[1], self.heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        kx, vx = self.k_proj(x).view(B, T, H, D), self.v_proj(x).view(B, T, H, D)
        km, vm = self.k_proj(m).view(B, T, H, D), self.v_proj(m).view(B, T, H, D)
        o, ss = segment_attention(q, [km, kx], [vm, vx], self.persistent_k, self.persistent_v, self.segment, ss, valid)
        return self.o_proj(o.reshape(B, T, -1)), (ms, ss)
