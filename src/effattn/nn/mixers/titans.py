"""Titans as mixers (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2025):
memory as a layer (``titans_mal``), memory as a gate (``titans_mag``) and memory as context
(``titans_mac``), each around :class:`effattn.memory.NeuralMemory` (the neural long-term memory)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.exact import RotaryEmbedding, attention, merge_attention_states
from effattn.kv import LayerCache
from effattn.memory import NeuralMemory
from effattn.nn.attention import Attention, cached_attention, check_mixer_input, layer_cache
from effattn.nn.mixers._base import MixerBase, check_heads, check_state_size_args, check_x_and_valid, state_nbytes
from effattn.nn.registry import register_mixer

__all__ = ["PersistentWindowAttention", "TitansMAC", "TitansMAG", "TitansMAL", "segment_attention"]


def segment_attention(q, streams_k, streams_v, prefix_k, prefix_v, segment: int, state=None, valid=None, rope=None):
    """Causal attention inside segments of ``segment`` tokens over ``[prefix | stream_1 | ... ]``: the
    query at segment position ``i`` sees every prefix key (persistent tokens) and, in each stream, the
    keys of its segment at positions ``<= i``. ``q [B, T, H, D]``, each stream ``[B, T, H, D]``, prefix
    ``[P, H, D]``. State ``dict(k, v [B, S*segment, H, D], count [B])`` continues a segment; invalid
    tokens are skipped (zero output). Returns ``(o [B, T, H, D], state)``.

    ``rope`` (an :class:`effattn.exact.RotaryEmbedding`, or None: no positions) rotates the query and every
    stream's key of a token by its position inside its segment (``0 .. segment-1``; attention never leaves a
    segment, so these relative positions are the sequence's); the buffers hold rotated keys. Prefix keys
    stay unrotated and meet the unrotated query (relative distance 0, as in
    :class:`PersistentWindowAttention`). Computes in float32 (float64 for float64 ``q``).

    Example::

        >>> q = torch.randn(1, 5, 1, 4); p = torch.randn(2, 1, 4)
        >>> o, st = segment_attention(q, [q], [q], p, p, 3)
        >>> o2, _ = segment_attention(q[:, 4:], [q[:, 4:]], [q[:, 4:]], p, p, 3, state=segment_attention(
        ...     q[:, :4], [q[:, :4]], [q[:, :4]], p, p, 3)[1])
        >>> torch.allclose(o2, o[:, 4:], atol=1e-6)
        True
    """
    B, T, H, D = q.shape
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32  # compute dtype
    S, N, P = len(streams_k), segment, prefix_k.shape[0]
    scale = 1 / math.sqrt(D)
    pk, pv = prefix_k.to(cd).expand(B, P, H, D), prefix_v.to(cd).expand(B, P, H, D)
    if state is None:
        z = q.new_zeros(B, S * N, H, D, dtype=cd)
        state = dict(k=z, v=z.clone(), count=torch.zeros(B, dtype=torch.long, device=q.device))
    kb, vb, cnt = state["k"], state["v"], state["count"]
    slot = torch.arange(S * N, device=q.device) % N  # segment position of each buffer slot
    if valid is None and not bool((cnt != 0).any()):  # segment-parallel
        n_seg = -(-T // N)
        pad = n_seg * N - T

        def seg(x):
            return torch.nn.functional.pad(x.to(cd), (0, 0, 0, 0, 0, pad)).reshape(B, n_seg, N, H, D)

        if rope is not None:
            pos = torch.arange(T, device=q.device) % N
            qr, streams_k = rope.apply(q.to(cd), pos), [rope.apply(k.to(cd), pos) for k in streams_k]
        ks = torch.cat([pk[:, None].expand(B, n_seg, P, H, D)] + [seg(k) for k in streams_k], 2)
        vs = torch.cat([pv[:, None].expand(B, n_seg, P, H, D)] + [seg(v) for v in streams_v], 2)
        if rope is None:
            s = torch.einsum("bnihd,bnjhd->bnhij", seg(q), ks) * scale
        else:  # prefix scores with the unrotated query, segment scores with the rotated one
            s_p = torch.einsum("bnihd,bnjhd->bnhij", seg(q), ks[:, :, :P])
            s = torch.cat([s_p, torch.einsum("bnihd,bnjhd->bnhij", seg(qr), ks[:, :, P:])], -1) * scale
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
        ks_t = [k[:, t, None].to(cd) for k in streams_k]
        if rope is not None:  # the token's position in its segment is the row's fill count
            ks_t = [rope.apply(k, cnt[:, None]) for k in ks_t]
        kt = torch.cat([k.expand(B, N, H, D) for k in ks_t], 1)
        vt = torch.cat([v[:, t, None].to(cd).expand(B, N, H, D) for v in streams_v], 1)
        kb, vb = torch.where(here, kt, kb), torch.where(here, vt, vb)
        see = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), slot[None] <= cnt[:, None]], 1)
        if rope is None:
            s = torch.einsum("bhd,bjhd->bhj", q[:, t].to(cd), torch.cat([pk, kb], 1)) * scale
        else:
            qr = rope.apply(q[:, t, None].to(cd), cnt[:, None])[:, 0]
            s_p = torch.einsum("bhd,bjhd->bhj", q[:, t].to(cd), pk)
            s = torch.cat([s_p, torch.einsum("bhd,bjhd->bhj", qr, kb)], -1) * scale
        o = torch.einsum(
            "bhj,bjhd->bhd", torch.softmax(s.masked_fill(~see[:, None], float("-inf")), -1), torch.cat([pv, vb], 1)
        )
        outs.append(torch.where(ok[:, None, None], o, torch.zeros_like(o)))
        cnt = torch.where(ok, (cnt + 1) % N, cnt)
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, D, dtype=cd)
    return o.to(q.dtype), dict(k=kb, v=vb, count=cnt)


class PersistentWindowAttention(Attention):
    """Causal sliding-window attention whose queries also see ``P`` always-visible persistent keys: the
    ``SW-Attn*`` of Titans (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2025,
    sections 3.3 and 4.2-4.3), where the learned persistent tokens are a prefix every query attends to::

        o_t = softmax([q_t K_p^T, R_t q_t (R_J K_J)^T] / sqrt(d)) [V_p; V_J],   J = {t - window + 1 .. t}

    ``K_p, V_p [P, kv_heads, head_dim]`` (:meth:`persistent_kv` of the persistent tokens; the same for every
    sequence), ``R_t`` RoPE at the token's position in the sequence (counted from 0). Positions: the
    persistent keys are not rotated and meet the query unrotated, which is RoPE with each persistent key at
    the query's own position (``R_t q . R_t k = q . k``, relative distance 0), so a prefix score does not
    depend on how far into the context the query is. Computed as two attentions merged by their
    log-sum-exp (:func:`effattn.merge_attention_states`): the window over the layer's bounded cache
    (:func:`~effattn.nn.attention.cached_attention`) and the ``P`` prefix keys (no mask). Memory per
    decoding step: O(window + P). Padding (``valid``) hides padded keys as in :class:`Attention`.

    Example::

        >>> layer = PersistentWindowAttention(16, 2, window=3)
        >>> x, p = torch.randn(1, 9, 16), torch.randn(2, 16)
        >>> y, cache = layer(x, persistent=layer.persistent_kv(p))
        >>> y.shape
        torch.Size([1, 9, 16])
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__(dim, heads, window=window)

    def persistent_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[P, kv_heads, head_dim]`` of persistent tokens ``[P, dim]`` (not rotated)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must have shape [P, dim={self.dim}], got {getattr(tokens, 'shape', tokens)!r}")
        _, k, v = self._project(tokens[None], None, rotate=False)
        return k[0], v[0]

    def forward(
        self,
        x: torch.Tensor,
        state: LayerCache | None = None,
        valid: torch.Tensor | None = None,
        persistent: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """``(y [B, T, dim], cache)``; ``persistent`` the ``(K_p, V_p)`` of :meth:`persistent_kv` (None: plain
        sliding-window attention)."""
        B, T = check_mixer_input(x, self.dim, valid)
        cache = layer_cache(state, B, self.cache_pattern)
        pos = cache.next_positions(B, T, valid, x.device)
        q, k, v = self._project(x, pos, rotate=False)
        qr, kr = (q, k) if self.rope is None else (self.rope.apply(q, pos), self.rope.apply(k, pos))
        kv = cache.update(kr, v, valid=valid, q=qr)
        common = dict(softcap=self.softcap, backend=self.backend)
        if persistent is None:  # plain sliding-window attention, the same call as Attention's
            o = cached_attention(qr, kv.k, kv.v, kv, causal=True, window=self.window, **common)
        else:
            common["return_lse"] = True
            o, lse = cached_attention(qr, kv.k, kv.v, kv, causal=True, window=self.window, **common)
            pk, pv = persistent
            op, lse_p = attention(q, pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), **common)
            o, _ = merge_attention_states([o, op.to(o.dtype)], [lse, lse_p])
        cache.trim()
        return self.o_proj(o.flatten(2)), cache


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
        has a sliding-window attention (MAL, MAG), its window KV cache after ``seq_len`` tokens and the
        persistent keys and values ``[num_persistent, heads, head_dim]`` each, counted once: the state holds
        one copy for the whole batch (they are the same for every sequence)."""
        attn = getattr(self, "attn", None)
        if attn is None:  # MAC: its segment buffers are allocated whole, a probe measures them
            return super().state_size(batch, seq_len)
        check_state_size_args(batch, seq_len)
        p = next(self.parameters())
        with torch.no_grad():
            _, ms = self.memory(torch.zeros(batch, 1, self.dim, device=p.device, dtype=p.dtype))
        prefix = 2 * self.num_persistent * attn.kv_heads * attn.head_dim * p.element_size()
        return state_nbytes(ms) + attn.state_size(batch, seq_len) + prefix

    def _init_persistent(self, num_persistent: int) -> None:
        check_int("num_persistent", num_persistent, minimum=0)
        self.num_persistent = num_persistent
        # learned, input-independent tokens of the model's width (Titans section 3.3), a prefix of every sequence
        self.persistent = nn.Parameter(torch.randn(num_persistent, self.dim) * 0.02) if num_persistent else None

    def _start(self, x, state):
        """``(memory state, window cache, persistent K/V)`` to continue from: the given state or, at a
        sequence's start (``state`` None), the memory's state after it read the persistent tokens (their
        outputs are dropped) and their keys/values for the attention (:meth:`_prefix_tokens`)."""
        if state is not None:
            if not isinstance(state, tuple) or len(state) != 3:
                raise ValueError(
                    "state must be the (memory state, window cache, persistent K/V) tuple a previous call "
                    f"returned, got {type(state).__name__} of length {len(state) if isinstance(state, tuple) else '-'}"
                )
            return state
        if self.persistent is None:
            return None, None, None
        p = self.persistent.to(x.dtype)
        m, ms = self.memory(p.expand(x.shape[0], -1, -1))  # the memory reads them before the first token
        return ms, None, self.attn.persistent_kv(self._prefix_tokens(p, m[0]))


@register_mixer("titans_mal")
class TitansMAL(_TitansBase):
    """Titans memory as a layer (MAL): ``m = NeuralMemory(x)``, ``y = m + SW-Attn*(x + m)`` with causal
    sliding-window attention of ``window`` keys (:class:`PersistentWindowAttention`). ``num_persistent``
    learned tokens ``p`` (paper section 3.3) open every sequence, ``x~ = [p | x]``: the memory reads them
    before the first token (their outputs ``m_p`` are dropped, so the memory starts from a learned state),
    and the attention keeps their keys/values, from ``p + m_p``, visible to every query (the paper's
    ``o = SW-Attn(M(x~))`` with the persistent prefix, in this residual form). State ``(memory state,
    window KV cache, persistent K/V)``.

    Example::

        >>> mixer = TitansMAL(16, 2, window=4, num_persistent=2).eval()
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
        self.attn = PersistentWindowAttention(dim, heads, window=window)
        self._init_persistent(num_persistent)

    @staticmethod
    def _prefix_tokens(p, m_p):
        return p + m_p  # the attention's input at the persistent positions, as x + m at the others

    def _layer(self, x, ms, cache, prefix, valid):
        m, ms = self.memory(x, ms, valid)
        a, cache = self.attn(x + m, cache, valid, prefix)
        return m + a, (ms, cache, prefix)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self._layer(x, *self._start(x, state), valid)


