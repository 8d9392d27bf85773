"""Multi-head Latent Attention (DeepSeek-AI 2024, "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model"), and GQA -> MLA conversion (Meng et al. 2025, "TransMLA:
Multi-Head Latent Attention Is All You Need").

Per token ``x``, with ``r = kv_lora_rank``, heads ``h``:

    c_kv = norm(W_dkv x)                    (r)       <- cached
    k_pe = RoPE(W_kr x)                     (d_r)     <- cached, one key shared by all heads
    k_h  = [W_uk_h c_kv ; k_pe],  v_h = W_uv_h c_kv
    q_h  = [W_uq_h c_q ; RoPE(W_qr_h c_q)],  c_q = norm(W_dq x)  (or W_q x without q_lora_rank)
    o_h  = softmax(q_h K_h^T / sqrt(d_n + d_r)) V_h ,   y = concat_h(o_h) W_o

Plain form: up-project every cached latent to per-head keys/values, then attention with
``H_kv = H``. Absorbed form (the paper's inference trick): ``q_h . W_uk_h c = (W_uk_h^T q_h) . c``,
so with ``q'_h = [W_uk_h^T q_nope_h ; q_pe_h]`` and the cached row ``[c_kv ; k_pe]`` as the one
key head, attention is MQA over the latent (value = ``c_kv``) and ``o_h = W_uv_h o'_h`` afterwards:
per step it reads ``r + d_r`` numbers per cached token instead of ``H (2 d_n + ...)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effattn._checks import check_int, check_positive_int
from effattn.dist import current_sequence_parallel
from effattn.exact import BACKENDS
from effattn.kv import AttentionPattern, LayerCache
from effattn.nn.attention import Attention, cached_attention, cached_tokens, check_mixer_input, layer_cache
from effattn.nn.rope import RotaryEmbedding


class MLA(nn.Module):
    """Multi-head latent attention layer; its state is a key-only :class:`KVCache` of
    ``[c_kv | k_pe]`` rows ``[B, T, 1, kv_lora_rank + qk_rope_head_dim]`` (a causal windowed layer
    starts a :class:`~effattn.kv.WindowKVCache`, which keeps about the last ``window`` rows).

    Args:
        dim, heads: model width and number of heads.
        kv_lora_rank: latent width ``r`` of the compressed keys/values (what is cached).
        qk_nope_head_dim, qk_rope_head_dim: per-head query/key widths without and with RoPE
            (``qk_rope_head_dim = 0``: no decoupled RoPE key).
        v_head_dim: per-head value width.
        q_lora_rank: low-rank query (down-projection, RMSNorm, up-projection); ``None``: full rank.
        kv_norm: RMSNorm on ``c_kv`` (DeepSeek-V2 has it; :func:`mla_from_gqa` turns it off).
        absorb: ``None`` (default) uses the absorbed form for one-token decoding and the plain form
            otherwise; ``True``/``False`` force one form.
        causal, window, softcap, backend: as :class:`~effattn.nn.attention.Attention`.
        bias: biases on the query, latent down-projection and output projections.

    Example::

        >>> mla = MLA(32, 4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
        >>> y, cache = mla(torch.randn(2, 5, 32))
        >>> tuple(cache.k.shape), mla.state_size(2, 5)
        ((2, 5, 1, 20), 800)
    """

    supports_sequence_parallel = True  # reads effattn.dist.sequence_parallel

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        rope_base: float = 10000.0,
        kv_norm: bool = True,
        absorb: bool | None = None,
        causal: bool = True,
        window: int | tuple[int, int] | None = None,
        softcap: float | None = None,
        backend: str = "auto",
        bias: bool = False,
    ):
        super().__init__()
        for name, val in (
            ("dim", dim),
            ("heads", heads),
            ("kv_lora_rank", kv_lora_rank),
            ("qk_nope_head_dim", qk_nope_head_dim),
            ("v_head_dim", v_head_dim),
        ):
            check_positive_int(name, val)
        check_positive_int("q_lora_rank", q_lora_rank, allow_none=True)
        check_int("qk_rope_head_dim", qk_rope_head_dim, minimum=0)
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {qk_rope_head_dim}")
        if absorb not in (None, True, False):
            raise TypeError(f"absorb must be None, True or False, got {absorb!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.heads, self.kv_lora_rank = dim, heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.q_lora_rank, self.absorb = q_lora_rank, absorb
        self.causal, self.window, self.softcap, self.backend = causal, window, softcap, backend
        dq = qk_nope_head_dim + qk_rope_head_dim
        self.scale = 1.0 / math.sqrt(dq)
        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, heads * dq, bias=bias)
        else:
            self.q_proj = nn.Sequential(
                nn.Linear(dim, q_lora_rank, bias=bias),
                nn.RMSNorm(q_lora_rank, eps=1e-6),
                nn.Linear(q_lora_rank, heads * dq, bias=False),
            )
        self.kv_down = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6) if kv_norm else None
        # rows grouped per head: [W_uk_h (d_n rows) ; W_uv_h (d_v rows)]
        self.kv_up = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_head_dim, dim, bias=bias)
        self.rope = RotaryEmbedding(qk_rope_head_dim, rope_base) if qk_rope_head_dim else None
        # TransMLA step 1 (set by mla_from_gqa): RoPE on the up-projected no-PE part per head.
        self.rope_nope: RotaryEmbedding | None = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}, q_lora_rank={self.q_lora_rank}"
        )

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_up.weight.view(self.heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # W_uk [H, d_n, r], W_uv [H, d_v, r]

    @property
    def cache_pattern(self) -> AttentionPattern:
        """What this layer computes over its cache: keys only (the latent rows), causal/window as set."""
        return AttentionPattern(self.causal, self.window, key_only=True)

    def forward(
        self, x: torch.Tensor, state: LayerCache | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        B, T = check_mixer_input(x, self.dim, valid)
        sp = current_sequence_parallel()
        if sp is not None:  # training on sequence shards (effattn.dist.sequence_parallel): no cache
            return self._forward_sequence_parallel(x, sp, state, valid), None
        cache = layer_cache(state, B, self.cache_pattern)
        H, dn, dr, r = self.heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        pos = cache.next_positions(B, T, valid, x.device)
        q = self.q_proj(x).view(B, T, H, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        lat = self.kv_down(x)
        c_kv, k_pe = lat[..., :r], lat[..., r:]
        if self.kv_norm is not None:
            c_kv = self.kv_norm(c_kv)
        if self.rope is not None:
            q_pe = self.rope.apply(q_pe, pos)
            k_pe = self.rope.apply(k_pe.view(B, T, 1, dr), pos).view(B, T, dr)
        cached = cache.update(torch.cat([c_kv, k_pe], -1).unsqueeze(2), None, valid=valid)
        lat_all = cached.k
        absorb = (T == 1) if self.absorb is None else self.absorb
        if absorb and self.rope_nope is not None:
            if self.absorb:
                raise ValueError("absorb=True is unavailable with RoPE on the up-projected keys (mla_from_gqa)")
            absorb = False
        common = dict(causal=self.causal, window=self.window, softcap=self.softcap, backend=self.backend)
        W_uk, W_uv = self._up_weights()
        if absorb:
            q_lat = torch.einsum("bthd,hdr->bthr", q_nope, W_uk)
            q_abs = torch.cat([q_lat, q_pe], -1)
            o_lat = cached_attention(q_abs, lat_all, lat_all[..., :r], cached, scale=self.scale, **common)
            o = torch.einsum("bthr,hvr->bthv", o_lat, W_uv)
        else:
            L = lat_all.shape[1]
            kv = self.kv_up(lat_all[:, :, 0, :r]).view(B, L, H, dn + self.v_head_dim)
            k_nope, v = kv[..., :dn], kv[..., dn:]
            if self.rope_nope is not None:
                kpos = cached.key_positions
                if kpos is None:  # slot j at offset + j (a window cache counts the slots it dropped)
                    kpos = torch.arange(cached.offset, cached.offset + L, device=x.device)
                q_nope = self.rope_nope.apply(q_nope, pos)
                k_nope = self.rope_nope.apply(k_nope, kpos)
            k = torch.cat([k_nope, lat_all[..., r:].expand(B, L, H, dr)], -1)
            o = cached_attention(torch.cat([q_nope, q_pe], -1), k, v, cached, scale=self.scale, **common)
        cache.trim()
        return self.o_proj(o.flatten(2)), cache

    def _forward_sequence_parallel(self, x, sp, state, valid) -> torch.Tensor:
        """The plain (up-projected) form on this rank's shard: RoPE at the shard's global positions, then
        the configured sequence-parallel attention (ring, TokenRing or Ulysses; a window by the halo)."""
        if state is not None or valid is not None:
            raise ValueError("sequence-parallel MLA takes no state or valid mask (shards of unpadded sequences)")
        B, T, _ = x.shape
        H, dn, dr, r = self.heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        pos = sp.positions(T, x.device)
        q = self.q_proj(x).view(B, T, H, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        lat = self.kv_down(x)
        c_kv, k_pe = lat[..., :r], lat[..., r:]
        if self.kv_norm is not None:
            c_kv = self.kv_norm(c_kv)
        if self.rope is not None:
            q_pe = self.rope.apply(q_pe, pos)
            k_pe = self.rope.apply(k_pe.view(B, T, 1, dr), pos).view(B, T, dr)
        kv = self.kv_up(c_kv).view(B, T, H, dn + self.v_head_dim)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        if self.rope_nope is not None:
            q_nope, k_nope = self.rope_nope.apply(q_nope, pos), self.rope_nope.apply(k_nope, pos)
        k = torch.cat([k_nope, k_pe.view(B, T, 1, dr).expand(B, T, H, dr)], -1)
        o = sp.attention_call(
            torch.cat([q_nope, q_pe], -1),
            k,
            v,
            causal=self.causal,
            window=self.window,
            scale=self.scale,
            softcap=self.softcap,
            backend=self.backend,
        )
        return self.o_proj(o.flatten(2))

    def _window_keep(self) -> int | None:
        return self.cache_pattern.keep

    def state_size(self, batch: int, seq_len: int) -> int:
        """Bytes of the latent cache: ``kv_lora_rank + qk_rope_head_dim`` numbers per token; a causal
        windowed layer holds at most ``min(seq_len, keep + slack - 1)`` tokens (:class:`WindowKVCache`)."""
        width = self.kv_lora_rank + self.qk_rope_head_dim
        return batch * cached_tokens(seq_len, self._window_keep()) * width * self.kv_down.weight.element_size()


@torch.no_grad()
def mla_from_gqa(attn: Attention) -> MLA:
    """An :class:`MLA` layer computing exactly what the GQA/MQA/MHA layer ``attn`` computes.

    TransMLA's observation: GQA is MLA with the latent ``c = [W_k x ; W_v x]`` (width
    ``2 * kv_heads * head_dim``) and up-projections ``W_uk_h``, ``W_uv_h`` that copy kv head
    ``h // (heads / kv_heads)`` out of the latent (0/1 selection matrices). With RoPE, the rotation
    is applied per head to the up-projected keys (TransMLA's first step, before its RoRoPE/PCA
    compression, which is not done here): the cache still holds only the latent, but the absorbed
    decode is unavailable (the rotation sits between ``W_uk`` and the score), so this variant
    always runs the plain form. Without RoPE (``Attention(rope=False)``) the absorbed form works.
    The latent is as large as the GQA KV cache: the conversion alone saves no memory; it is the
    starting point for compressing ``r``.

    Example::

        >>> gqa = Attention(32, 4, kv_heads=2)
        >>> mla = mla_from_gqa(gqa)
        >>> x = torch.randn(1, 6, 32)
        >>> torch.allclose(mla(x)[0], gqa(x)[0], atol=1e-5)
        True
    """
    if not isinstance(attn, Attention):
        raise TypeError(f"attn must be an effattn.nn.Attention, got {type(attn).__name__}")
    unsupported = [
        n
        for n, on in (
            ("qk_norm", attn.q_norm is not None),
            ("sinks", attn.sinks is not None),
            ("mask_mod", attn.mask_mod is not None),
            ("score_mod", attn.score_mod is not None),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"mla_from_gqa cannot convert a layer with {', '.join(unsupported)}")
    H, G, hd = attn.heads, attn.kv_heads, attn.head_dim
    bias = attn.q_proj.bias is not None
    ref = attn.q_proj.weight
    mla = MLA(
        attn.dim,
        H,
        kv_lora_rank=2 * G * hd,
        qk_nope_head_dim=hd,
        qk_rope_head_dim=0,
        v_head_dim=hd,
        kv_norm=False,
        causal=attn.causal,
        window=attn.window,
        softcap=attn.softcap,
        backend=attn.backend,
        bias=bias,
    ).to(device=ref.device, dtype=ref.dtype)
    mla.q_proj.weight.copy_(attn.q_proj.weight)
    mla.kv_down.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight], 0))
    mla.o_proj.weight.copy_(attn.o_proj.weight)
    if bias:
        mla.q_proj.bias.copy_(attn.q_proj.bias)
        mla.kv_down.bias.copy_(torch.cat([attn.k_proj.bias, attn.v_proj.bias], 0))
        mla.o_proj.bias.copy_(attn.o_proj.bias)
    W_uk, W_uv = mla._up_weights()
    W_uk.zero_()
    W_uv.zero_()
    eye = torch.eye(hd, device=ref.device, dtype=ref.dtype)
    for h in range(H):
        g = h // (H // G)
        W_uk[h, :, g * hd : (g + 1) * hd] = eye
        W_uv[h, :, G * hd + g * hd : G * hd + (g + 1) * hd] = eye
    if attn.rope is not None:
        mla.rope_nope = RotaryEmbedding(hd, attn.rope.base, attn.rope.fraction)
    return mla
