"""KIVI: a KV cache quantized to 2, 4 or 8 bits (keys per channel, values per token).

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).

Asymmetric uniform quantization of a group ``x_1 .. x_n`` to ``b`` bits:

    zero  = min_i x_i,   scale = (max_i x_i - min_i x_i) / (2^b - 1)
    c_i   = clamp(round((x_i - zero) / scale), 0, 2^b - 1)          (a b-bit code)
    x'_i  = zero + scale * c_i,          |x_i - x'_i| <= scale / 2   (error bound)

The bound is exact in real arithmetic and holds up to float32 rounding here (codes and
dequantization are computed in float32; ``scale`` and ``zero`` are stored in the cache dtype, so for
float16/bfloat16 add the rounding of the stored scale and zero). A constant group has ``scale = 0``
and is exact.

KIVI's observation: key outliers sit in fixed channels, value errors mix across channels through the
attention weights. So **keys are quantized per channel** (a group is ``G`` consecutive tokens of one
row, head and channel) and **values per token** (a group is ``G_v`` consecutive channels of one row,
token and head). Keys need ``G`` tokens before a group can be formed, so the newest tokens stay in
full precision (the residual): once ``R + G`` tokens wait there, the oldest ``G`` are quantized, so
between ``R`` and ``R + G - 1`` of the newest tokens (all of them, while fewer) are exact.

Codes are bit-packed, ``8 / b`` to a ``uint8``, along the channel axis. Per row and KV head, with
``n`` quantized tokens, ``r`` residual tokens and ``e`` bytes per element of the cache dtype:

    nbytes = n (ceil(D b / 8) + ceil(D_v b / 8))      codes
           + 2 e D n / G + 2 e n ceil(D_v / G_v)      scales and zero points of keys, values
           + e r (D + D_v)                            residual

For float16 at 2 bits with ``G = G_v = 32`` that is ``D/4 + D/8`` bytes per token and tensor instead
of ``2 D``: 5.3x smaller away from the residual (KIVI reports 2.6x on whole models with ``R = 128``).

:meth:`QuantizedKVCache.append` returns the whole context dequantized to the cache dtype (what
:class:`effattn.nn.Attention` attends to); the saving is in what stays resident between steps. A
fused kernel would dequantize tile by tile instead of materializing the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn._checks import check_int, check_positive_int, check_tensor
from effattn.kv.base import KVCacheBase, check_index

BITS = (2, 4, 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``b``-bit codes (integers in ``[0, 2^b)``) along the last axis: ``[..., n]`` ->
    uint8 ``[..., ceil(n b / 8)]``, code ``j`` of a byte in bits ``j b .. j b + b - 1``.

    Example::

        >>> pack_bits(torch.tensor([1, 2, 3, 0, 1]), 2)
        tensor([57,  1], dtype=torch.uint8)
    """
    _check_bits(bits)
    per = 8 // bits
    n = codes.shape[-1]
    c = F.pad(codes.to(torch.int32), (0, (-n) % per)).view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(-1).to(torch.uint8)  # disjoint bit fields: the sum is an OR


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., m]`` -> int32 codes ``[..., n]``."""
    _check_bits(bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.flatten(-2)[..., :n]


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of groups that run along ``dim`` (the reference form).

    Returns ``(codes, scale, zero)``: int32 codes of ``x``'s shape in ``[0, 2^bits)``, and float32
    ``scale = (max - min) / (2^bits - 1)``, ``zero = min`` with ``dim`` kept as size 1, so that
    ``dequantize(codes, scale, zero)`` is within ``scale / 2`` of ``x``.

    Example::

        >>> codes, scale, zero = quantize(torch.tensor([[0.0, 0.3, 1.0]]), 2, dim=1)
        >>> codes.tolist(), round(scale.item(), 4), zero.item()
        ([[0, 1, 3]], 0.3333, 0.0)
    """
    _check_bits(bits)
    xf = x.float()
    zero = xf.amin(dim, keepdim=True)
    scale = (xf.amax(dim, keepdim=True) - zero) / (2**bits - 1)
    return _codes(xf, scale, zero, bits), scale, zero


