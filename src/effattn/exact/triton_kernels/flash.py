"""Host side of the Triton attention kernels: the tile plan of a BlockMask and the autograd function.

A :class:`TilePlan` is what the kernels read: per query block the listed key blocks (``kv_idx``,
``kv_cnt``) and a code per listed tile (``-1`` full: no mask work; ``-2`` partial, the call's
built-in masks (causal, window, document ids) evaluated in the kernel; ``>= 0`` partial, the index
of a precomputed ``[q_block, kv_block]`` uint8 tile in ``bits``). Bit tiles are for a BlockMask that
carries a Python ``mask_mod`` (the sparse selectors' rules): Triton cannot compile the callable, so
it is evaluated once in PyTorch on the partial tiles only (memory: one byte per pair of a partial
tile) and the kernels load the bits. The backward also needs, per key block, the query blocks
listing it: :meth:`TilePlan.transposed` builds them from the dense ``n_q x n_k`` tile map.

The kernel tile equals the BlockMask's block when it is at most 64 and is a power-of-two divisor of
it otherwise (a 128-block is walked as two 64-tiles), so any BlockMask whose ``q_block`` and
``kv_block`` are powers of two >= 16 runs without conversion; other block sizes are refused by the
backend (declared in its ``extra_reasons``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effattn.exact.block_mask import BlockMask, create_block_mask
from effattn.exact.masks import and_masks, causal_mask, document_mask, sliding_window_mask
from effattn.exact.triton_kernels import dot_flags, jit, out_dtype
from effattn.exact.triton_kernels.flash_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from effattn.exact.triton_kernels.flash_fwd import attn_fwd_kernel

__all__ = ["MaskSpec", "TilePlan", "block_size_ok", "flash_attention", "tile_plan"]

FULL, BUILTIN, ABSENT = -1, -2, -3
MAX_TILE = 64


def block_size_ok(n: int) -> bool:
    """Whether a BlockMask block size can be walked by the kernels (a power of two >= 16).

    Example::

        >>> [block_size_ok(n) for n in (8, 16, 48, 128)]
        [False, True, False, True]
    """
    return n >= 16 and (n & (n - 1)) == 0


@dataclass
class MaskSpec:
    """The built-in masks the kernels evaluate from indices (in tiles coded ``-2``)."""

    causal: bool = False
    window: tuple[int, int] | None = None
    doc_ids: torch.Tensor | None = None  # [T] int32 document of each packed position
    offset: int = 0


@dataclass
class TilePlan:
    kv_idx: torch.Tensor  # [Bm, Hm, nq, maxk] int32
    kv_cnt: torch.Tensor  # [Bm, Hm, nq] int32
    kv_tile: torch.Tensor  # [Bm, Hm, nq, maxk] int32 codes
    bits: torch.Tensor | None  # [n_tiles, q_block, kv_block] uint8
    q_block: int
    kv_block: int
    nk: int

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key block, the query blocks listing it: ``(q_idx, q_cnt, q_tile)`` (``[Bm, Hm, nk, maxq]``).

        Example::

            >>> plan = tile_plan(None, MaskSpec(causal=True), 1, 1, 48, 48, torch.device("cpu"), block=16)
            >>> q_idx, q_cnt, q_tile = plan.transposed()
            >>> q_cnt.flatten().tolist(), q_idx[0, 0, 2, :1].tolist(), q_tile[0, 0, 0].tolist()
            ([3, 2, 1], [2], [-2, -1, -1])
        """
        Bm, Hm, nq, maxk = self.kv_idx.shape
        dev = self.kv_idx.device
        valid = torch.arange(maxk, device=dev) < self.kv_cnt[..., None].long()
        col = torch.where(valid, self.kv_idx.long(), torch.full_like(self.kv_idx, self.nk, dtype=torch.long))
        dense = torch.full((Bm, Hm, nq, self.nk + 1), ABSENT, dtype=torch.int32, device=dev)
        dense.scatter_(-1, col, self.kv_tile)
        tmap = dense[..., : self.nk].transpose(2, 3)  # [Bm, Hm, nk, nq]
        listed = tmap != ABSENT
        cnt = listed.sum(-1)
        maxq = max(1, int(cnt.max()))
        order = torch.sort((~listed).to(torch.int8), dim=-1, stable=True).indices[..., :maxq]
        return order.int().contiguous(), cnt.int().contiguous(), tmap.gather(-1, order).contiguous()