@register_mixer("titans_mag")
class TitansMAG(_TitansBase):
    """Titans memory as a gate (MAG): sliding-window attention with the persistent prefix,
    ``a = SW-Attn*([p | x])`` (:class:`PersistentWindowAttention`: every query sees the ``num_persistent``
    learned tokens' keys plus its window, and its own output projection), gated by the memory's output,
    ``y = a * sigmoid(m)`` with ``m = NeuralMemory([p | x])`` (the memory reads the persistent tokens first;
    their outputs are dropped). Paper: ``y = SW-Attn*(x~)``, ``o = y (x) M(x~)``. State ``(memory state, window
    KV cache, persistent K/V)``. Until 2026-12-03 a second projection followed the gate, ``W_o(a * sigmoid(m))``:
    two projections in series at the LM's initialisation (std 0.02) held the attention path on a plateau (the
    quick MQAR task at 0.37 after 400 steps, 0.99 in 236 without it; docs/memory.md).

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
        self.attn = PersistentWindowAttention(dim, heads, window=window)
        self._init_persistent(num_persistent)

    @staticmethod
    def _prefix_tokens(p, m_p):
        return p  # the attention reads x itself

    def _layer(self, x, ms, cache, prefix, valid):
        m, ms = self.memory(x, ms, valid)
        a, cache = self.attn(x, cache, valid, prefix)
        return a * torch.sigmoid(m), (ms, cache, prefix)

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        return self._layer(x, *self._start(x, state), valid)


@register_mixer("titans_mac")
class TitansMAC(_TitansBase):
    """Titans memory as context (MAC): per segment of ``segment`` tokens, causal attention over
    ``[persistent tokens | memory retrievals | segment]`` (:func:`segment_attention`): the query of
    token ``t`` sees ``num_persistent`` learned key/value pairs, the retrievals ``h_j`` and the tokens
    ``x_j`` of its segment with ``j <= t``. ``rope`` (default True): RoPE on the query and on the keys of
    the tokens and of their retrievals (``h_j`` at token ``j``'s position) by the position inside the
    segment; the persistent keys stay unrotated (:func:`segment_attention`; titans-pytorch's segmented
    attention also uses rotary embeddings). State ``(memory state, segment buffers)``.

    Two forms (``paper_form``):

    - ``False`` (default): the memory reads the layer input (as in titans-pytorch's MAC transformer),
      ``m = NeuralMemory(x)``, each token's retrieval ``h_t = RMSNorm(m_t)`` (no weight) from the memory up to
      that token (its chunk grid), ``y = W_o(o)``; segments run in parallel. The norm puts the retrievals at
      the scale of the (pre-normed) tokens beside them; without it (until 2026-12-03) they entered the
      attention 76x smaller than the tokens at the LM's initialisation (rms 0.013 against 0.99) and the
      quick MQAR task stayed at 0.57 after 400 steps (0.99 in 253 with it; docs/memory.md).
    - ``True``: the paper's block (Titans eqs. 21-25), segment after segment: ``h = M*_{s-1}(W_h x_s)``
      from the memory the previous segment left (:meth:`NeuralMemory.read`), ``y_s = W_o(Attn([p | h |
      x_s]))``, the memory written with the attention output, ``M_s = M_{s-1}(y_s)``, and the output gated,
      ``o_s = W_out(y_s * sigmoid(M*_s(y_s)))`` (the memory's own per-token output on ``y_s``, as MAG's gate).
      The memory's chunk is the segment (``chunk_size`` None or ``segment``), so a segment's writes are one
      chunk and ``M_{s-1}`` is the chunk's start.

    Example::

        >>> mixer = TitansMAC(16, 2, segment=4).eval()
        >>> x = torch.randn(1, 7, 16)
        >>> y, st = mixer(x[:, :6])
        >>> torch.allclose(mixer(x[:, 6:], st)[0], mixer(x)[0][:, 6:], atol=1e-5)
        True
        >>> paper = TitansMAC(16, 2, segment=4, paper_form=True).eval()
        >>> torch.allclose(paper(x[:, 6:], paper(x[:, :6])[1])[0], paper(x)[0][:, 6:], atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        segment: int = 8,
        num_persistent: int = 4,
        depth: int = 2,
        chunk_size: int | None = None,
        rope: bool = True,
        paper_form: bool = False,
        **memory_kw,
    ):
        check_positive_int("segment", segment)
        if paper_form not in (True, False):
            raise ValueError(f"paper_form must be a bool, got {paper_form!r}")
        if paper_form and chunk_size not in (None, segment):
            raise ValueError(
                f"chunk_size must be None or the segment ({segment}) with paper_form=True (a segment's memory "
                f"writes are one chunk), got {chunk_size}"
            )
        chunk_size = (segment if paper_form else 16) if chunk_size is None else chunk_size
        super().__init__(dim, heads, depth, chunk_size, **memory_kw)
        self.segment, self.paper_form = segment, paper_form
        self.rope = RotaryEmbedding(self.head_dim) if rope else None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.persistent_k = nn.Parameter(torch.randn(num_persistent, heads, self.head_dim) / math.sqrt(self.head_dim))
        self.persistent_v = nn.Parameter(torch.randn(num_persistent, heads, self.head_dim) / math.sqrt(self.head_dim))
        if paper_form:  # created last: the default form's parameters and initialisation stay as they were
            self.h_proj = nn.Linear(dim, dim, bias=False)  # the paper's W_Q of the retrieval
            self.out = nn.Linear(dim, dim, bias=False)

    def _attend(self, x, h, ss, valid):
        """Segment attention of ``x [B, n, dim]`` over its retrievals ``h [B, n, dim]``; ``(o [B, n, dim], ss)``."""
        B, n, H, D = x.shape[0], x.shape[1], self.heads, self.head_dim
        q = self.q_proj(x).view(B, n, H, D)
        kx, vx = self.k_proj(x).view(B, n, H, D), self.v_proj(x).view(B, n, H, D)
        kh, vh = self.k_proj(h).view(B, n, H, D), self.v_proj(h).view(B, n, H, D)
        o, ss = segment_attention(
            q, [kh, kx], [vh, vx], self.persistent_k, self.persistent_v, self.segment, ss, valid, self.rope
        )
        return o.reshape(B, n, -1), ss

    def forward(self, x, state=None, valid=None):
        valid = check_x_and_valid(x, self.dim, valid)
        ms, ss = (None, None) if state is None else state
        if self.paper_form:
            return self._paper_forward(x, ms, ss, valid)
        m, ms = self.memory(x, ms, valid)
        o, ss = self._attend(x, F.rms_norm(m, (self.dim,), eps=1e-5), ss, valid)
        return self.o_proj(o), (ms, ss)

    def _paper_forward(self, x, ms, ss, valid):
        """The paper's block (class docstring): whole segments at once where every row starts a segment and
        nothing is padded, else token by token (each row on its own segment grid, counted in valid tokens)."""
        B, T, N = x.shape[0], x.shape[1], self.segment
        if valid is not None and bool(valid.all()):
            valid = None
        aligned = valid is None and (ss is None or not bool((ss["count"] != 0).any()))
        spans = [(a, min(a + N, T)) for a in range(0, T, N)] if aligned else [(t, t + 1) for t in range(T)]
        outs = []
        for a, b in spans:
            xs, vs = x[:, a:b], None if valid is None else valid[:, a:b]
            h = self.memory.read(self.h_proj(xs).view(B, b - a, self.heads, self.head_dim), ms)
            o, ss = self._attend(xs, h.reshape(B, b - a, -1), ss, vs)
            y = self.o_proj(o)
            m, ms = self.memory(y, ms, vs)
            outs.append(self.out(y * torch.sigmoid(m)))
        y = torch.cat(outs, 1) if outs else x.new_zeros(B, 0, self.dim)
        return y, (ms, ss)
