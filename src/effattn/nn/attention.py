"""Softmax attention mixer: MHA, GQA and MQA with RoPE, QK-norm, sliding window, softcap and sinks.

For input ``x [B, T, dim]``:

    q = x W_q,  k = x W_k,  v = x W_v              (heads, kv_heads, kv_heads of head_dim)
    q, k = RoPE(norm(q), p), RoPE(norm(k), p)      (p = absolute position of each token)
    o_h = softmax(q_h K_g^T / sqrt(head_dim) + mask) V_g,   g = h // (heads / kv_heads)
    y = concat_h(o_h) W_o

Multi-head attention (Vaswani et al. 2017, "Attention Is All You Need"); grouped-query attention
(Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints"); multi-query attention (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is
All You Need"); QK-norm as in OLMo 2 / Qwen3 (RMSNorm over head_dim of q and k); learned sink
logits as in gpt-oss (OpenAI 2025). The kernel is :func:`effattn.attention`; one-token decoding
without a mask/score mod goes through :func:`effattn.decode_attention`.

State: a :class:`~effattn.kv.KVCache` holding the (RoPE'd) keys and values, or any other cache of
:mod:`effattn.kv` (the :class:`~effattn.kv.LayerCache` protocol: the KIVI
:class:`~effattn.kv.QuantizedKVCache`, rows of a :class:`~effattn.kv.PagedKVCache`, a KV policy's
:class:`~effattn.kv.CompressedLayerCache`); the layer never asks which one it holds. A call with a
state continues the sequence: positions start at the number of real tokens already cached, and the
queries attend to the cache bottom-right aligned. The cache is extended in place and returned. A
causal layer with a ``window`` (and no mask/score mod) starts a :class:`~effattn.kv.WindowKVCache`
instead, which keeps only the keys a later query can still see (about the last ``window`` tokens),
so its state stops growing with the context. A cache with ``reindexes_positions`` (StreamingLLM's
policy cache, ``make_policy("streaming_llm")``) holds keys before RoPE: the layer rotates every cached
key by its slot inside the cache and the new queries by theirs (Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks").

Padding: ``valid`` (bool ``[B, T]``, False at left padding) makes padded tokens invisible as keys
(a mask mod) and excludes them from the position count, so a left-padded batch gives the same
outputs at real tokens as each sequence on its own. Outputs at padded queries are meaningless
(zeros when every key they could see is padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from effattn._checks import check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.exact import BACKENDS, attention, check_mod_signature, decode_attention, window_bounds
from effattn.kv import AttentionPattern, CachedKV, KVCache, LayerCache, WindowKVCache
from effattn.nn.rope import RotaryEmbedding


def check_mixer_input(x, dim: int, valid) -> tuple[int, int]:
    """``x`` is a floating ``[B, T, dim]`` tensor and ``valid`` None or bool ``[B, T]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [batch, seq, dim={dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape [batch, seq, dim={dim}], got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    B, T = x.shape[:2]
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, T):
            raise ValueError(f"valid must be a bool tensor [batch, seq] = [{B}, {T}], got {valid!r:.80}")
    return B, T


def check_state(state, batch: int) -> LayerCache:
    """``state`` is a cache of :mod:`effattn.kv` (the :class:`~effattn.kv.LayerCache` protocol) holding
    ``batch`` rows, or ``None`` (then a fresh :class:`~effattn.kv.KVCache`)."""
    if state is None:
        return KVCache()
    if not isinstance(state, LayerCache):
        raise TypeError(
            f"state must be a KV cache of effattn.kv (an effattn.kv.LayerCache: KVCache, QuantizedKVCache, ...; "
            f"None for a fresh sequence), got {type(state).__name__}"
        )
    state.check_batch(batch)
    return state


def window_keep(causal: bool, window: int | None, mods: bool = False) -> int | None:
    """Keys a later query can still see (``window - 1``) where a layer's cache may be bounded: causal,
    windowed, no mask/score mod (``mods``: they see absolute cache indices, which trimming would shift)."""
    return AttentionPattern(causal, window, mods).keep


def cached_tokens(seq_len: int, keep: int | None) -> int:
    """Tokens a layer's cache holds at most between calls at context ``seq_len`` (:class:`WindowKVCache`
    with ``keep``: ``keep + slack - 1``; otherwise all of them)."""
    return seq_len if keep is None else min(seq_len, WindowKVCache(keep).max_length)


def layer_cache(state, batch: int, pattern: AttentionPattern) -> LayerCache:
    """The cache a layer computing ``pattern`` continues: ``state`` checked (its batch, and
    :meth:`~effattn.kv.LayerCache.check_pattern`), or a fresh one for ``state=None`` -- a
    :class:`WindowKVCache` where the layer may bound its cache (causal window, no mods), else a
    :class:`KVCache`."""
    if state is None:
        keep = pattern.keep
        return KVCache() if keep is None else WindowKVCache(keep)
    cache = check_state(state, batch)
    cache.check_pattern(pattern)
    return cache


def _and_masks(fns: list[Callable]) -> Callable | None:
    if not fns:
        return None

    def mm(b, h, qi, kv):
        m = fns[0](b, h, qi, kv)
        for f in fns[1:]:
            m = m & f(b, h, qi, kv)
        return m

    return fns[0] if len(fns) == 1 else mm


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: CachedKV,
    *,
    causal: bool = True,
    window=None,
    mask_mod=None,
    score_mod=None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of the newest ``T_q`` queries against every key of a cache, as
    :meth:`effattn.kv.LayerCache.update` returned them (``cache``: the :class:`~effattn.kv.CachedKV`;
    ``k``/``v`` its keys and values, or tensors derived from them slot by slot, as MLA's).

    ``mask_mod``/``score_mod`` receive absolute cache indices (query ``i`` of the call is cache
    index ``length - T_q + i``). Padded cached keys (``cache.valid``) are hidden and the window is
    measured in real-token positions. Heads of unequal length (``cache.head_mask``, a policy cache)
    attend one kv head at a time to their own keys (plain causal attention only). Decoding (causal,
    ``T_q == 1``, no padding, no mod, ``backend="auto"``) uses the split-KV
    :func:`effattn.decode_attention`. ``return_lse``: also return the log-sum-exp ``[B, H_q, T_q]`` (float32;
    float64 for float64 input), to merge the result with attention over other keys
    (:func:`effattn.merge_attention_states`).
    """
    Tq, L = q.shape[1], k.shape[1]
    off = L - Tq
    if cache.head_mask is not None:
        if return_lse:
            raise ValueError("return_lse is not available for a KV policy cache with heads of unequal length")
        if not causal or window is not None or mask_mod is not None or score_mod is not None:
            raise ValueError("a KV policy needs a causal attention layer without window, mask_mod or score_mod")
        return _ragged_heads_attention(q, k, v, cache.head_mask, scale, softcap, sinks, backend)
    kvalid = cache.valid
    if causal and Tq == 1 and kvalid is None and mask_mod is None and score_mod is None and backend == "auto":
        win = window_bounds(window, True)[0] + 1 if window is not None else None
        return decode_attention(q, k, v, scale=scale, window=win, softcap=softcap, sinks=sinks, return_lse=return_lse)
    masks = []
    if kvalid is not None:
        kpos = cache.key_positions
        masks.append(lambda b, h, qi, kv: kvalid[b, kv])
        if window is not None:
            left, right = window_bounds(window, causal)
            window = None

            def window_mod(b, h, qi, kv):
                d = kpos[b, qi + off] - kpos[b, kv]
                return (d <= left) & (d >= -right)

            masks.append(window_mod)
    if mask_mod is not None:
        masks.append(lambda b, h, qi, kv: mask_mod(b, h, qi + off, kv))
    sm = None
    if score_mod is not None:

        def sm(s, b, h, qi, kv):
            return score_mod(s, b, h, qi + off, kv)

    return attention(
        q,
        k,
        v,
        causal=causal,
        window=window,
        mask_mod=_and_masks(masks),
        score_mod=sm,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        backend=backend,
        return_lse=return_lse,
    )


def _causal(q, k, v, scale, softcap, sinks, backend) -> torch.Tensor:
    if q.shape[1] == 1 and backend == "auto":
        return decode_attention(q, k, v, scale=scale, softcap=softcap, sinks=sinks)
    return attention(q, k, v, causal=True, scale=scale, softcap=softcap, sinks=sinks, backend=backend)


def _ragged_heads_attention(q, k, v, head_mask, scale, softcap, sinks, backend) -> torch.Tensor:
    """Causal attention where kv head ``h`` of row ``b`` holds only its last ``head_mask[b, h].sum()``
    slots (left-padded by a policy cache): heads of one length across rows run one at a time on their
    own unpadded keys; otherwise the key mask becomes a mask mod."""
    lengths = head_mask.sum(-1)  # [B, H_kv]
    group = q.shape[2] // k.shape[2]
    if bool((lengths == lengths[:1]).all()):
        L = k.shape[1]
        outs = []
        for h, n in enumerate(lengths[0].tolist()):
            qs = slice(h * group, (h + 1) * group)
            kh, vh = k[:, L - n :, h : h + 1], v[:, L - n :, h : h + 1]
            outs.append(_causal(q[:, :, qs], kh, vh, scale, softcap, None if sinks is None else sinks[qs], backend))
        return torch.cat(outs, dim=2)

    def mm(b, h, qi, kv):
        return head_mask[b, h // group, kv]

    return attention(q, k, v, causal=True, mask_mod=mm, scale=scale, softcap=softcap, sinks=sinks, backend=backend)


class Attention(nn.Module):
    """Softmax attention layer (MHA / GQA / MQA) with a growing KV cache.

    Args:
        dim: model width; heads: query heads; kv_heads: key/value heads (``None`` = ``heads``,
            MHA; ``1`` = MQA; otherwise GQA with ``heads % kv_heads == 0``).
        head_dim: per-head width (default ``dim // heads``, which then must divide evenly).
        rope, rope_fraction, rope_base: rotary embedding on the first ``rope_fraction * head_dim``
            channels of q and k (:class:`~effattn.nn.rope.RotaryEmbedding`).
        qk_norm: RMSNorm over ``head_dim`` of q and k (before RoPE), as OLMo 2 and Qwen3.
        causal: causal self-attention (``False`` for encoders).
        window: sliding window (int or ``(left, right)``, see :func:`effattn.attention`).
        softcap: ``cap * tanh(s / cap)`` on the scores (Gemma 2).
        sinks: learn one sink logit per head (gpt-oss): an extra softmax entry with no value.
        mask_mod, score_mod: FlexAttention-style mods over absolute cache indices.
        backend: passed to :func:`effattn.attention`.
        bias: biases on the q/k/v/o projections.

    ``forward(x, state=None, valid=None) -> (y, cache)``: ``state`` is any cache of :mod:`effattn.kv`
    (the :class:`~effattn.kv.LayerCache` protocol: contiguous, window, quantized, paged rows, or a
    policy's :class:`~effattn.kv.CompressedLayerCache`); ``None`` starts a :class:`KVCache` (a
    :class:`WindowKVCache` for a causal window without mods). :attr:`cache_pattern` says what a cache
    must support to be this layer's state.

    Per-head gates: :meth:`set_head_gates` (gates ``[kv_heads]`` and the mask of the gated-off
    branch) is the one hook for changing what single heads see from outside the layer
    (DuoAttention's calibration uses it); :attr:`head_gates` reads them back.

    Example::

        >>> layer = Attention(32, 4, kv_heads=2)
        >>> x = torch.randn(2, 7, 32)
        >>> y, cache = layer(x[:, :6])
        >>> y1, cache = layer(x[:, 6:], cache)      # decode one more token
        >>> torch.allclose(torch.cat([y, y1], 1), layer(x)[0], atol=1e-5)
        True
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        rope: bool = True,
        rope_fraction: float = 1.0,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        causal: bool = True,
        window: int | tuple[int, int] | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        mask_mod=None,
        score_mod=None,
        backend: str = "auto",
        bias: bool = False,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("kv_heads", kv_heads, allow_none=True)
        check_positive_int("head_dim", head_dim, allow_none=True)
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if window is not None:
            window_bounds(window, causal)  # validates
        if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
        if mask_mod is not None:
            check_mod_signature("mask_mod", mask_mod, 4)
        if score_mod is not None:
            check_mod_signature("score_mod", score_mod, 5)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.window, self.softcap = causal, window, softcap
        self.mask_mod, self.score_mod, self.backend = mask_mod, score_mod, backend
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_base, rope_fraction) if rope else None
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None
        self._head_gates: torch.Tensor | None = None  # set through set_head_gates only
        self._gate_mask_mod = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, window={self.window}, rope={self.rope}"
        )

    @property
    def cache_pattern(self) -> AttentionPattern:
        """What this layer computes over its cache (:class:`effattn.kv.AttentionPattern`): a cache
        that is to be its ``state`` must accept it (:meth:`effattn.kv.LayerCache.check_pattern`).
        :class:`effattn.nn.LM` finds the layers that hold a KV cache by this attribute."""
        mods = self.mask_mod is not None or self.score_mod is not None or self._head_gates is not None
        return AttentionPattern(self.causal, self.window, mods)

    def set_head_gates(self, gates: torch.Tensor | None, mask_mod=None) -> None:
        """Mix every kv head's output with its output under an extra mask (``None`` removes the gates).

        With ``g = gates [kv_heads]`` in ``[0, 1]`` (a query head ``h`` uses ``g[h // (heads / kv_heads)]``)::

            o_h = g o_h + (1 - g) o_h'        o_h': the same attention with mask_mod also applied

        ``mask_mod(b, h, q_idx, kv_idx)`` sees absolute cache indices, like the layer's own. The gates
        may require grad (they are then trained with the model frozen): DuoAttention's retrieval /
        streaming gates (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
        Retrieval and Streaming Heads"), used by :func:`effattn.nn.calibrate_duo_attention`; gates of
        0 and 1 put single heads under the mask. While gates are set the layer keeps a full cache (no
        window trimming, no policy cache).

        Example::

            >>> layer = Attention(32, 4, kv_heads=2)
            >>> x = torch.randn(1, 6, 32)
            >>> layer.set_head_gates(torch.tensor([1.0, 0.0]), lambda b, h, q, kv: q - kv < 2)
            >>> y, _ = layer(x)
            >>> layer.set_head_gates(None)
        """
        if gates is None:
            self._head_gates, self._gate_mask_mod = None, None
            return
        if not isinstance(gates, torch.Tensor) or not gates.dtype.is_floating_point:
            raise TypeError(f"gates must be a floating tensor [kv_heads={self.kv_heads}], got {gates!r:.80}")
        if tuple(gates.shape) != (self.kv_heads,):
            raise ValueError(f"gates must have shape [kv_heads] = [{self.kv_heads}], got {tuple(gates.shape)}")
        if bool(((gates < 0) | (gates > 1) | gates.isnan()).any()):
            raise ValueError(f"gates must lie in [0, 1], got {gates.detach().tolist()}")
        if mask_mod is None:
            raise ValueError("set_head_gates needs the mask_mod of the gated-off branch")
        check_mod_signature("mask_mod", mask_mod, 4)
        self._head_gates, self._gate_mask_mod = gates, mask_mod

    @property
    def head_gates(self) -> torch.Tensor | None:
        """The gates set by :meth:`set_head_gates` (``None``: no gating)."""
        return self._head_gates

    def attend(
        self, x: torch.Tensor, state: LayerCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        """Per-head outputs ``o [B, T, heads, head_dim]`` (before ``o_proj``) and the cache.

        Any :class:`effattn.kv.LayerCache` works the same way: positions of the new tokens, then
        ``update`` with the new keys, values and queries, attention over what it returns, ``trim``."""
        B, T = check_mixer_input(x, self.dim, valid)
        sp = current_sequence_parallel()
        if sp is not None:  # training on sequence shards (effattn.dist.sequence_parallel): no cache
            if any(a is not None for a in (state, valid, self.mask_mod, self.score_mod, self._head_gates)):
                raise ValueError("sequence-parallel attention takes no state, valid, mask/score mod or head gates")
            q, k, v = self._project(x, sp.positions(T, x.device))  # RoPE at the shard's global positions
            sinks = None if self.sinks is None else self.sinks.to(q.dtype)
            o = sp.attention_call(
                q, k, v, causal=self.causal, window=self.window, softcap=self.softcap, sinks=sinks, backend=self.backend
            )
            return o, None
        cache = layer_cache(state, B, self.cache_pattern)
        pos = cache.next_positions(B, T, valid, x.device)
        # StreamingLLM (cache.reindexes_positions): keys are cached before RoPE and every key is rotated
        # by its slot inside the cache at each call, the new queries by theirs (L-T .. L-1)
        reindex = self.rope is not None and bool(getattr(cache, "reindexes_positions", False))
        q, k, v = self._project(x, pos, rotate=not reindex)
        kv = cache.update(k, v, valid=valid, q=q)
        keys = kv.k
        if reindex:
            slots = torch.arange(keys.shape[1], device=x.device)
            q, keys = self.rope.apply(q, slots[keys.shape[1] - T :]), self.rope.apply(keys, slots)
        sinks = None if self.sinks is None else self.sinks.to(q.dtype)
        common = dict(causal=self.causal, window=self.window, softcap=self.softcap, sinks=sinks, backend=self.backend)
        o = cached_attention(q, keys, kv.v, kv, mask_mod=self.mask_mod, score_mod=self.score_mod, **common)
        if self._head_gates is not None:
            gated_off = _and_masks([f for f in (self.mask_mod, self._gate_mask_mod) if f is not None])
            o_alt = cached_attention(q, keys, kv.v, kv, mask_mod=gated_off, score_mod=self.score_mod, **common)
            g = self._head_gates.repeat_interleave(self.heads // self.kv_heads).view(1, 1, -1, 1).to(o.dtype)
            o = g * o + (1 - g) * o_alt
        cache.trim()
        return o, cache

    def _window_keep(self) -> int | None:
        return self.cache_pattern.keep

    def _project(self, x: torch.Tensor, pos: torch.Tensor, rotate: bool = True):
        """Queries ``[B, T, heads, head_dim]``, keys and values ``[B, T, kv_heads, head_dim]``, QK-normed
        and rotated to the positions ``pos`` (not rotated with ``rotate=False``)."""
        B, T = x.shape[:2]
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and rotate:
            q, k = self.rope.apply(q, pos), self.rope.apply(k, pos)
        return q, k, v

    def forward(
        self, x: torch.Tensor, state: LayerCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        o, cache = self.attend(x, state, valid)
        return self.o_proj(o.flatten(2)), cache

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens (parameter dtype); for a
        bounded window cache the most it holds between calls, ``min(seq_len, keep + slack - 1)`` tokens."""
        el = self.q_proj.weight.element_size()
        keep = self._window_keep()
        return batch * cached_tokens(seq_len, keep) * self.kv_heads * 2 * self.head_dim * el