def tile_plan(
    block_mask: BlockMask | None,
    spec: MaskSpec,
    B: int,
    H: int,
    Tq: int,
    Tk: int,
    device: torch.device,
    *,
    block: int = 64,
) -> TilePlan:
    """The :class:`TilePlan` of a call: its BlockMask's, or one built from the built-in masks in ``spec``.

    Example::

        >>> plan = tile_plan(None, MaskSpec(causal=True), 1, 1, 100, 100, torch.device("cpu"))
        >>> plan.kv_cnt.flatten().tolist(), plan.kv_tile[0, 0, 1].tolist()
        ([1, 2], [-1, -2])
    """
    bits = None
    if block_mask is None:
        parts = []
        if spec.causal:
            parts.append(causal_mask(spec.offset))
        if spec.window is not None:
            parts.append(sliding_window_mask(spec.window[0], spec.window[1], spec.offset))
        if spec.doc_ids is not None:
            parts.append(document_mask(spec.doc_ids.long()))
        mod = None if not parts else parts[0] if len(parts) == 1 else and_masks(*parts)
        bm = create_block_mask(mod, B, H, Tq, Tk, q_block=block, kv_block=block, device=device)
        code = torch.where(bm.kv_partial, BUILTIN, FULL).to(torch.int32)
    else:
        bm = block_mask
        code = torch.full(bm.kv_indices.shape, FULL, dtype=torch.int32, device=device)
        if bm.mask_mod is not None:
            maxk = bm.kv_indices.shape[-1]
            valid = torch.arange(maxk, device=device) < bm.kv_counts[..., None]
            sel = valid & bm.kv_partial.to(device)
            bi, hi, qi, ti = sel.nonzero(as_tuple=True)
            n = bi.numel()
            if n:
                kb = bm.kv_indices[bi, hi, qi, ti]
                qpos = qi[:, None, None] * bm.q_block + torch.arange(bm.q_block, device=device).view(1, -1, 1)
                kpos = kb[:, None, None] * bm.kv_block + torch.arange(bm.kv_block, device=device).view(1, 1, -1)
                allowed = bm.mask_mod(
                    bi.view(-1, 1, 1), hi.view(-1, 1, 1), qpos.clamp(max=Tq - 1), kpos.clamp(max=Tk - 1)
                )
                bits = torch.as_tensor(allowed, device=device).expand(n, bm.q_block, bm.kv_block)
                bits = bits.to(torch.uint8).contiguous()
                code[bi, hi, qi, ti] = torch.arange(n, device=device, dtype=torch.int32)
    return TilePlan(
        bm.kv_indices.to(device=device, dtype=torch.int32).contiguous(),
        bm.kv_counts.to(device=device, dtype=torch.int32).contiguous(),
        code.contiguous(),
        bits,
        bm.q_block,
        bm.kv_block,
        bm.num_kv_blocks,
    )


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _bh_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of the (batch, head) dims of a table, 0 where broadcast (size 1)."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def _common(q, plan: TilePlan, spec: MaskSpec, alibi_slopes, softcap):
    dev = q.device
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    doc = spec.doc_ids.to(device=dev, dtype=torch.int32).contiguous() if spec.doc_ids is not None else dummy
    slopes = alibi_slopes.detach().float().contiguous() if alibi_slopes is not None else dummy.float()
    bits = plan.bits if plan.bits is not None else dummy.to(torch.uint8)
    left, right = spec.window if spec.window is not None else (0, 0)
    scalars = dict(
        softcap=float(softcap) if softcap is not None else 1.0,
        offset=spec.offset,
        win_left=left,
        win_right=right,
    )
    flags = dict(
        CAUSAL=spec.causal,
        WINDOW=spec.window is not None,
        HAS_DOC=spec.doc_ids is not None,
        HAS_BITS=plan.bits is not None,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=softcap is not None,
        **dot_flags(q.dtype),
    )
    return doc, slopes, bits, scalars, flags


def _launch(D: int, Dv: int) -> dict:
    """Warps and pipeline stages by head width (untuned: no GPU was available; conservative so that a
    256-wide head's K/V tiles fit in shared memory)."""
    width = max(_pow2(D), _pow2(Dv))
    return {"num_warps": 4 if width <= 64 else 8, "num_stages": 2 if width <= 128 else 1}


def _tiles(plan: TilePlan) -> tuple[int, int]:
    return min(plan.q_block, MAX_TILE), min(plan.kv_block, MAX_TILE)