def _codes(xf: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # constant group: code 0, exact
    return torch.round((xf - zero) * inv).clamp_(0, 2**bits - 1).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``zero + scale * codes`` in float32 (``scale``/``zero`` broadcast over the group axis)."""
    return zero.float() + scale.float() * codes.float()


class QuantizedKVCache(KVCacheBase):
    """KIVI cache of keys ``[B, T, H_kv, D]`` and values ``[B, T, H_kv, D_v]`` with ``bits``-bit codes.

    Args:
        bits: 2, 4 or 8 bits per cached number.
        group_size: ``G``, tokens per key group (keys are quantized per channel over ``G`` tokens);
            also the default value group size. KIVI uses 32.
        residual: ``R``, newest tokens kept in full precision (KIVI uses 128; 0 quantizes every full
            group at once).
        value_group_size: ``G_v``, channels per value group (default ``min(group_size, D_v)``); a
            last, shorter group takes the remaining channels.

    Same interface as :class:`~effattn.kv.KVCache` (``append(k, v, valid) -> (k, v)`` of the whole
    context, ``length``, ``valid``, ``nbytes``), so it can be the ``state`` of
    :class:`effattn.nn.Attention`. Inference only: stored tokens are detached (no gradient flows
    through the cache). Keys and values are both required (no key-only form).

    Example::

        >>> c = QuantizedKVCache(bits=2, group_size=4, residual=2)
        >>> k, v = c.append(torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8))
        >>> c.length, c.num_quantized, c.num_residual, tuple(k.shape)
        (9, 4, 5, (1, 9, 2, 8))
        >>> k, v = c.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
        >>> c.num_quantized, c.num_residual
        (8, 2)
    """

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128, value_group_size: int | None = None):
        self.bits = _check_bits(bits)
        check_positive_int("group_size", group_size)
        check_int("residual", residual, minimum=0)
        check_positive_int("value_group_size", value_group_size, allow_none=True)
        self.group_size, self.residual, self._value_group_size = group_size, residual, value_group_size
        self.reset()

    def reset(self) -> None:
        """Forget every token."""
        self._kc = self._ks = self._kz = None  # key codes [B, n, H, ceil(D b/8)]; scale, zero [B, n/G, H, D]
        self._vc = self._vs = self._vz = None  # value codes [B, n, H, ceil(Dv b/8)]; scale, zero [B, n, H, ng]
        self._rk = self._rv = None  # residual [B, r, H, D] / [B, r, H, Dv] in the cache dtype
        self._reset_padding()
        self.length = 0
        self.num_quantized = 0

    # ------------------------------------------------------------------ views
    @property
    def num_residual(self) -> int:
        """Tokens currently held in full precision."""
        return self.length - self.num_quantized

    @property
    def batch_size(self) -> int | None:
        return None if self._rk is None else self._rk.shape[0]

    @property
    def kv_heads(self) -> int | None:
        return None if self._rk is None else self._rk.shape[2]

    @property
    def value_group_size(self) -> int | None:
        """``G_v`` in use (known after the first append)."""
        if self._rv is None:
            return self._value_group_size
        return min(self._value_group_size or self.group_size, self._rv.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes resident: packed codes + scales and zero points + the full-precision residual."""
        bufs = (self._kc, self._ks, self._kz, self._vc, self._vs, self._vz, self._rk, self._rv)
        return sum(b.numel() * b.element_size() for b in bufs if b is not None)

    @property
    def k(self) -> torch.Tensor | None:
        """Keys ``[B, length, H_kv, D]``, dequantized (a new tensor), ``None`` when empty."""
        if self._rk is None:
            return None
        if self._kc is None:
            return self._rk
        B, n, H, _ = self._kc.shape
        D, G = self._rk.shape[-1], self.group_size
        codes = unpack_bits(self._kc, self.bits, D).view(B, n // G, G, H, D)
        kq = dequantize(codes, self._ks[:, :, None], self._kz[:, :, None]).view(B, n, H, D)
        return torch.cat([kq.to(self._rk.dtype), self._rk], dim=1)

    @property
    def v(self) -> torch.Tensor | None:
        """Values ``[B, length, H_kv, D_v]``, dequantized (a new tensor), ``None`` when empty."""
        if self._rv is None:
            return None
        if self._vc is None:
            return self._rv
        B, n, H, _ = self._vc.shape
        Dv, gv = self._rv.shape[-1], self.value_group_size
        ng = -(-Dv // gv)
        codes = F.pad(unpack_bits(self._vc, self.bits, Dv), (0, ng * gv - Dv)).view(B, n, H, ng, gv)
        vq = dequantize(codes, self._vs[..., None], self._vz[..., None]).view(B, n, H, ng * gv)[..., :Dv]
        return torch.cat([vq.to(self._rv.dtype), self._rv], dim=1)

    # ------------------------------------------------------------------ writes
    def _quantize_keys(self, k: torch.Tensor) -> None:
        """``k [B, m G, H, D]``: per-channel groups of ``G`` tokens."""
        B, n, H, D = k.shape
        G, dt = self.group_size, self._rk.dtype
        x = k.float().view(B, n // G, G, H, D)
        zero = x.amin(2, keepdim=True)
        scale = (x.amax(2, keepdim=True) - zero) / (2**self.bits - 1)
        zero, scale = zero.to(dt), scale.to(dt)  # stored as the cache dtype; codes use the stored values
        codes = _codes(x, scale.float(), zero.float(), self.bits).view(B, n, H, D)
        self._kc = _cat(self._kc, pack_bits(codes, self.bits))
        self._ks, self._kz = _cat(self._ks, scale[:, :, 0]), _cat(self._kz, zero[:, :, 0])

    def _quantize_values(self, v: torch.Tensor) -> None:
        """``v [B, n, H, Dv]``: per-token groups of ``G_v`` channels (the last group may be shorter)."""
        B, n, H, Dv = v.shape
        gv, dt = self.value_group_size, self._rv.dtype
        ng = -(-Dv // gv)
        x = v.float()
        if ng * gv > Dv:  # repeat the last channel: min and max of the short group are unchanged
            x = torch.cat([x, x[..., -1:].expand(B, n, H, ng * gv - Dv)], dim=-1)
        x = x.view(B, n, H, ng, gv)
        zero = x.amin(-1, keepdim=True)
        scale = (x.amax(-1, keepdim=True) - zero) / (2**self.bits - 1)
        zero, scale = zero.to(dt), scale.to(dt)
        codes = _codes(x, scale.float(), zero.float(), self.bits).view(B, n, H, ng * gv)[..., :Dv]
        self._vc = _cat(self._vc, pack_bits(codes, self.bits))
        self._vs, self._vz = _cat(self._vs, scale[..., 0]), _cat(self._vz, zero[..., 0])

    def append(
        self, k: torch.Tensor, v: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k [B, T, H_kv, D]`` and ``v [B, T, H_kv, D_v]`` (``valid`` bool ``[B, T]``, False at
        padding); quantize every full group beyond the residual. Returns the whole context
        ``(k, v)`` dequantized, ``[B, length, ...]`` in the cache dtype."""
        check_tensor("k", k, 4, "[batch, seq, heads_kv, head_dim]")
        if v is None:
            raise TypeError("v is required: QuantizedKVCache holds keys and values (no key-only form)")
        check_tensor("v", v, 4, "[batch, seq, heads_kv, head_dim_v]")
        if tuple(v.shape[:3]) != tuple(k.shape[:3]):
            raise ValueError(f"v must match k in [batch, seq, heads_kv]: k {tuple(k.shape)}, v {tuple(v.shape)}")
        if v.dtype != k.dtype:
            raise TypeError(f"k and v must share a dtype: k {k.dtype}, v {v.dtype}")
        B, T = k.shape[:2]
        if self._rk is not None:
            rk, rv = self._rk, self._rv
            if (B, *k.shape[2:]) != (rk.shape[0], *rk.shape[2:]) or v.shape[3] != rv.shape[3]:
                raise ValueError(
                    f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache: it holds [batch, seq, "
                    f"heads_kv, head_dim] = [{rk.shape[0]}, {self.length}, {rk.shape[2]}, {rk.shape[3]}] "
                    f"and head_dim_v = {rv.shape[3]}"
                )
            if k.dtype != rk.dtype:
                raise TypeError(f"k has dtype {k.dtype}, the cache holds {rk.dtype}")
        self._track_padding(B, T, valid, k.device)
        self._rk = _cat(self._rk, k.detach())
        self._rv = _cat(self._rv, v.detach())
        self.length += T
        G = self.group_size
        m = max(0, (self._rk.shape[1] - self.residual) // G) * G  # tokens that leave the residual
        if m:
            self._quantize_keys(self._rk[:, :m])
            self._quantize_values(self._rv[:, :m])
            self._rk, self._rv = self._rk[:, m:].clone(), self._rv[:, m:].clone()  # release the old buffer
            self.num_quantized += m
        return self.k, self.v

    # ------------------------------------------------------------------ protocol extras
    def reorder(self, index) -> None:
        """Keep rows ``index`` (long ``[B']``, repeats allowed) in that order (beam search)."""
        index = check_index(index, self.batch_size)
        if self._rk is None:
            return
        index = index.to(self._rk.device)
        for name in ("_kc", "_ks", "_kz", "_vc", "_vs", "_vz", "_rk", "_rv"):
            buf = getattr(self, name)
            if buf is not None:
                setattr(self, name, buf.index_select(0, index))
        self._reorder_padding(index)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots of every row; only within the full-precision residual
        (``length >= num_quantized``): quantized tokens are stored in groups of ``group_size``."""
        length = self._check_crop(length)
        if length >= self.length:
            return
        if length < self.num_quantized:
            raise ValueError(
                f"cannot crop a QuantizedKVCache to {length} tokens: the first {self.num_quantized} are quantized "
                f"in groups of {self.group_size} tokens (crop to >= num_quantized)"
            )
        self._crop_padding(length)
        keep = length - self.num_quantized
        self._rk, self._rv = self._rk[:, :keep].clone(), self._rv[:, :keep].clone()
        self.length = length

    def __repr__(self) -> str:
        shape = None if self._rk is None else (self._rk.shape[0], self.length, *self._rk.shape[2:])
        return (
            f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, residual={self.residual}, "
            f"shape={shape}, quantized={self.num_quantized}, nbytes={self.nbytes})"
        )


def _cat(buf: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if buf is None else torch.cat([buf, x], dim=1)
