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
:mod:`effattn.kv` (a :class:`~effattn.kv.KVCacheBase`, e.g. the KIVI
:class:`~effattn.kv.QuantizedKVCache`). A call with a state continues the sequence: positions start
at the number of real tokens already cached, and the queries attend to the cache bottom-right
aligned. The cache is extended in place and returned. A causal layer with a ``window`` (and no
mask/score mod) starts a :class:`~effattn.kv.WindowKVCache` instead, which keeps only the keys a later query
can still see (about the last ``window`` tokens), so its state stops growing with the context.

Padding: ``valid`` (bool ``[B, T]``, False at left padding) makes padded tokens invisible as keys
(a mask mod) and excludes them from the position count, so a left-padded batch gives the same
outputs at real tokens as each sequence on its own. Outputs at padded queries are meaningless
(zeros when every key they could see is padding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn.exact.api import BACKENDS, attention
from effattn.exact.decode import decode_attention
from effattn.exact.masks import check_mod_signature, window_bounds
from effattn.kv.base import KVCacheBase
from effattn.kv.compressed import CompressedLayerCache
from effattn.kv.contiguous import KVCache
from effattn.kv.window import WindowKVCache
from effattn.nn.rope import RotaryEmbedding


def _check_pos_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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


def check_state(state, batch: int) -> KVCacheBase:
    if state is None:
        return KVCache()
    if not isinstance(state, KVCacheBase):
        raise TypeError(
            f"state must be a KV cache of effattn.kv (KVCache, QuantizedKVCache, ...; None for a fresh "
            f"sequence), got {type(state).__name__}"
        )
    if state.batch_size is not None and state.batch_size != batch:
        raise ValueError(f"state holds batch {state.batch_size}, x has batch {batch}")
    return state


def window_keep(causal: bool, window: int | None, mods: bool = False) -> int | None:
    """Keys a later query can still see (``window - 1``) where a layer's cache may be bounded: causal,
    windowed, no mask/score mod (``mods``: they see absolute cache indices, which trimming would shift)."""
    if not causal or window is None or mods:
        return None
    return window_bounds(window, True)[0]


def cached_tokens(seq_len: int, keep: int | None) -> int:
    """Tokens a layer's cache holds at most between calls at context ``seq_len`` (:class:`WindowKVCache`
    with ``keep``: ``keep + slack - 1``; otherwise all of them)."""
    return seq_len if keep is None else min(seq_len, WindowKVCache(keep).max_length)


def layer_cache(state, batch: int, keep: int | None) -> KVCacheBase:
    """The cache a layer continues: ``state`` checked, or a fresh one for ``state=None`` -- a
    :class:`WindowKVCache` keeping ``keep`` tokens where the layer may bound its cache (``keep`` not
    None: causal window, no mods), else a :class:`KVCache`."""
    if state is None and keep is not None:
        return WindowKVCache(keep)
    cache = check_state(state, batch)
    if isinstance(cache, WindowKVCache) and (keep is None or cache.keep < keep):
        need = "a causal window without mask/score mods" if keep is None else f"keep >= {keep}"
        raise ValueError(f"state is a WindowKVCache keeping {cache.keep} tokens; this layer needs {need}")
    return cache


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    *,
    causal: bool = True,
    window=None,
    mask_mod=None,
    score_mod=None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the newest ``T_q`` queries against every key of ``cache`` (already appended).

    ``mask_mod``/``score_mod`` receive absolute cache indices (query ``i`` of the call is cache
    index ``length - T_q + i``). Padded cached keys (``cache.valid``) are hidden and the window is
    measured in real-token positions. Decoding (causal, ``T_q == 1``, no padding, no mod,
    ``backend="auto"``) uses the split-KV :func:`effattn.decode_attention`.
    """
    Tq, L = q.shape[1], k.shape[1]
    off = L - Tq
    kvalid = cache.valid
    if causal and Tq == 1 and kvalid is None and mask_mod is None and score_mod is None and backend == "auto":
        win = window_bounds(window, True)[0] + 1 if window is not None else None
        return decode_attention(q, k, v, scale=scale, window=win, softcap=softcap, sinks=sinks)
    masks = []
    if kvalid is not None:
        kpos = cache.key_positions()
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
    mm = None
    if masks:

        def mm(b, h, qi, kv):
            m = masks[0](b, h, qi, kv)
            for f in masks[1:]:
                m = m & f(b, h, qi, kv)
            return m

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
        mask_mod=mm,
        score_mod=sm,
        scale=scale,
        softcap=softcap,
        sinks=sinks,
        backend=backend,
    )


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

    ``forward(x, state=None, valid=None) -> (y, KVCache)``.

    Example::

        >>> layer = Attention(32, 4, kv_heads=2)
        >>> x = torch.randn(2, 7, 32)
        >>> y, cache = layer(x[:, :6])
        >>> y1, cache = layer(x[:, 6:], cache)      # decode one more token
        >>> torch.allclose(torch.cat([y, y1], 1), layer(x)[0], atol=1e-5)
        True
    """

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
        _check_pos_int("dim", dim)
        _check_pos_int("heads", heads)
        _check_pos_int("kv_heads", kv_heads, allow_none=True)
        _check_pos_int("head_dim", head_dim, allow_none=True)
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

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, window={self.window}, rope={self.rope}"
        )

    def attend(
        self, x: torch.Tensor, state: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Per-head outputs ``o [B, T, heads, head_dim]`` (before ``o_proj``) and the cache."""
        B, T = check_mixer_input(x, self.dim, valid)
        if isinstance(state, CompressedLayerCache):
            return self._attend_compressed(x, state, valid), state
        cache = layer_cache(state, B, self._window_keep())
        pos = cache.next_positions(B, T, valid, x.device)
        q, k, v = self._project(x, pos)
        k_all, v_all = cache.append(k, v, valid)
        sinks = None if self.sinks is None else self.sinks.to(q.dtype)
        o = cached_attention(
            q,
            k_all,
            v_all,
            cache,
            causal=self.causal,
            window=self.window,
            mask_mod=self.mask_mod,
            score_mod=self.score_mod,
            softcap=self.softcap,
            sinks=sinks,
            backend=self.backend,
        )
        if isinstance(cache, WindowKVCache):
            cache.trim()
        return o, cache

    def _window_keep(self) -> int | None:
        return window_keep(self.causal, self.window, mods=self.mask_mod is not None or self.score_mod is not None)

    def _project(self, x: torch.Tensor, pos: torch.Tensor):
        """Queries ``[B, T, heads, head_dim]``, keys and values ``[B, T, kv_heads, head_dim]``, QK-normed
        and rotated to the positions ``pos``."""
        B, T = x.shape[:2]
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope.apply(q, pos), self.rope.apply(k, pos)
        return q, k, v

    def _attend_compressed(self, x: torch.Tensor, cache: CompressedLayerCache, valid) -> torch.Tensor:
        """:meth:`attend` against a KV-policy cache (:class:`effattn.kv.CompressedKVCache`): the new
        tokens keep their absolute positions (tokens seen, kept or not). Heads of unequal length
        (left-padded by the cache) attend one kv head at a time to their own keys; a key mask that
        differs across rows falls back to a mask mod."""
        B, T = x.shape[:2]
        if valid is not None and not bool(valid.all()):
            raise ValueError("valid: left padding is not supported with a KV policy; run each row on its own")
        if not self.causal or self.window is not None or self.mask_mod is not None or self.score_mod is not None:
            raise ValueError("a KV policy needs a causal attention layer without window, mask_mod or score_mod")
        if cache.batch_size is not None and cache.batch_size != B:
            raise ValueError(f"state holds batch {cache.batch_size}, x has batch {B}")
        pos = cache.next_positions(T, x.device)
        q, k, v = self._project(x, pos)
        k_all, v_all, key_mask = cache.update(k, v, q)
        sinks = None if self.sinks is None else self.sinks.to(q.dtype)
        if key_mask is None:
            return self._attend_dense(q, k_all, v_all, sinks)
        lengths = key_mask.sum(-1)  # [B, H_kv]
        group = self.heads // self.kv_heads
        if bool((lengths == lengths[:1]).all()):
            # heads of unequal length: each kv head (and its query group) on its own unpadded keys
            L = k_all.shape[1]
            outs = []
            for h, n in enumerate(lengths[0].tolist()):
                qs = slice(h * group, (h + 1) * group)
                outs.append(
                    self._attend_dense(
                        q[:, :, qs],
                        k_all[:, L - n :, h : h + 1],
                        v_all[:, L - n :, h : h + 1],
                        None if sinks is None else sinks[qs],
                    )
                )
            return torch.cat(outs, dim=2)

        def mm(b, h, qi, kv):
            return key_mask[b, h // group, kv]

        return attention(
            q, k_all, v_all, causal=True, mask_mod=mm, softcap=self.softcap, sinks=sinks, backend=self.backend
        )

    def _attend_dense(self, q, k, v, sinks):
        if q.shape[1] == 1 and self.backend == "auto":
            return decode_attention(q, k, v, softcap=self.softcap, sinks=sinks)
        return attention(q, k, v, causal=True, softcap=self.softcap, sinks=sinks, backend=self.backend)

    def forward(
        self, x: torch.Tensor, state: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        o, cache = self.attend(x, state, valid)
        return self.o_proj(o.flatten(2)), cache

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens (parameter dtype); for a
        bounded window cache the most it holds between calls, ``min(seq_len, keep + slack - 1)`` tokens."""
        el = self.q_proj.weight.element_size()
        keep = self._window_keep()
        return batch * cached_tokens(seq_len, keep) * self.kv_heads * 2 * self.head_dim * el