def _forward(q, k, v, sinks, plan, spec, scale, alibi_slopes, softcap):
    B, Tq, Hq, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(B, Tq, Hq, Dv, dtype=out_dtype(q.dtype))
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    doc, slopes, bits, scalars, flags = _common(q, plan, spec, alibi_slopes, softcap)
    sinks_t = sinks.detach().float().contiguous() if sinks is not None else slopes
    bm_, bn_ = _tiles(plan)
    s_ib, s_ih = _bh_strides(plan.kv_idx)
    s_cb, s_ch = _bh_strides(plan.kv_cnt)
    grid = (-(-Tq // bm_), B * Hq)
    jit(attn_fwd_kernel)[grid](
        q, k, v, o, lse, plan.kv_idx, plan.kv_cnt, plan.kv_tile, bits, doc, slopes, sinks_t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        s_ib, s_ih, plan.kv_idx.stride(2), s_cb, s_ch,
        Tq, Tk, Hq, Hq // Hkv, scale, **scalars,
        D=D, DV=Dv, D_PAD=_pow2(D), DV_PAD=_pow2(Dv), BLOCK_M=bm_, BLOCK_N=bn_,
        Q_BLOCK=plan.q_block, KV_BLOCK=plan.kv_block, HAS_SINKS=sinks is not None, **flags, **_launch(D, Dv),
    )  # fmt: skip
    return o.to(q.dtype), lse


def _backward(q, k, v, o, lse, do, dlse, sinks, plan, spec, scale, alibi_slopes, softcap):
    B, Tq, Hq, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    # delta_i = dO_i . O_i, less the lse's own gradient (d lse_i / d S_ij = P_ij)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Tq]
    if dlse is not None:
        delta = delta - torch.nan_to_num(dlse.float(), nan=0.0)
    do = do.contiguous() if do.stride(-1) != 1 else do
    doc, slopes, bits, scalars, flags = _common(q, plan, spec, alibi_slopes, softcap)
    bm_, bn_ = _tiles(plan)
    common = dict(D=D, DVD=Dv, D_PAD=_pow2(D), DV_PAD=_pow2(Dv), BLOCK_M=bm_, BLOCK_N=bn_,
                  Q_BLOCK=plan.q_block, KV_BLOCK=plan.kv_block, **flags, **_launch(D, Dv))  # fmt: skip
    dq = torch.empty_like(q, dtype=out_dtype(q.dtype))
    dk = torch.empty_like(k, dtype=out_dtype(k.dtype))
    dv = torch.empty_like(v, dtype=out_dtype(v.dtype))
    s_ib, s_ih = _bh_strides(plan.kv_idx)
    s_cb, s_ch = _bh_strides(plan.kv_cnt)
    jit(attn_bwd_dq_kernel)[(-(-Tq // bm_), B * Hq)](
        q, k, v, do, lse, delta, dq, plan.kv_idx, plan.kv_cnt, plan.kv_tile, bits, doc, slopes,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        s_ib, s_ih, plan.kv_idx.stride(2), s_cb, s_ch,
        Tq, Tk, Hq, Hq // Hkv, scale, **scalars, **common,
    )  # fmt: skip
    q_idx, q_cnt, q_tile = plan.transposed()
    s_jb, s_jh = _bh_strides(q_idx)
    s_db, s_dh = _bh_strides(q_cnt)
    jit(attn_bwd_dkdv_kernel)[(-(-Tk // bn_), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, q_idx, q_cnt, q_tile, bits, doc, slopes,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        s_jb, s_jh, q_idx.stride(2), s_db, s_dh,
        Tq, Tk, Hq, Hkv, Hq // Hkv, scale, **scalars, **common,
    )  # fmt: skip
    dsinks = None
    if sinks is not None:  # d loss / d sink_h = -sum_{b,i} P_sink(b,h,i) delta(b,h,i)
        p_sink = torch.exp(sinks.detach().float().view(1, Hq, 1) - lse)
        dsinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks


class _FlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, spec, scale, alibi_slopes, softcap):
        o, lse = _forward(q, k, v, sinks, plan, spec, scale, alibi_slopes, softcap)
        ctx.save_for_backward(q, k, v, o, lse, sinks)
        ctx.args = (plan, spec, scale, alibi_slopes, softcap)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dsinks = _backward(q, k, v, o, lse, do, dlse, sinks, *ctx.args)
        return dq, dk, dv, dsinks, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TilePlan,
    spec: MaskSpec,
    *,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, T_q, H_q, D_v], lse [B, H_q, T_q] float32)`` of exact attention over ``plan``'s tiles,
    differentiable in ``q``, ``k``, ``v`` and ``sinks`` (FlashAttention-2, Dao 2023).

    ``o = softmax(softcap(q k^T * scale) - ALiBi, masked) v`` with a sink logit per head in the
    denominator; an empty row gives ``o = 0``, ``lse = -inf``. The innermost dim of q, k and v must
    have stride 1 (other strides are passed to the kernels, nothing is copied).

    Example (runs where :func:`~effattn.exact.triton_kernels.triton_status` allows: CUDA tensors, or
    CPU tensors in a process started with ``TRITON_INTERPRET=1``)::

        >>> from effattn.exact.triton_kernels import triton_status
        >>> q = torch.randn(1, 20, 2, 16)
        >>> plan = tile_plan(None, MaskSpec(causal=True), 1, 2, 20, 20, q.device, block=16)
        >>> if triton_status(q.device)[0]:
        ...     o, lse = flash_attention(q, q, q, plan, MaskSpec(causal=True), scale=0.25)
        ...     assert torch.allclose(o[0, 0], q[0, 0])
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _FlashFunction.apply(q, k, v, sinks, plan, spec, scale, alibi_slopes, softcap)
