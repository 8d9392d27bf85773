"""Recurrent memory tokens (Bulatov, Kuratov, Burtsev, "Recurrent Memory Transformer", 2022), as one
attention layer with segment-level recurrence.

The stream is cut into segments of ``N`` tokens. ``m`` memory vectors ``Mem_{s-1} [m, dim]`` are read
by every token of segment ``s`` (they sit in front of the segment as extra keys and values) and are
rewritten at the segment's end by ``m`` write tokens that attend to the whole ``[memory | segment]``::

    o_t  = W_o softmax(q_t [K_mem | K_{s,<=t}]^T * scale) [V_mem | V_{s,<=t}]     (read, causal)
    w    = W_o softmax(q(Mem_{s-1} + P_write) [K_mem | K_s]^T * scale) [V_mem | V_s]   (write tokens)
    Mem_s = RMSNorm(Mem_{s-1} + w)                                                   (recurrence)

with ``K = x W_k``, ``V = x W_v`` (the memory projected the same way), a start memory ``Mem_0`` and a
learned write-position embedding ``P_write``. ``Mem_0`` is zero by default (``start_memory="zeros"``; the
paper learns it, ``"learned"``): with a learned one the quick MQAR task stayed near chance in 2000 steps
(3 seeds), with zeros it is learned (docs/memory.md, "The RMTs' start memory"). Training backpropagates
through at most ``bptt_segments`` segments (the memory is detached after every ``bptt_segments``-th segment of a call;
``None``: through all). :meth:`RecurrentMemoryAttention.forward` runs segment by segment with
:func:`effattn.exact.attention` when the call starts at a segment boundary without padding, otherwise
token by token with a buffer of the current segment (per-row fill counts); both give the same result.
State (bounded): ``mem [B, m, dim]``, buffers ``k, v [B, N, H, D]`` and ``count [B]``.

Positions (``rope=True``, the default): RMT's own layout, ``[memory | segment | write tokens]`` as one
sequence, with RoPE (:class:`effattn.exact.RotaryEmbedding`) at those positions: the ``m`` memory keys at
``0 .. m-1``, the segment's token ``i`` (query and key) at ``m + i``, the write queries at ``m + N + j``.
Attention never leaves ``[memory | segment]``, so one attention call per segment (and per write) does it.
The buffers hold rotated keys. ``rope=False``: no positions (the formulas above).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn._checks import check_positive_int
from effattn.exact import RotaryEmbedding, attention

__all__ = ["RecurrentMemoryAttention"]


START_MEMORIES = ("learned", "zeros")


def set_start_memory(module: nn.Module, init: torch.Tensor, start_memory: str) -> None:
    """Give an RMT ``module`` its start memory ``Mem_0`` as ``module.memory_init``: ``"learned"`` (the paper's),
    a parameter starting at ``init``; ``"zeros"``, a zero buffer (not saved, not learned). ``init`` is drawn
    either way by the caller, so the other weights draw the same numbers."""
    if start_memory not in START_MEMORIES:
        raise ValueError(f"start_memory must be one of {START_MEMORIES}, got {start_memory!r}")
    module.start_memory = start_memory
    if start_memory == "learned":
        module.memory_init = nn.Parameter(init)
    else:
        module.register_buffer("memory_init", torch.zeros_like(init), persistent=False)


class RecurrentMemoryAttention(nn.Module):
    """One RMT attention layer on ``[B, T, dim]`` (module docstring); ``forward(x, state=None,
    valid=None) -> (y, state)``; invalid tokens are skipped (no write, zero output).

    Example::

        >>> layer = RecurrentMemoryAttention(16, 2, num_memory=2, segment=4).eval()
        >>> x = torch.randn(1, 10, 16)
        >>> y, st = layer(x[:, :9])
        >>> y10, _ = layer(x[:, 9:], st)
        >>> torch.allclose(y10, layer(x)[0][:, 9:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        num_memory: int = 4,
        segment: int = 16,
        bptt_segments: int | None = None,
        rope: bool = True,
        start_memory: str = "zeros",
    ):
        super().__init__()
        check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        check_positive_int("num_memory", num_memory)
        check_positive_int("segment", segment)
        check_positive_int("bptt_segments", bptt_segments, allow_none=True)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.num_memory, self.segment, self.bptt_segments = num_memory, segment, bptt_segments
        self.scale = 1 / math.sqrt(self.head_dim)
        self.rope = RotaryEmbedding(self.head_dim) if rope else None
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        set_start_memory(self, torch.randn(num_memory, dim) / math.sqrt(dim), start_memory)
        self.write_pos = nn.Parameter(torch.randn(num_memory, dim) / math.sqrt(dim))
        self.mem_norm = nn.RMSNorm(dim, eps=1e-5)

    def _heads(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim)

    def _rot(self, x, pos):
        """``x [B, n, H, D]`` rotated at ``pos`` (``[n]`` or ``[B, n]``) of the layout; unchanged without RoPE."""
        return x if self.rope is None else self.rope.apply(x, pos)

    def _memory_kv(self, mem):
        """Keys (at positions ``0 .. m-1``) and values of the memory tokens ``mem [B, m, dim]``."""
        km = self._heads(self.k_proj(mem))
        return self._rot(km, torch.arange(self.num_memory, device=mem.device)), self._heads(self.v_proj(mem))

    def _write(self, mem, kb, vb):
        """New memory from ``mem [B, m, dim]`` and a full segment's keys and values ``[B, N, H, D]``."""
        m = self.num_memory
        qm = self._heads(self.q_proj(mem + self.write_pos))
        qm = self._rot(qm, m + self.segment + torch.arange(m, device=mem.device))
        km, vm = self._memory_kv(mem)
        w = attention(qm, torch.cat([km, kb], 1), torch.cat([vm, vb], 1), scale=self.scale)
        return self.mem_norm(mem + self.o_proj(w.flatten(2)))

    def _empty(self, B, device):
        z = torch.zeros(B, self.segment, self.heads, self.head_dim, device=device)
        mem = self.memory_init.float().expand(B, -1, -1)
        return dict(mem=mem, k=z, v=z.clone(), count=torch.zeros(B, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor, state=None, valid: torch.Tensor | None = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be [batch, seq, dim={self.dim}], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        B, T, _ = x.shape
        st = self._empty(B, x.device) if state is None else dict(state)
        q, k, v = (self._heads(p(x)).float() for p in (self.q_proj, self.k_proj, self.v_proj))
        if valid is None and not bool((st["count"] != 0).any()):
            o, st = self._segments(q, k, v, st)
        else:
            o, st = self._tokens(q, k, v, st, valid)
        return self.o_proj(o.flatten(2).to(x.dtype)), st

    def _maybe_detach(self, mem, seg):
        if self.training and self.bptt_segments is not None and seg % self.bptt_segments == 0:
            return mem.detach()
        return mem

    def _segments(self, q, k, v, st):
        B, T = q.shape[:2]
        N = self.segment
        mem, seg = st["mem"], 0
        outs = []
        pos = self.num_memory + torch.arange(T, device=q.device) % N
        q, k = self._rot(q, pos), self._rot(k, pos)
        for s0 in range(0, T, N):
            s1 = min(T, s0 + N)
            km, vm = self._memory_kv(mem)
            ks, vs = torch.cat([km, k[:, s0:s1]], 1), torch.cat([vm, v[:, s0:s1]], 1)
            outs.append(attention(q[:, s0:s1], ks, vs, causal=True, scale=self.scale))
            if s1 - s0 == N:
                mem = self._maybe_detach(self._write(mem, k[:, s0:s1], v[:, s0:s1]), seg + 1)
                seg += 1
        n_left = T % N
        kb = torch.zeros(B, N, self.heads, self.head_dim, device=q.device)
        vb = torch.zeros_like(kb)
        if n_left:
            kb = torch.cat([k[:, T - n_left :], kb[:, n_left:]], 1)
            vb = torch.cat([v[:, T - n_left :], vb[:, n_left:]], 1)
        count = torch.full((B,), n_left, dtype=torch.long, device=q.device)
        o = torch.cat(outs, 1) if outs else q.new_zeros(B, 0, self.heads, self.head_dim)
        return o, dict(mem=mem, k=kb, v=vb, count=count)

    def _tokens(self, q, k, v, st, valid):
        B, T = q.shape[:2]
        N = self.segment
        mem, kb, vb, cnt = st["mem"], st["k"], st["v"], st["count"]
        slots = torch.arange(N, device=q.device)
        outs = []
        for t in range(T):
            ok = torch.ones(B, dtype=torch.bool, device=q.device) if valid is None else valid[:, t]
            here = (slots[None] == cnt[:, None]) & ok[:, None]
            pos = (self.num_memory + cnt)[
                :, None
            ]  # the token's place in the layout: after the memory, at its fill count
            kt, qt = self._rot(k[:, t, None], pos), self._rot(q[:, t, None], pos)[:, 0]
            kb = torch.where(here[..., None, None], kt, kb)
            vb = torch.where(here[..., None, None], v[:, t, None], vb)
            km, vm = (z.float() for z in self._memory_kv(mem))
            s_mem = torch.einsum("bhd,bmhd->bhm", qt, km)
            s_seg = torch.einsum("bhd,bnhd->bhn", qt, kb).masked_fill(
                ~(slots[None] <= cnt[:, None])[:, None], float("-inf")
            )
            p = torch.softmax(torch.cat([s_mem, s_seg], -1) * self.scale, -1)
            o = torch.einsum("bhm,bmhd->bhd", p[..., : self.num_memory], vm) + torch.einsum(
                "bhn,bnhd->bhd", p[..., self.num_memory :], vb
            )
            outs.append(torch.where(ok[:, None, None], o, torch.zeros_like(o)))
            full = ok & (cnt == N - 1)
            if bool(full.any()):
                mem = torch.where(full[:, None, None], self._write(mem, kb, vb), mem)
            cnt = torch.where(ok, (cnt + 1) % N, cnt)
        o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, self.heads, self.head_dim)
        return o, dict(mem=mem, k=kb, v=vb, count=cnt)
